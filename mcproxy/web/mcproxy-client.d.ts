// Types of mcproxy-client.js (hand-written beside the JSDoc-typed source; the JS is the source).

export type Message = Record<string, any>;

export declare const SUPERSEDED_REASON: "MCP session reconnected on another connection";
export declare const TERMINATED_REASON: "MCP session terminated";
export declare const META_LSN: "io.mcproxy/lsn";
export declare const META_LAST_LSN: "io.mcproxy/lastLsn";
export declare const META_RESUMED: "io.mcproxy/resumed";
export declare const META_HEAD_LSN: "io.mcproxy/headLsn";
export declare const PROTOCOL_VERSION: string;
export declare const SESSION_LOST_CODE: -32001;
export declare const SHUTTING_DOWN_CODE: -32016;

/** Something with the Web Storage methods the client uses (sessionStorage, localStorage). */
export interface SessionStorageLike {
  getItem(key: string): string | null;
  setItem(key: string, value: string): void;
  removeItem(key: string): void;
}

/** A WebSocket constructor with the WHATWG interface (the browser's, Node 22's, or `ws`). */
export type WebSocketConstructor = new (url: string, protocols?: string | string[]) => {
  readonly readyState: number;
  send(data: string): void;
  close(code?: number, reason?: string): void;
  onopen: ((event: any) => void) | null;
  // `any` events: the DOM's (MessageEvent, CloseEvent) and the ws package's both fit.
  onmessage: ((event: any) => void) | null;
  onerror: ((event: any) => void) | null;
  onclose: ((event: any) => void) | null;
};

export interface McproxyClientOptions {
  /** The WebSocket class; default `globalThis.WebSocket` (Node 20: pass the `ws` package's). */
  WebSocket?: WebSocketConstructor;
  /** A bearer token, sent as the `mcp.auth.<base64url>` subprotocol. */
  token?: string;
  /** Where the session id and cursor are kept across page reloads, e.g. `sessionStorage`. */
  storage?: SessionStorageLike;
  /** Key in `storage`; default `mcproxy-session:<url>`. */
  storageKey?: string;
  /** Resume this session (with `cursor`) instead of a stored or new one. */
  sessionId?: string;
  cursor?: number;
  /** Cap of the first backed-off wait, ms (default 100). */
  minReconnectionDelay?: number;
  /** Largest wait between attempts, ms (default 10000). */
  maxReconnectionDelay?: number;
  /** Growth of the cap per attempt (default 2). */
  reconnectionDelayGrowFactor?: number;
  /** A connection up this long (ms) resets the backoff (default 5000). */
  minUptime?: number;
  /** An attempt not open after this many ms is abandoned (default 4000). */
  connectionTimeout?: number;
  /** Attempts after a drop before giving up (default Infinity). */
  maxRetries?: number;
  /** Messages that may wait for the connection; one more throws QueueFullError (default 1000). */
  maxEnqueuedMessages?: number;
  /** Default timeout of `request`, ms; 0: none (default 0). */
  requestTimeout?: number;
  /** Answers to the server's requests (sampling/createMessage, roots/list, ...), by method. */
  handlers?: Record<string, (params: any) => unknown | Promise<unknown>>;
  /** The random source of the jitter (tests). */
  random?: () => number;
}

export declare const DEFAULTS: Readonly<Required<Pick<McproxyClientOptions,
  "minReconnectionDelay" | "maxReconnectionDelay" | "reconnectionDelayGrowFactor" | "minUptime" |
  "connectionTimeout" | "maxRetries" | "maxEnqueuedMessages" | "requestTimeout">>>;

export type CloseKind = "superseded" | "terminated" | "refused" | "gave-up" | "closed";

export declare class ConnectionClosedError extends Error {
  constructor(kind: CloseKind, message: string);
  readonly kind: CloseKind;
}
export declare class QueueFullError extends Error {}
export declare class McpError extends Error {
  constructor(code: number, message: string, data?: unknown);
  readonly code: number;
  readonly data: unknown;
}

export interface Progress {
  progress: number;
  total?: number;
  message?: string;
}
export interface RequestOptions {
  onProgress?: (progress: Progress) => void;
  timeout?: number;
  signal?: AbortSignal;
}

export type ClientState = "idle" | "connecting" | "open" | "reconnecting" | "closed";

export interface McproxyClientEventMap {
  connecting: CustomEvent<{ attempt: number }>;
  open: CustomEvent<{ sessionId: string }>;
  resumed: CustomEvent<{ headLsn: number | null }>;
  sessionlost: CustomEvent<{ sessionId: string }>;
  disconnected: CustomEvent<{ code: number | null; reason: string; retryIn: number }>;
  closed: CustomEvent<{ error: ConnectionClosedError }>;
  message: CustomEvent<{ message: Message }>;
  lsn: CustomEvent<{ lsn: number }>;
  state: CustomEvent<{ state: ClientState }>;
  /** An answer no `request` of this object waits for (asked before a page reload, or via `send`). */
  unclaimed: CustomEvent<{ message: Message }>;
}

export declare class McproxyClient extends EventTarget {
  constructor(url: string, options?: McproxyClientOptions);
  readonly url: string;
  sessionId: string;
  cursor: number;
  established: boolean;
  state: ClientState;
  initParams: Message | null;
  initResult: Message | null;
  closedError: ConnectionClosedError | null;
  connects: number;
  open(): void;
  start(params?: { protocolVersion?: string; capabilities?: object; clientInfo?: object }): Promise<Message>;
  close(): void;
  /** End the session for good (the WebSocket equivalent of HTTP DELETE). */
  end(): void;
  forgetSession(): void;
  send(message: Message): void;
  forget(id: unknown): void;
  notify(method: string, params?: object): void;
  request(method: string, params?: object, options?: RequestOptions): Promise<any>;
  listTools(cursor?: string): Promise<{ tools: Message[]; nextCursor?: string }>;
  callTool(name: string, args?: object, options?: RequestOptions): Promise<Message>;
  addEventListener<K extends keyof McproxyClientEventMap>(
    type: K, listener: (event: McproxyClientEventMap[K]) => void, options?: boolean | AddEventListenerOptions): void;
  addEventListener(type: string, listener: EventListenerOrEventListenerObject | null, options?: boolean | AddEventListenerOptions): void;
  removeEventListener<K extends keyof McproxyClientEventMap>(
    type: K, listener: (event: McproxyClientEventMap[K]) => void, options?: boolean | EventListenerOptions): void;
  removeEventListener(type: string, listener: EventListenerOrEventListenerObject | null, options?: boolean | EventListenerOptions): void;
}

export declare function lsnOf(message: Message): number | null;
export declare function backoffDelay(
  options: { minReconnectionDelay: number; maxReconnectionDelay: number; reconnectionDelayGrowFactor: number },
  attempt: number, random?: () => number): number;
export declare function authProtocol(token: string): string;
export declare function newSessionId(): string;
export declare function terminalClose(code: number | null, reason: string): ConnectionClosedError | null;
