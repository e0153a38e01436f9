// Unit tests of the JS client's logic (node --test), over a fake WebSocket: what it sends on
// each connection, when it reconnects, what it delivers. The same file the daemon serves and
// npm packs is the one loaded here.

import assert from "node:assert/strict";
import { afterEach, beforeEach, test } from "node:test";

import {
  ConnectionClosedError,
  McpError,
  McproxyClient,
  QueueFullError,
  SESSION_LOST_CODE,
  SUPERSEDED_REASON,
  TERMINATED_REASON,
  authProtocol,
  backoffDelay,
  lsnOf,
} from "../../mcproxy/web/mcproxy-client.js";
import { McproxyTransport } from "../../mcproxy/web/sdk-transport.js";
import { FakeWebSocket, MemoryStorage, answer, until } from "./fake-websocket.mjs";

const URL_ = "ws://127.0.0.1:1/mcp";
/** @type {McproxyClient[]} */
let clients = [];

function make(options = {}) {
  const client = new McproxyClient(URL_, { WebSocket: FakeWebSocket, ...options });
  clients.push(client);
  return client;
}

/** A client whose session is established: initialize answered with the session id. */
async function established(options = {}) {
  const client = make(options);
  const started = client.start();
  const ws = FakeWebSocket.last;
  ws.accept();
  const init = ws.requests()[0];
  assert.equal(init.method, "initialize");
  ws.receive(answer(init.id, 1, { protocolVersion: "2025-11-25", mcpSessionId: client.sessionId }));
  await started;
  return { client, ws };
}

beforeEach(() => FakeWebSocket.reset());
afterEach(() => {
  for (const c of clients) c.close();
  clients = [];
});

test("lsnOf reads results, notifications and error data", () => {
  assert.equal(lsnOf({ id: 1, result: { _meta: { "io.mcproxy/lsn": 7 } } }), 7);
  assert.equal(lsnOf({ method: "m", params: { _meta: { "io.mcproxy/lsn": 8 } } }), 8);
  assert.equal(lsnOf({ id: 1, error: { code: 1, message: "x", data: { "io.mcproxy/lsn": 9 } } }), 9);
  assert.equal(lsnOf({ id: 1, result: {} }), null);
});

test("backoff: full jitter under a cap that grows to the maximum", () => {
  const o = { minReconnectionDelay: 100, maxReconnectionDelay: 1000, reconnectionDelayGrowFactor: 2 };
  assert.deepEqual([0, 1, 2, 3, 4, 10].map((n) => backoffDelay(o, n, () => 1)), [100, 200, 400, 800, 1000, 1000]);
  assert.equal(backoffDelay(o, 3, () => 0.5), 400);
});

test("the auth subprotocol is base64url of the token, unpadded", () => {
  const token = "s3cret/+token?é";
  assert.equal(authProtocol(token), `mcp.auth.${Buffer.from(token).toString("base64url")}`);
});

test("every upgrade names the session; a token rides in a subprotocol", async () => {
  const client = make({ token: "tok" });
  client.open();
  const ws = FakeWebSocket.last;
  assert.equal(ws.url.searchParams.get("mcp_session_id"), client.sessionId);
  assert.ok(client.sessionId.length >= 16);
  assert.equal(ws.url.searchParams.get("mcp_last_lsn"), null); // no session yet: no cursor
  assert.deepEqual(ws.protocols, ["mcp", authProtocol("tok")]);
});

test("start initializes, learns the session, then sends initialized", async () => {
  const { client, ws } = await established();
  assert.equal(client.established, true);
  assert.equal(client.cursor, 1);
  assert.equal(ws.sent.at(-1).method, "notifications/initialized");
  assert.equal(client.initParams.clientInfo.name, "mcproxy-client");
});

test("messages at or below the cursor are dropped", async () => {
  const { client, ws } = await established();
  const seen = [];
  client.addEventListener("message", (e) => seen.push(lsnOf(e.detail.message)));
  for (const lsn of [2, 3, 3, 2, 4]) ws.receive({ jsonrpc: "2.0", method: "notifications/message", params: { _meta: { "io.mcproxy/lsn": lsn } } });
  assert.deepEqual(seen, [2, 3, 4]);
  assert.equal(client.cursor, 4);
});

