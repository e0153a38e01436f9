// Compiled, never run (tsconfig.json here): the package's .d.ts files describe what a
// TypeScript user needs, and McproxyTransport is assignable to the SDK's Transport.
import type { Transport } from "@modelcontextprotocol/sdk/shared/transport.js";
import { Client } from "@modelcontextprotocol/sdk/client/index.js";

import {
  ConnectionClosedError,
  McproxyClient,
  QueueFullError,
  type McproxyClientOptions,
} from "../../mcproxy/web/mcproxy-client.js";
import { McproxyTransport } from "../../mcproxy/web/sdk-transport.js";

const options: McproxyClientOptions = {
  WebSocket: globalThis.WebSocket, // the DOM one fits the constructor type
  storage: new Map<string, string>() as unknown as Storage,
  minReconnectionDelay: 100,
  maxEnqueuedMessages: 10,
};
const client = new McproxyClient("ws://127.0.0.1:8765/mcp", options);
client.addEventListener("closed", (e) => {
  const kind: "superseded" | "terminated" | "refused" | "gave-up" | "closed" = e.detail.error.kind;
  void kind;
});
client.addEventListener("lsn", (e) => console.log(e.detail.lsn + 1));
client.addEventListener("disconnected", (e) => console.log(e.detail.retryIn, e.detail.code));

async function use(): Promise<void> {
  await client.start({ clientInfo: { name: "t", version: "1" } });
  const { tools } = await client.listTools();
  const result = await client.callTool(tools[0].name, {}, { onProgress: (p) => p.progress, timeout: 5 });
  void result;
  try {
    client.send({ jsonrpc: "2.0", method: "notifications/x" });
  } catch (error) {
    if (error instanceof QueueFullError || error instanceof ConnectionClosedError) return;
  }
  const transport: Transport = new McproxyTransport("ws://127.0.0.1:8765/mcp", options);
  await new Client({ name: "t", version: "1" }).connect(transport);
  const fromClient: Transport = new McproxyTransport(client);
  void fromClient;
}
void use;
