"""The reconnecting client library, a separate product on the same wire contract: the
connection (resume with cursor, dedupe, re-send), ``MCPClient``, an ``mcp`` SDK transport and
the stdio bridge of ``mcproxy connect``. It imports only the core."""
