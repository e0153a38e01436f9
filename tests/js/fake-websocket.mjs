// A WebSocket stand-in with the WHATWG interface the client uses, driven by the test: the
// unit tests check the client's logic (what it sends, when it reconnects) without a network.

export class FakeWebSocket {
  /** @type {FakeWebSocket[]} every socket made, in order */
  static instances = [];
  static CONNECTING = 0;
  static OPEN = 1;
  static CLOSING = 2;
  static CLOSED = 3;

  constructor(url, protocols) {
    this.url = new URL(url);
    this.protocols = protocols;
    this.readyState = FakeWebSocket.CONNECTING;
    /** @type {any[]} decoded frames the client sent */
    this.sent = [];
    this.onopen = null;
    this.onmessage = null;
    this.onerror = null;
    this.onclose = null;
    this.closedWith = null;
    FakeWebSocket.instances.push(this);
  }

  static reset() {
    FakeWebSocket.instances = [];
  }

  static get last() {
    return FakeWebSocket.instances.at(-1);
  }

  send(data) {
    if (this.readyState !== FakeWebSocket.OPEN) throw new Error("send on a socket that is not open");
    this.sent.push(JSON.parse(data));
  }

  close(code = 1005, reason = "") {
    if (this.readyState === FakeWebSocket.CLOSED) return;
    const wasOpen = this.readyState === FakeWebSocket.OPEN;
    this.readyState = FakeWebSocket.CLOSED;
    this.closedWith = { code, reason };
    queueMicrotask(() => this.onclose?.({ code: wasOpen ? code : 1006, reason: wasOpen ? reason : "" }));
  }

  // --- the server's side ---------------------------------------------------------------

  accept() {
    this.readyState = FakeWebSocket.OPEN;
    this.onopen?.({});
  }

  receive(message) {
    this.onmessage?.({ data: JSON.stringify(message) });
  }

  drop(code = 1006, reason = "") {
    this.readyState = FakeWebSocket.CLOSED;
    this.onclose?.({ code, reason });
  }

  /** An upgrade refused with an HTTP status, as the ws package reports it. */
  refuse(status) {
    this.readyState = FakeWebSocket.CLOSED;
    this.onerror?.({ message: `Unexpected server response: ${status}` });
    this.onclose?.({ code: 1006, reason: "" });
  }

  /** The requests (with an id and a method) sent on this socket. */
  requests() {
    return this.sent.filter((m) => m.method !== undefined && m.id !== undefined);
  }
}

/** A Storage-like map (sessionStorage in a browser). */
export class MemoryStorage {
  constructor() {
    this.map = new Map();
  }
  getItem(key) {
    return this.map.has(key) ? this.map.get(key) : null;
  }
  setItem(key, value) {
    this.map.set(key, String(value));
  }
  removeItem(key) {
    this.map.delete(key);
  }
}

/** Wait until `check()` is truthy (polling each turn), or fail after `ms`. */
export async function until(check, ms = 2000, what = "condition") {
  const deadline = Date.now() + ms;
  for (;;) {
    const value = check();
    if (value) return value;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 1));
  }
}

/** A result carrying an LSN, as the proxy stamps it. */
export function answer(id, lsn, result = {}) {
  return { jsonrpc: "2.0", id, result: { ...result, _meta: { "io.mcproxy/lsn": lsn } } };
}