test("after a drop: immediate reconnect, resume with id and cursor, then the unanswered re-sent", async () => {
  const { client, ws } = await established();
  const call = client.callTool("countdown", { n: 3 });
  const sentCall = ws.requests().at(-1);
  ws.receive({ jsonrpc: "2.0", method: "notifications/progress", params: { progressToken: "x", progress: 1, _meta: { "io.mcproxy/lsn": 2 } } });
  const events = [];
  client.addEventListener("disconnected", (e) => events.push(e.detail));
  ws.drop(1006);
  assert.equal(events[0].retryIn, 0); // the first retry is immediate
  const queuedWhileAway = client.request("tools/list");
  const back = await until(() => FakeWebSocket.instances[1], 500, "a reconnect");
  assert.equal(back.url.searchParams.get("mcp_session_id"), client.sessionId);
  assert.equal(back.url.searchParams.get("mcp_last_lsn"), "2");
  back.accept();
  // Only the resume handshake until it is answered: nothing overtakes it.
  assert.equal(back.sent.length, 1);
  const hello = back.sent[0];
  assert.equal(hello.method, "initialize");
  assert.equal(hello.mcpSessionId, client.sessionId);
  assert.equal(hello.params._meta["io.mcproxy/lastLsn"], 2);
  assert.equal(hello.params.clientInfo.name, "mcproxy-client");
  let resumed = 0;
  client.addEventListener("resumed", () => resumed++);
  back.receive({ jsonrpc: "2.0", id: hello.id, result: { _meta: { "io.mcproxy/resumed": true, "io.mcproxy/headLsn": 2 } } });
  assert.equal(resumed, 1);
  const [again, list] = back.requests().slice(1);
  assert.deepEqual(again, sentCall); // the same id: the proxy runs it once
  assert.equal(list.method, "tools/list");
  back.receive(answer(sentCall.id, 3, { content: [{ type: "text", text: "done" }] }));
  back.receive(answer(list.id, 4, { tools: [] }));
  assert.equal((await call).content[0].text, "done");
  assert.deepEqual(await queuedWhileAway, { tools: [], _meta: { "io.mcproxy/lsn": 4 } });
  // Answered: not re-sent after the next drop.
  back.drop(1012);
  const third = await until(() => FakeWebSocket.instances[2], 500, "a reconnect");
  third.accept();
  third.receive({ jsonrpc: "2.0", id: third.sent[0].id, result: { _meta: { "io.mcproxy/resumed": true } } });
  assert.deepEqual(third.sent.slice(1), []);
});

test("a request the proxy refused while draining (-32016) is re-sent after the resume", async () => {
  const { client, ws } = await established();
  const call = client.request("tools/list");
  const sent = ws.requests().at(-1);
  ws.receive({ jsonrpc: "2.0", id: sent.id, error: { code: -32016, message: "the proxy is shutting down", data: { retryAfterS: 1 } } });
  ws.drop(1012);
  const back = await until(() => FakeWebSocket.instances[1], 500, "a reconnect");
  back.accept();
  back.receive({ jsonrpc: "2.0", id: back.sent[0].id, result: { _meta: { "io.mcproxy/resumed": true } } });
  assert.deepEqual(back.requests().slice(1), [sent]); // the same id, on the next process
  back.receive(answer(sent.id, 2, { tools: [] }));
  assert.deepEqual(await call, { tools: [], _meta: { "io.mcproxy/lsn": 2 } });
});

test("the offline queue is bounded: one more is an error, not a silent drop", async () => {
  const client = make({ maxEnqueuedMessages: 2 });
  client.notify("notifications/a");
  client.notify("notifications/b");
  assert.throws(() => client.notify("notifications/c"), QueueFullError);
  await assert.rejects(client.request("tools/list"), QueueFullError);
  FakeWebSocket.last.accept();
  assert.deepEqual(FakeWebSocket.last.sent.map((m) => m.method), ["notifications/a", "notifications/b"]);
});

for (const [code, reason, kind] of [
  [1000, SUPERSEDED_REASON, "superseded"],
  [1000, TERMINATED_REASON, "terminated"],
  [4403, "the session belongs to another principal", "refused"],
]) {
  test(`close ${code} "${reason}": no reconnect, pending requests fail (${kind})`, async () => {
    const storage = new MemoryStorage();
    const { client, ws } = await established({ storage });
    const pending = client.request("tools/list");
    const closed = new Promise((resolve) => client.addEventListener("closed", (e) => resolve(e.detail.error)));
    ws.drop(code, reason);
    const error = await closed;
    assert.ok(error instanceof ConnectionClosedError);
    assert.equal(error.kind, kind);
    await assert.rejects(pending, (e) => e.kind === kind);
    await new Promise((resolve) => setTimeout(resolve, 20));
    assert.equal(FakeWebSocket.instances.length, 1);
    assert.equal(client.state, "closed");
    assert.throws(() => client.notify("x"), ConnectionClosedError);
    // A terminated session is forgotten; a superseded one belongs to the other tab now.
    assert.equal(storage.getItem(client.storageKey) === null, kind === "terminated");
  });
}

