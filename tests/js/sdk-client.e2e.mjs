// The official TypeScript SDK's Client over McproxyTransport, against a real mcproxy reached
// through a relay that cuts the connection in the middle of a tool call (run by
// tests/e2e/test_browser.py, which owns the proxy and the relay):
//
//   node sdk-client.e2e.mjs ws://127.0.0.1:PORT/mcp TOOL '{"n": 3}'
//
// Prints one JSON line: the result, the progress steps the SDK reported, the connects.

import { Client } from "@modelcontextprotocol/sdk/client/index.js";
import WebSocket from "ws";

import { McproxyTransport } from "../../mcproxy/web/sdk-transport.js";

const [url, tool, args] = process.argv.slice(2);
// Node 20 has no global WebSocket: the ws package's, injected (Node 22 would need none).
const transport = new McproxyTransport(url, { WebSocket, minUptime: 0 });
const events = [];
for (const type of ["open", "resumed", "disconnected", "sessionlost"]) {
  transport.client.addEventListener(type, () => events.push(type));
}
const client = new Client({ name: "sdk-over-mcproxy", version: "1.0.0" });
const errors = [];
client.onerror = (error) => errors.push(String(error)); // e.g. an answer to an unknown id
await client.connect(transport);
const { tools } = await client.listTools();
const progress = [];
const result = await client.callTool({ name: tool, arguments: JSON.parse(args) }, undefined, {
  onprogress: (p) => progress.push(p.progress),
  timeout: 60000,
});
const results = [result];
// Anything still due (a duplicate of the answer) would come before the answer to this one.
results.push(await client.callTool({ name: "echo", arguments: { text: "after" } }));
process.stdout.write(`${JSON.stringify({
  tools: tools.map((t) => t.name),
  result: result.content,
  after: results[1].content,
  progress,
  connects: transport.client.connects,
  events,
  errors,
  sessionId: transport.sessionId,
})}\n`);
await client.close();
