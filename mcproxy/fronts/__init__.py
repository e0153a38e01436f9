"""The client-facing fronts: the listener on the main port, the WebSocket front (SEP-1288),
the Streamable HTTP front (MCP 2025-11-25) and the aiohttp application that routes to them."""
