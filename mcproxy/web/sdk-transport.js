// The reconnecting connection as a Transport of the official TypeScript SDK
// (@modelcontextprotocol/sdk, `Transport` in shared/transport): the SDK's `Client` keeps one
// transport for its life, and drops, resumes and re-sent requests happen below it, unseen.
// This module imports nothing from the SDK (it is the application's dependency, not ours).

import { McproxyClient } from "./mcproxy-client.js";

/** A `Transport` of @modelcontextprotocol/sdk (checked in tests/js/types.check.ts). */
export class McproxyTransport {
  /**
   * @param {string | McproxyClient} urlOrClient the proxy's WebSocket endpoint, or a client
   * @param {import("./mcproxy-client.js").McproxyClientOptions} [options] for a new client
   */
  constructor(urlOrClient, options = {}) {
    this.client = typeof urlOrClient === "string" ? new McproxyClient(urlOrClient, options) : urlOrClient;
    /** @type {(() => void) | undefined} */
    this.onclose = undefined;
    /** @type {((error: Error) => void) | undefined} */
    this.onerror = undefined;
    /** @type {((message: any) => void) | undefined} */
    this.onmessage = undefined;
    // The SDK numbers its requests from 0 in every Client, but ids must never repeat within
    // a session (MCP basic §Requests), and a restored session (a page reload) outlives the
    // Client that used it: our requests go out under ids unique to this transport, and the
    // answers come back under the SDK's.
    /** @type {Map<string, unknown>} wire id -> the SDK's id */
    this._ids = new Map();
    /** @type {Map<string, string>} JSON of the SDK's id -> wire id */
    this._wire = new Map();
    this._prefix = `sdk-${Math.random().toString(36).slice(2, 10)}-`;
    this._started = false;
    this.client.addEventListener("message", (/** @type {any} */ e) => this._receive(e.detail.message));
    this.client.addEventListener("closed", (/** @type {any} */ e) => {
      if (e.detail.error.kind !== "closed") this.onerror?.(e.detail.error);
      this.onclose?.();
    });
  }

  /** The proxy session's id once this transport initialized it. Before that, undefined: the
   * SDK's Client skips `initialize` on a transport that has a session id (it takes it for a
   * reconnection), and a restored session is re-initialized through the proxy, which answers
   * from the stored result. */
  get sessionId() {
    return this.client.established && this.client.initParams !== null ? this.client.sessionId : undefined;
  }

  async start() {
    if (this._started) throw new Error("McproxyTransport already started");
    this._started = true;
    this.client.open();
  }

  /** @param {any} message */
  async send(message) {
    let out = message;
    if ("method" in message && "id" in message) {
      const wire = `${this._prefix}${message.id}`;
      this._ids.set(wire, message.id);
      this._wire.set(JSON.stringify(message.id), wire);
      out = { ...message, id: wire };
    } else if (message.method === "notifications/cancelled" && message.params) {
      const wire = this._wire.get(JSON.stringify(message.params.requestId));
      if (wire !== undefined) out = { ...message, params: { ...message.params, requestId: wire } };
    }
    this.client.send(out); // throws QueueFullError / ConnectionClosedError to the SDK
  }

  async close() {
    this.client.close();
  }

  /** @param {any} message */
  _receive(message) {
    let inbound = message;
    if (!("method" in message) && "id" in message && this._ids.has(message.id)) {
      const id = this._ids.get(message.id);
      this._ids.delete(message.id);
      this._wire.delete(JSON.stringify(id));
      inbound = { ...message, id };
    }
    try {
      this.onmessage?.(inbound);
    } catch (error) {
      this.onerror?.(/** @type {Error} */ (error));
    }
  }
}
