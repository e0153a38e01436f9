// Types of sdk-transport.js. Structurally a `Transport` of @modelcontextprotocol/sdk
// (shared/transport), without importing the SDK: the SDK is a peer dependency.
import type { McproxyClient, McproxyClientOptions } from "./mcproxy-client.js";

export declare class McproxyTransport {
  constructor(urlOrClient: string | McproxyClient, options?: McproxyClientOptions);
  readonly client: McproxyClient;
  readonly sessionId: string | undefined;
  onclose?: (() => void) | undefined;
  onerror?: ((error: Error) => void) | undefined;
  onmessage?: ((message: any, extra?: any) => void) | undefined;
  start(): Promise<void>;
  send(message: any, options?: unknown): Promise<void>;
  close(): Promise<void>;
}
