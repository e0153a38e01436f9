// mcproxy-client: a reconnecting MCP client for mcproxy's WebSocket front, for browsers and
// Node >= 20. No dependencies. The wire contract is docs/PROTOCOL.md; the promises are those of
// the Python client (mcproxy/client/connection.py), see docs/CLIENT.md "The JavaScript client":
//
// - every server message is delivered once, in order: each connection names the session
//   (`mcp_session_id` on the URL, SEP draft v0) and the last LSN delivered (`mcp_last_lsn`),
//   re-sends the stored `initialize` with `mcpSessionId` and `_meta["io.mcproxy/lastLsn"]`
//   (draft v3, so a lost session is noticed), and drops anything at or below its cursor;
// - a request is never lost: requests made while offline wait in a bounded queue (a full
//   queue throws QueueFullError), and every unanswered request is re-sent with the same id
//   after a reconnect, which the proxy runs once and answers once;
// - close codes are obeyed: no reconnect after supersession, termination or a refusal;
// - the first retry after a drop is immediate, later ones wait a full-jitter draw under a
//   cap growing from minReconnectionDelay to maxReconnectionDelay (PartySocket's names).
//
// The session id is minted here (192 random bits) when none is known and always sent on the
// URL: a browser otherwise sends the `mcp_session_id` cookie some other tab got, and the
// upgrade would attach to (and take over) that tab's session.

/** @typedef {Record<string, any>} Message */

export const SUPERSEDED_REASON = "MCP session reconnected on another connection";
export const TERMINATED_REASON = "MCP session terminated";
export const META_LSN = "io.mcproxy/lsn";
export const META_LAST_LSN = "io.mcproxy/lastLsn";
export const META_RESUMED = "io.mcproxy/resumed";
export const META_HEAD_LSN = "io.mcproxy/headLsn";
export const PROTOCOL_VERSION = "2025-11-25";
/** The code of the error answered to requests a lost session took with it (not the proxy's). */
export const SESSION_LOST_CODE = -32001;
/** The proxy is stopping and refused a request unrun: it is sent again after the resume. */
export const SHUTTING_DOWN_CODE = -32016;

/** Close codes after which reconnecting at once is right (RFC 6455 §7.4.1; 1012 per IANA). */
const IMMEDIATE = new Set([1001, 1006, 1011, 1012, 1013]);
/** Answers and cancellations kept for a re-send after a drop (the proxy ignores late ones). */
const RESEND_WINDOW = 256;
const WS_OPEN = 1;

/** Defaults of the options, PartySocket's names (times in milliseconds). */
export const DEFAULTS = Object.freeze({
  minReconnectionDelay: 100,
  maxReconnectionDelay: 10000,
  reconnectionDelayGrowFactor: 2,
  minUptime: 5000,
  connectionTimeout: 4000,
  maxRetries: Infinity,
  maxEnqueuedMessages: 1000,
  requestTimeout: 0,
});

/** The connection ended for good; `kind` says why. */
export class ConnectionClosedError extends Error {
  /**
   * @param {"superseded"|"terminated"|"refused"|"gave-up"|"closed"} kind
   * @param {string} message
   */
  constructor(kind, message) {
    super(message);
    this.name = "ConnectionClosedError";
    this.kind = kind;
  }
}

/** More than maxEnqueuedMessages messages wait for the connection to come back. */
export class QueueFullError extends Error {
  /** @param {string} message */
  constructor(message) {
    super(message);
    this.name = "QueueFullError";
  }
}

/** A JSON-RPC error answer. */
export class McpError extends Error {
  /** @param {number} code @param {string} message @param {unknown} [data] */
  constructor(code, message, data) {
    super(message);
    this.name = "McpError";
    this.code = code;
    this.data = data;
  }
}

/**
 * The LSN the proxy put in a message's `_meta` (or `error.data`), or null.
 * @param {Message} message
 * @returns {number|null}
 */
