// The demo tool console: lists the tools, calls one with JSON arguments, shows progress and
// results as they arrive, the connection state and the last LSN. The session is kept in
// sessionStorage, so a reload resumes it; a proxy restart mid-call goes unnoticed but for the
// state line. Query parameters: `endpoint=ws://host:port/mcp` (default: this origin and the
// path in <meta name="mcproxy-endpoint">), `session=<id>` (take over that session). A bearer
// token goes in the fragment, `#token=...`, which the browser never sends to a server.

import { McproxyClient } from "./mcproxy-client.js";

const $ = (/** @type {string} */ id) => /** @type {HTMLElement} */ (document.getElementById(id));
const query = new URLSearchParams(location.search);
const fragment = new URLSearchParams(location.hash.slice(1));

function endpoint() {
  const given = query.get("endpoint");
  if (given) return given;
  const meta = document.querySelector('meta[name="mcproxy-endpoint"]');
  const url = new URL(meta?.getAttribute("content") ?? "/mcp", location.href);
  url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
  return url.toString();
}

const client = new McproxyClient(endpoint(), {
  storage: sessionStorage,
  sessionId: query.get("session") ?? undefined,
  token: fragment.get("token") ?? undefined,
});
// For tests and the curious: the client object from the browser console.
Object.assign(globalThis, { mcproxyClient: client });
/** @type {Map<string, any>} */
let tools = new Map();
/** The highest progress shown per token: progress MUST increase (MCP basic/utilities/progress),
 * and a call the proxy re-issued after losing its server starts over; show each step once. */
const shownProgress = new Map();

/** @param {string} kind @param {string} text @param {Record<string, string>} [data] */
function log(kind, text, data = {}) {
  const li = document.createElement("li");
  li.className = kind;
  li.textContent = text;
  for (const [k, v] of Object.entries(data)) li.dataset[k] = v;
  $("log").append(li);
  li.scrollIntoView({ block: "nearest" });
}

function showState() {
  $("state").textContent = client.state;
  $("state").dataset.state = client.state;
  $("session").textContent = client.sessionId;
  $("connects").textContent = String(client.connects);
}

client.addEventListener("state", showState);
client.addEventListener("open", showState);
client.addEventListener("lsn", (e) => { $("lsn").textContent = String(e.detail.lsn); });
client.addEventListener("resumed", (e) => log("event", `resumed (the proxy's newest LSN: ${e.detail.headLsn})`));
client.addEventListener("sessionlost", () => log("event", "the proxy had lost the session: a new one started under the same id"));
client.addEventListener("disconnected", (e) =>
  log("event", `disconnected (${e.detail.code ?? "not connected"} ${e.detail.reason}); retrying in ${Math.round(e.detail.retryIn)} ms`));
client.addEventListener("closed", (e) => { log("event", `closed for good: ${e.detail.error.message}`, { kind: e.detail.error.kind }); showState(); });
client.addEventListener("message", (e) => {
  const message = e.detail.message;
  if (message.method === "notifications/progress") {
    const { progressToken, progress, total, message: text } = message.params;
    const token = String(progressToken);
    if (progress <= (shownProgress.get(token) ?? -Infinity)) return;
    shownProgress.set(token, progress);
    log("progress", `${progress}${total ? `/${total}` : ""} ${text ?? ""}`, { token, progress: String(progress) });
  } else if (message.method === "notifications/tools/list_changed") {
    listTools();
  }
});

/** @param {any} result */
function resultText(result) {
  const parts = (result?.content ?? []).map((/** @type {any} */ c) => (c.type === "text" ? c.text : `[${c.type}]`));
  return parts.length ? parts.join("\n") : JSON.stringify(result);
}

// Answers to calls made before a reload: this page object has no promise for them.
client.addEventListener("unclaimed", (e) => {
  const m = e.detail.message;
  if (m.error) log("error", `${m.error.code} ${m.error.message}`, { id: String(m.id) });
  else if (m.result?.content) log("result", resultText(m.result), { id: String(m.id), earlier: "true" });
});

async function listTools() {
  const { tools: list } = await client.listTools();
  tools = new Map(list.map((/** @type {any} */ t) => [t.name, t]));
  const select = /** @type {HTMLSelectElement} */ ($("tool"));
  const keep = select.value;
  select.replaceChildren(...list.map((/** @type {any} */ t) => new Option(t.name, t.name)));
  if (tools.has(keep)) select.value = keep;
  pick();
}

/** A skeleton of the arguments from the tool's input schema. */
function pick() {
  const tool = tools.get(/** @type {HTMLSelectElement} */ ($("tool")).value);
  $("description").textContent = tool?.description ?? "";
  /** @type {Record<string, unknown>} */
  const args = {};
  for (const [name, schema] of Object.entries(tool?.inputSchema?.properties ?? {})) {
    const type = /** @type {any} */ (schema).type;
    args[name] = type === "integer" || type === "number" ? 3 : type === "boolean" ? false : "";
  }
  /** @type {HTMLTextAreaElement} */ ($("args")).value = JSON.stringify(args);
}

async function call() {
  const name = /** @type {HTMLSelectElement} */ ($("tool")).value;
  let args;
  try {
    args = JSON.parse(/** @type {HTMLTextAreaElement} */ ($("args")).value || "{}");
  } catch (error) {
    log("error", `arguments are not JSON: ${error}`);
    return;
  }
  log("call", `${name} ${JSON.stringify(args)}`);
  try {
    const result = await client.callTool(name, args, { onProgress: () => {} });
    log(result.isError ? "error" : "result", resultText(result), { tool: name });
  } catch (error) {
    const e = /** @type {any} */ (error);
    log("error", e.code !== undefined ? `${e.code} ${e.message}` : String(e.message ?? e), { tool: name });
  }
}

$("tool").addEventListener("change", pick);
$("refresh").addEventListener("click", () => listTools().catch((e) => log("error", String(e.message ?? e))));
$("call").addEventListener("click", call);
$("new-session").addEventListener("click", () => {
  client.forgetSession();
  location.replace(location.pathname + location.hash);
});

showState();
try {
  await client.start({ clientInfo: { name: "mcproxy-demo-page", version: "0.1.0" } });
  showState();
  await listTools();
  document.body.dataset.ready = "true";
} catch (error) {
  log("error", `cannot start: ${/** @type {any} */ (error).message ?? error}`);
}