test("end() closes 1000 with the termination reason and forgets the session; close() keeps it", async () => {
  const storage = new MemoryStorage();
  const { client, ws } = await established({ storage });
  const pending = client.request("tools/list");
  client.end();
  assert.deepEqual(ws.closedWith, { code: 1000, reason: TERMINATED_REASON });
  await assert.rejects(pending, (e) => e.kind === "terminated");
  assert.equal(storage.getItem(client.storageKey), null);
  assert.equal(client.state, "closed");
  await new Promise((resolve) => setTimeout(resolve, 20));
  assert.equal(FakeWebSocket.instances.length, 1); // no reconnect

  FakeWebSocket.reset();
  const kept = await established({ storage: new MemoryStorage() });
  kept.client.close();
  assert.deepEqual(kept.ws.closedWith, { code: 1000, reason: "closed by the client" });
  assert.notEqual(kept.client.storage.getItem(kept.client.storageKey), null);
});

test("an upgrade refused with 401 (ws reports the status) is final", async () => {
  const client = make();
  client.open();
  const closed = new Promise((resolve) => client.addEventListener("closed", (e) => resolve(e.detail.error)));
  FakeWebSocket.last.refuse(401);
  assert.equal((await closed).kind, "refused");
  assert.equal(FakeWebSocket.instances.length, 1);
});

test("failed attempts back off with jitter, then give up after maxRetries", async () => {
  const client = make({ minReconnectionDelay: 4, reconnectionDelayGrowFactor: 2, maxRetries: 3, random: () => 1 });
  const waits = [];
  client.addEventListener("disconnected", (e) => waits.push(e.detail.retryIn));
  const closed = new Promise((resolve) => client.addEventListener("closed", (e) => resolve(e.detail.error)));
  client.open();
  for (let i = 0; i < 4; i++) {
    const ws = await until(() => FakeWebSocket.instances[i], 1000, `attempt ${i}`);
    ws.drop(1006); // never opened: a server that is down
  }
  assert.equal((await closed).kind, "gave-up");
  assert.deepEqual(waits, [4, 8, 16]); // a socket that never opened gets no immediate retry
});

test("an attempt not open within connectionTimeout is abandoned and retried", async () => {
  const client = make({ connectionTimeout: 10, minReconnectionDelay: 1 });
  client.open();
  const first = FakeWebSocket.last;
  await until(() => FakeWebSocket.instances.length === 2, 1000, "a second attempt");
  assert.equal(first.readyState, FakeWebSocket.CLOSED);
});

test("a lost session: pending requests answered with an error, cursor reset, initialized sent", async () => {
  const { client, ws } = await established();
  ws.receive({ jsonrpc: "2.0", method: "notifications/message", params: { _meta: { "io.mcproxy/lsn": 5 } } });
  const pending = client.callTool("countdown", { n: 3 });
  let lost = 0;
  client.addEventListener("sessionlost", () => lost++);
  ws.drop(1006);
  const back = await until(() => FakeWebSocket.instances[1], 500, "a reconnect");
  back.accept();
  back.receive({ jsonrpc: "2.0", id: back.sent[0].id, result: { protocolVersion: "2025-11-25", mcpSessionId: client.sessionId, _meta: { "io.mcproxy/lsn": 1 } } });
  await assert.rejects(pending, (e) => e instanceof McpError && e.code === SESSION_LOST_CODE);
  assert.equal(lost, 1);
  assert.equal(client.cursor, 0);
  assert.deepEqual(back.sent.slice(1).map((m) => m.method), ["notifications/initialized"]); // not re-sent
});

test("a resume answered with an error is final", async () => {
  const { client, ws } = await established();
  const pending = client.request("tools/list");
  ws.drop(1006);
  const back = await until(() => FakeWebSocket.instances[1], 500, "a reconnect");
  back.accept();
  back.receive({ jsonrpc: "2.0", id: back.sent[0].id, error: { code: -32013, message: "too many sessions" } });
  await assert.rejects(pending, (e) => e.kind === "refused" && /too many sessions/.test(e.message));
  assert.equal(client.state, "closed");
});