export function lsnOf(message) {
  for (const holder of [message.result, message.params]) {
    const meta = holder && typeof holder === "object" ? holder._meta : undefined;
    if (meta && typeof meta === "object" && Number.isInteger(meta[META_LSN])) return meta[META_LSN];
  }
  const data = message.error && typeof message.error === "object" ? message.error.data : undefined;
  if (data && typeof data === "object" && Number.isInteger(data[META_LSN])) return data[META_LSN];
  return null;
}

/**
 * Backed-off waits: full jitter under a cap that grows exponentially to the maximum.
 * @param {{minReconnectionDelay: number, maxReconnectionDelay: number, reconnectionDelayGrowFactor: number}} o
 * @param {number} attempt 0 for the first backed-off wait
 * @param {() => number} [random]
 */
export function backoffDelay(o, attempt, random = Math.random) {
  const cap = Math.min(
    o.maxReconnectionDelay,
    o.minReconnectionDelay * o.reconnectionDelayGrowFactor ** attempt,
  );
  return random() * cap;
}

/**
 * The subprotocol that carries a bearer token (a browser cannot set headers on an upgrade):
 * `mcp.auth.<base64url(token)>`; the proxy never echoes it (docs/SECURITY.md).
 * @param {string} token
 */
export function authProtocol(token) {
  const bytes = new TextEncoder().encode(token);
  let binary = "";
  for (const b of bytes) binary += String.fromCharCode(b);
  return `mcp.auth.${btoa(binary).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "")}`;
}

/** A fresh session id: 192 random bits, base64url (what the proxy mints, docs/PROTOCOL.md). */
export function newSessionId() {
  const bytes = new Uint8Array(24);
  globalThis.crypto.getRandomValues(bytes);
  let binary = "";
  for (const b of bytes) binary += String.fromCharCode(b);
  return btoa(binary).replace(/\+/g, "-").replace(/\//g, "_");
}

/** @param {unknown} id */
const keyOf = (id) => JSON.stringify(id);

/**
 * A reconnecting JSON-RPC connection to mcproxy, with an MCP convenience layer on top
 * (`start`, `request`, `callTool`, `listTools`). Events (each a CustomEvent, data in `detail`):
 * `connecting` {attempt}, `open` {sessionId}, `resumed` {headLsn}, `sessionlost` {sessionId},
 * `disconnected` {code, reason, retryIn}, `closed` {error}, `message` {message}, `lsn` {lsn},
 * `state` {state}, `unclaimed` {message} (an answer no `request` of this object waits for).
 */
export class McproxyClient extends EventTarget {
  /**
   * @param {string} url the proxy's WebSocket endpoint, e.g. ws://127.0.0.1:8765/mcp
   * @param {import("./mcproxy-client.js").McproxyClientOptions} [options]
   */
  constructor(url, options = {}) {
    super();
    this.url = url;
    this.options = { ...DEFAULTS, ...options };
    /** @type {any} */
    this.WebSocket = options.WebSocket ?? globalThis.WebSocket;
    if (typeof this.WebSocket !== "function") {
      throw new TypeError("no WebSocket: pass options.WebSocket (e.g. the ws package on Node 20)");
    }
    this.storage = options.storage ?? null;
    this.storageKey = options.storageKey ?? `mcproxy-session:${url}`;
    const saved = this._load();
    /** The session id: given, restored, or minted; sent on every upgrade URL. */
    this.sessionId = options.sessionId ?? saved?.sessionId ?? newSessionId();
    /** The last LSN delivered. */
    this.cursor = options.cursor ?? saved?.cursor ?? 0;
    /** Does the proxy know this session (an initialize was answered, or it was restored)? */
    this.established = Boolean(options.sessionId ?? saved?.sessionId);
    /** @type {Message|null} the params of the session's initialize, re-sent to resume */
    this.initParams = null;
    /** @type {Message|null} */
    this.initResult = null;
    /** @type {"idle"|"connecting"|"open"|"reconnecting"|"closed"} */
    this.state = "idle";
    /** @type {ConnectionClosedError|null} */
    this.closedError = null;
    this.connects = 0;
    this._ws = /** @type {any} */ (null);
    this._ready = false; // open, resumed and flushed: send() writes straight through
    /** @type {Map<string, string>} our requests not yet answered, by id, in order */
    this._unanswered = new Map();
    /** @type {{key: string|null, data: string}[]} */
    this._queue = [];
    /** @type {string[]} answers and cancellations sent since the last resume */
    this._answers = [];
    /** @type {Map<string, {resolve: Function, reject: Function, onProgress?: Function, timer?: any}>} */
    this._pending = new Map();
    /** @type {Map<string, string>} progress token -> request key */
    this._progress = new Map();
    this._retries = 0;
    this._timer = /** @type {any} */ (null);
    this._resumeId = null;
    this._ids = 0;
    // Request ids must never repeat within a session (MCP basic §Requests), also across a page
    // reload that resumes it: a random prefix per client object keeps them apart.
    this._idPrefix = newSessionId().slice(0, 8);
    this._handlers = new Map(Object.entries(options.handlers ?? {}));
    this._random = options.random ?? Math.random;
  }

  // --- lifecycle ---------------------------------------------------------------------

  /** Connect (once; later calls do nothing). Messages then flow; see `start` for MCP. */
  open() {
    if (this.state === "idle") this._connect();
  }

  /**
   * Open and initialize the MCP session, or resume the stored one. Resolves with the
   * initialize result (for a resume, the proxy's stored one: `_meta["io.mcproxy/resumed"]`).
   * @param {{protocolVersion?: string, capabilities?: object, clientInfo?: object}} [params]
   */
  async start(params = {}) {
    const initParams = {
      protocolVersion: params.protocolVersion ?? PROTOCOL_VERSION,
      capabilities: params.capabilities ?? {},
      clientInfo: params.clientInfo ?? { name: "mcproxy-client", version: "0.1.0" },
    };
    if (this.established) {
      // A restored session: the first connection's resume handshake re-sends these params.
      this.initParams = initParams;
      const resumed = new Promise((resolve, reject) => {
        const ok = () => { done(); resolve(this.initResult); };
        const lost = () => { done(); resolve(this.initResult); };
        const closed = (/** @type {any} */ e) => { done(); reject(e.detail.error); };
        const done = () => {
          this.removeEventListener("resumed", ok);
          this.removeEventListener("sessionlost", lost);
          this.removeEventListener("closed", closed);
        };
        this.addEventListener("resumed", ok);
        this.addEventListener("sessionlost", lost);
        this.addEventListener("closed", closed);
      });
      this.open();
      return resumed;
    }
    this.open();
    const result = await this.request("initialize", initParams);
    this.notify("notifications/initialized");
    return result;
  }

  /**
   * Close for good: no reconnect; pending requests fail with ConnectionClosedError. The
   * session stays on the proxy, to be resumed by a later client.
   */
  close() {
    this._finish(new ConnectionClosedError("closed", "closed by the client"));
  }

  /**
   * End the session for good, the WebSocket equivalent of HTTP DELETE: close 1000 with the
   * reason "MCP session terminated" (docs/PROTOCOL.md, *Ending a session*). The proxy stops
   * the session's upstream at once and erases it; the stored session is forgotten. Only a
   * connected client can say so: if the connection is down, the proxy parks and expires it.
   */
  end() {
    this.forgetSession();
    this._finish(new ConnectionClosedError("terminated", "ended by the client"), TERMINATED_REASON);
  }

  /** Forget the stored session (the next client starts a new one). */
  forgetSession() {
    this.storage?.removeItem(this.storageKey);
  }

  // --- sending -----------------------------------------------------------------------

  /**
   * Send one JSON-RPC message now, or queue it until the connection is back.
   * @param {Message} message
   * @throws {QueueFullError|ConnectionClosedError}
   */
  send(message) {
    if (this.closedError) throw this.closedError;
    const data = JSON.stringify(message);
    const method = message.method;
    /** @type {string|null} */
    let key = null;
    if ("id" in message && method !== undefined) {
      if (method === "initialize" && this.initParams === null) this.initParams = message.params ?? {};
      key = keyOf(message.id);
    } else if (method === undefined || method === "notifications/cancelled") {
      this._answers.push(data);
      if (this._answers.length > RESEND_WINDOW) this._answers.shift();
    }
    if (this._ready && this._ws && this._ws.readyState === WS_OPEN) {
      if (key !== null) this._unanswered.set(key, data);
      this._ws.send(data);
      return;
    }
    if (this._queue.length >= this.options.maxEnqueuedMessages) {
      throw new QueueFullError(`${this._queue.length} messages already wait for the connection`);
    }
    if (key !== null) this._unanswered.set(key, data);
    this._queue.push({ key, data });
    if (this.state === "idle") this._connect();
  }

  /** Stop re-sending a request (cancelled, or timed out). @param {unknown} id */
  forget(id) {
    this._unanswered.delete(keyOf(id));
  }

  /** @param {string} method @param {object} [params] */
  notify(method, params) {
    this.send(params === undefined ? { jsonrpc: "2.0", method } : { jsonrpc: "2.0", method, params });
  }

  /**
   * Send a request; resolves with its result, rejects with McpError (an error answer),
   * ConnectionClosedError, or a timeout/abort error (then `notifications/cancelled` is sent).
   * @param {string} method
   * @param {object} [params]
   * @param {{onProgress?: (p: {progress: number, total?: number, message?: string}) => void, timeout?: number, signal?: AbortSignal}} [opts]
   */
  request(method, params = {}, opts = {}) {
    const id = `${this._idPrefix}-${++this._ids}`;
    const key = keyOf(id);
    /** @type {any} */
    let body = params;
    if (opts.onProgress) {
      body = { ...params, _meta: { ...(/** @type {any} */ (params)._meta ?? {}), progressToken: id } };
      this._progress.set(keyOf(id), key);
    }
    return new Promise((resolve, reject) => {
      const entry = { resolve, reject, onProgress: opts.onProgress, timer: /** @type {any} */ (null) };
      this._pending.set(key, entry);
      const giveUp = (/** @type {Error} */ error) => {
        if (!this._pending.has(key)) return;
        this._settle(key);
        this.forget(id);
        reject(error);
        if (!this.closedError) {
          try {
            this.notify("notifications/cancelled", { requestId: id, reason: error.message });
          } catch { /* the queue is full or the connection closed: nothing more to tell */ }
        }
      };
      const timeout = opts.timeout ?? this.options.requestTimeout;
      if (timeout > 0) {
        entry.timer = setTimeout(() => giveUp(new Error(`${method} timed out after ${timeout} ms`)), timeout);
      }
      opts.signal?.addEventListener("abort", () => giveUp(new Error(`${method} aborted`)), { once: true });
      try {
        this.send({ jsonrpc: "2.0", id, method, params: body });
      } catch (error) {
        this._settle(key);
        reject(error);
      }
    });
  }

  /** @param {string} [cursor] */
  async listTools(cursor) {
    return this.request("tools/list", cursor ? { cursor } : {});
  }

  /**
   * @param {string} name
   * @param {object} [args]
   * @param {{onProgress?: (p: {progress: number, total?: number, message?: string}) => void, timeout?: number, signal?: AbortSignal}} [opts]
   */
  async callTool(name, args = {}, opts = {}) {
    return this.request("tools/call", { name, arguments: args }, opts);
  }

  // --- the connection loop -----------------------------------------------------------

  _connect() {
    if (this.closedError) return;
    this._timer = null;
    const attempt = this.connects + 1;
    this._setState(this.connects === 0 ? "connecting" : "reconnecting");
    this._emit("connecting", { attempt });
    const url = new URL(this.url);
    url.searchParams.set("mcp_session_id", this.sessionId);
    if (this.established) url.searchParams.set("mcp_last_lsn", String(this.cursor));
    const protocols = ["mcp"];
    if (this.options.token) protocols.push(authProtocol(this.options.token));
    let ws;
    try {
      ws = new this.WebSocket(url.toString(), protocols);
    } catch (error) {
      // A bad URL or a refused scheme: retrying cannot help.
      this._finish(new ConnectionClosedError("refused", `cannot connect: ${error}`));
      return;
    }
    this._ws = ws;
    const started = Date.now();
    let opened = false;
    let refusedStatus = 0;
    const guard = setTimeout(() => {
      if (!opened && this._ws === ws) {
        refusedStatus = 0;
        ws.close();
        this._dropped(ws, null, "connection timeout", started, false);
      }
    }, this.options.connectionTimeout);
    ws.onopen = () => {
      clearTimeout(guard);
      if (this._ws !== ws) return;
      opened = true;
      this.connects += 1;
      this._onOpen(ws);
    };
    ws.onmessage = (/** @type {any} */ event) => {
      if (this._ws !== ws) return;
      this._onFrame(event.data);
    };
    ws.onerror = (/** @type {any} */ event) => {
      // A browser never says why an upgrade failed (WHATWG WebSocket hides the HTTP status);
      // the ws package does, in the error's message.
      const text = String(event?.message ?? event?.error?.message ?? "");
      const m = /Unexpected server response: (\d+)/.exec(text);
      if (m) refusedStatus = Number(m[1]);
    };
    ws.onclose = (/** @type {any} */ event) => {
      clearTimeout(guard);
      if (this._ws !== ws) return;
      if (!opened && [400, 401, 403, 404].includes(refusedStatus)) {
        this._dropped(ws, 4000 + refusedStatus, `upgrade refused: HTTP ${refusedStatus}`, started, false);
        return;
      }
      this._dropped(ws, opened ? event.code : null, String(event.reason ?? ""), started, opened);
    };
  }

  /** @param {any} ws */
  _onOpen(ws) {
    this._setState("open");
    this._emit("open", { sessionId: this.sessionId });
    if (this.established && this.initParams !== null) {
      // SEP draft v3 resume: our initialize again, with the session id and the cursor; the
      // proxy answers it from the stored result (or, if it lost the session, starts a new one
      // under this id with these params) and replays what we missed.
      this._resumeId = `mcproxy-resume-${this._idPrefix}-${this.connects}`;
      const params = { ...this.initParams };
      params._meta = { ...(params._meta ?? {}), [META_LAST_LSN]: this.cursor };
      ws.send(JSON.stringify({
        jsonrpc: "2.0", id: this._resumeId, method: "initialize", params, mcpSessionId: this.sessionId,
      }));
      return; // flushed once it is answered, so nothing overtakes the handshake
    }
    this._flush(ws);
  }

  /** @param {any} ws */
  _flush(ws) {
    // Requests of earlier connections still unanswered first (same ids: the proxy joins the
    // running one or answers from its log), then answers and cancellations sent on the last
    // connection, then what was queued while we were away, in the order it was sent.
    const queued = new Set(this._queue.map((q) => q.key).filter((k) => k !== null));
    for (const [key, data] of this._unanswered) if (!queued.has(key)) ws.send(data);
    for (const data of this._answers) ws.send(data);
    this._answers = [];
    const queue = this._queue;
    this._queue = [];
    for (const { key, data } of queue) {
      if (key === null || this._unanswered.has(key)) ws.send(data); // not cancelled meanwhile
    }
    this._ready = true;
  }

  /** @param {unknown} raw */
  _onFrame(raw) {
    let message;
    try {
      message = JSON.parse(String(raw));
    } catch {
      return; // the proxy sends JSON only; nothing to deliver
    }
    if (!message || typeof message !== "object" || Array.isArray(message)) return;
    if (this._resumeId !== null && message.id === this._resumeId && !("method" in message)) {
      this._onResumed(message);
      return;
    }
    this._deliver(message);
  }

  /** @param {Message} answer */
  _onResumed(answer) {
    this._resumeId = null;
    const ws = this._ws;
    const result = answer.result ?? {};
    if (answer.error) {
      // The proxy refused to resume or to start the session again (too many sessions, ...):
      // retrying the same handshake would get the same answer.
      this._finish(new ConnectionClosedError("refused", `resume refused: ${answer.error.code} ${answer.error.message}`));
      return;
    }
    if (!result._meta?.[META_RESUMED]) {
      // The proxy no longer had the session (its database was lost, or it expired): our
      // initialize started a new one under the same id. What we had in flight is gone with
      // the old one: answer it here so that no caller waits forever.
      this.cursor = 0;
      this.initResult = result;
      this._save();
      ws?.send(JSON.stringify({ jsonrpc: "2.0", method: "notifications/initialized" }));
      const lost = [...this._unanswered.values()].map((d) => JSON.parse(d));
      this._unanswered.clear();
      this._queue = this._queue.filter((q) => q.key === null);
      this._answers = [];
      this._emit("sessionlost", { sessionId: this.sessionId });
      for (const request of lost) {
        if (request.method === "initialize") continue;
        this._deliver({
          jsonrpc: "2.0", id: request.id,
          error: { code: SESSION_LOST_CODE, message: "session lost: the proxy no longer had it; the request may or may not have taken effect" },
        });
      }
    } else {
      this.initResult = result;
      this._emit("resumed", { headLsn: result._meta?.[META_HEAD_LSN] ?? null });
    }
    if (ws && this._ws === ws) this._flush(ws);
  }

  /** @param {Message} message */
  _deliver(message) {
    const lsn = lsnOf(message);
    if (lsn !== null) {
      if (lsn <= this.cursor) return; // already delivered (a replay overlapping a live send)
      this.cursor = lsn;
      this._save();
    }
    const isResponse = !("method" in message) && "id" in message;
    if (isResponse) {
      const key = keyOf(message.id);
      if (lsn === null && message.error?.code === SHUTTING_DOWN_CODE && this._unanswered.has(key)) {
        // The proxy is draining before a stop and did not run it (docs/PROTOCOL.md
        // "Stopping"): it stays unanswered and goes again, same id, on the next connection.
        return;
      }
      this._unanswered.delete(key);
      const result = message.result;
      if (result && typeof result === "object" && typeof result.mcpSessionId === "string") {
        if (!this.established) {
          this.established = true;
          this.sessionId = result.mcpSessionId;
          this.initResult = result;
          this._save();
        }
      }
      const pending = this._pending.get(key);
      if (!pending) this._emit("unclaimed", { message }); // e.g. asked before a page reload
      if (pending) {
        this._settle(key);
        if (message.error) {
          pending.reject(new McpError(message.error.code, message.error.message, message.error.data));
        } else {
          pending.resolve(result);
        }
      }
    } else if (message.method === "notifications/progress") {
      const token = message.params?.progressToken;
      const pending = this._pending.get(this._progress.get(keyOf(token)) ?? "");
      pending?.onProgress?.(message.params);
    } else if ("id" in message && this._handlers.size > 0) {
      this._answerServerRequest(message);
    }
    if (lsn !== null) this._emit("lsn", { lsn });
    this._emit("message", { message });
  }

  /** @param {Message} request */
  async _answerServerRequest(request) {
    const handler = this._handlers.get(request.method);
    /** @type {Message} */
    let answer;
    if (!handler) {
      answer = { jsonrpc: "2.0", id: request.id, error: { code: -32601, message: `method not found: ${request.method}` } };
    } else {
      try {
        answer = { jsonrpc: "2.0", id: request.id, result: await handler(request.params ?? {}) };
      } catch (error) {
        answer = { jsonrpc: "2.0", id: request.id, error: { code: -32603, message: String(error) } };
      }
    }
    try { this.send(answer); } catch { /* closed for good: the proxy withdraws the request */ }
  }

  /**
   * @param {any} ws @param {number|null} code @param {string} reason
   * @param {number} started @param {boolean} opened
   */
  _dropped(ws, code, reason, started, opened) {
    if (this._ws !== ws) return;
    this._ws = null;
    this._ready = false;
    this._resumeId = null;
    if (this.closedError) return;
    const terminal = terminalClose(code, reason);
    if (terminal) {
      if (terminal.kind === "terminated") this.forgetSession();
      this._finish(terminal);
      return;
    }
    const healthy = opened && Date.now() - started >= this.options.minUptime;
    if (healthy) this._retries = 0; // a stable run resets the count
    this._retries += 1;
    if (this._retries > this.options.maxRetries) {
      this._finish(new ConnectionClosedError("gave-up", `gave up after ${this._retries - 1} retries`));
      return;
    }
    // Once at once (after a healthy connection, or a close that invites it), then backed
    // off: a peer that keeps failing is not hammered.
    const immediate = this._retries === 1 && (healthy || (code !== null && IMMEDIATE.has(code)));
    const wait = immediate ? 0 : backoffDelay(this.options, this._retries - 1, this._random);
    this._setState("reconnecting");
    this._emit("disconnected", { code, reason, retryIn: wait });
    this._timer = setTimeout(() => this._connect(), wait);
  }

  /** @param {ConnectionClosedError} error @param {string} [reason] the close frame's */
  _finish(error, reason = "closed by the client") {
    if (this.closedError) return;
    this.closedError = error;
    this._ready = false;
    if (this._timer !== null) clearTimeout(this._timer);
    const ws = this._ws;
    this._ws = null;
    if (ws) {
      try { ws.close(1000, reason); } catch { /* already closing */ }
    }
    for (const [key, pending] of [...this._pending]) {
      this._settle(key);
      pending.reject(error);
    }
    this._setState("closed");
    this._emit("closed", { error });
  }

  /** @param {string} key */
  _settle(key) {
    const pending = this._pending.get(key);
    if (pending?.timer) clearTimeout(pending.timer);
    this._pending.delete(key);
    for (const [token, k] of this._progress) if (k === key) this._progress.delete(token);
  }

  /** @param {"idle"|"connecting"|"open"|"reconnecting"|"closed"} state */
  _setState(state) {
    if (this.state === state) return;
    this.state = state;
    this._emit("state", { state });
  }

  /** @param {string} type @param {object} detail */
  _emit(type, detail) {
    this.dispatchEvent(new CustomEvent(type, { detail }));
  }

  _load() {
    if (!this.storage) return null;
    try {
      const saved = JSON.parse(this.storage.getItem(this.storageKey) ?? "null");
      if (saved && typeof saved.sessionId === "string" && Number.isInteger(saved.cursor)) return saved;
    } catch { /* a corrupt entry: start a new session */ }
    return null;
  }

  _save() {
    if (!this.storage || !this.established) return;
    this.storage.setItem(this.storageKey, JSON.stringify({ sessionId: this.sessionId, cursor: this.cursor }));
  }
}

/**
 * The close codes that end the connection for good (docs/PROTOCOL.md "Close codes").
 * @param {number|null} code @param {string} reason
 * @returns {ConnectionClosedError|null}
 */
export function terminalClose(code, reason) {
  if (code === 1000 && reason === SUPERSEDED_REASON) return new ConnectionClosedError("superseded", reason);
  if (code === 1000 && reason === TERMINATED_REASON) return new ConnectionClosedError("terminated", reason);
  if (code !== null && code >= 4400 && code < 4500) {
    return new ConnectionClosedError("refused", reason || `refused with ${code}`);
  }
  return null;
}