test("a stored session resumes after a reload, with a fresh request-id prefix", async () => {
  const storage = new MemoryStorage();
  const { client, ws } = await established({ storage });
  ws.receive({ jsonrpc: "2.0", method: "notifications/message", params: { _meta: { "io.mcproxy/lsn": 6 } } });
  const firstId = client.request("tools/list").catch(() => {}) && ws.requests().at(-1).id;
  client.close();
  const reloaded = make({ storage });
  assert.equal(reloaded.sessionId, client.sessionId);
  assert.equal(reloaded.cursor, 6);
  const started = reloaded.start({ clientInfo: { name: "page", version: "2" } });
  const ws2 = FakeWebSocket.last;
  assert.equal(ws2.url.searchParams.get("mcp_last_lsn"), "6");
  ws2.accept();
  assert.equal(ws2.sent[0].mcpSessionId, client.sessionId);
  ws2.receive({ jsonrpc: "2.0", id: ws2.sent[0].id, result: { protocolVersion: "2025-11-25", _meta: { "io.mcproxy/resumed": true } } });
  const result = await started;
  assert.equal(result._meta["io.mcproxy/resumed"], true);
  reloaded.request("tools/list").catch(() => {});
  assert.notEqual(ws2.requests().at(-1).id, firstId); // ids never repeat within a session
});

test("a request that times out is cancelled and not re-sent", async () => {
  const { client, ws } = await established();
  await assert.rejects(client.request("tools/call", { name: "slow" }, { timeout: 5 }), /timed out/);
  const [call] = ws.requests().slice(-1);
  const cancel = ws.sent.at(-1);
  assert.equal(cancel.method, "notifications/cancelled");
  assert.equal(cancel.params.requestId, call.id);
  ws.drop(1006);
  const back = await until(() => FakeWebSocket.instances[1], 500, "a reconnect");
  back.accept();
  back.receive({ jsonrpc: "2.0", id: back.sent[0].id, result: { _meta: { "io.mcproxy/resumed": true } } });
  assert.ok(!back.requests().slice(1).some((m) => m.id === call.id));
});

test("progress reaches the caller's callback", async () => {
  const { client, ws } = await established();
  const steps = [];
  const call = client.callTool("countdown", { n: 2 }, { onProgress: (p) => steps.push(p.progress) });
  const sent = ws.requests().at(-1);
  const token = sent.params._meta.progressToken;
  ws.receive({ jsonrpc: "2.0", method: "notifications/progress", params: { progressToken: token, progress: 1, _meta: { "io.mcproxy/lsn": 2 } } });
  ws.receive({ jsonrpc: "2.0", method: "notifications/progress", params: { progressToken: token, progress: 2, _meta: { "io.mcproxy/lsn": 3 } } });
  ws.receive(answer(sent.id, 4, { content: [] }));
  await call;
  assert.deepEqual(steps, [1, 2]);
});

test("server requests are answered by the handlers, or with method not found", async () => {
  const { ws } = await established({ handlers: { "roots/list": async () => ({ roots: [] }) } });
  ws.receive({ jsonrpc: "2.0", id: 0, method: "roots/list", params: { _meta: { "io.mcproxy/lsn": 2 } } });
  ws.receive({ jsonrpc: "2.0", id: 1, method: "sampling/createMessage", params: { _meta: { "io.mcproxy/lsn": 3 } } });
  await until(() => ws.sent.filter((m) => m.method === undefined).length === 2, 500, "two answers");
  const answers = ws.sent.filter((m) => m.method === undefined).sort((a, b) => a.id - b.id);
  assert.deepEqual(answers[0], { jsonrpc: "2.0", id: 0, result: { roots: [] } });
  assert.equal(answers[1].error.code, -32601);
});

test("the SDK transport maps its ids to unique wire ids and back", async () => {
  const client = make();
  const transport = new McproxyTransport(client);
  const received = [];
  transport.onmessage = (m) => received.push(m);
  await transport.start();
  const ws = FakeWebSocket.last;
  ws.accept();
  await transport.send({ jsonrpc: "2.0", id: 0, method: "initialize", params: { protocolVersion: "2025-11-25", capabilities: {}, clientInfo: { name: "t", version: "1" } } });
  const wire = ws.sent[0].id;
  assert.notEqual(wire, 0);
  ws.receive(answer(wire, 1, { mcpSessionId: client.sessionId }));
  assert.equal(received[0].id, 0);
  assert.equal(client.established, true);
  await transport.send({ jsonrpc: "2.0", id: 1, method: "tools/call", params: {} });
  await transport.send({ jsonrpc: "2.0", method: "notifications/cancelled", params: { requestId: 1 } });
  assert.equal(ws.sent[2].params.requestId, ws.sent[1].id);
  let closed = 0;
  transport.onclose = () => closed++;
  await transport.close();
  assert.equal(closed, 1);
});
