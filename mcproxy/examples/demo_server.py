"""A small MCP server over stdio, bundled so that ``mcproxy`` works out of the box.

It uses only the standard library (the proxy's users need not install an MCP SDK to try it)
and offers three tools: ``echo``, ``add`` and ``countdown`` (which reports progress once a
second, so a client can disconnect mid-call and watch the result arrive after it resumes).
"""

from __future__ import annotations

import json
import sys
import threading
import time
from typing import Any

PROTOCOL_VERSION = "2025-11-25"
_write_lock = threading.Lock()

TOOLS: list[dict[str, Any]] = [
    {
        "name": "echo",
        "description": "Return the text it is given.",
        "inputSchema": {
            "type": "object",
            "properties": {"text": {"type": "string"}},
            "required": ["text"],
        },
        "annotations": {"readOnlyHint": True},
    },
    {
        "name": "add",
        "description": "Add two numbers.",
        "inputSchema": {
            "type": "object",
            "properties": {"a": {"type": "number"}, "b": {"type": "number"}},
            "required": ["a", "b"],
        },
        "annotations": {"readOnlyHint": True},
    },
    {
        "name": "countdown",
        "description": "Count down from n, one step per second, reporting progress.",
        "inputSchema": {"type": "object", "properties": {"n": {"type": "integer"}}},
    },
]


def send(message: dict[str, Any]) -> None:
    line = json.dumps(message, separators=(",", ":"))
    with _write_lock:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()


def text_result(text: str) -> dict[str, Any]:
    return {"content": [{"type": "text", "text": text}], "isError": False}


def countdown(request_id: Any, n: int, token: Any) -> None:
    for step in range(n):
        if token is not None:
            send(
                {
                    "jsonrpc": "2.0",
                    "method": "notifications/progress",
                    "params": {
                        "progressToken": token,
                        "progress": step + 1,
                        "total": n,
                        "message": f"{n - step - 1} to go",
                    },
                }
            )
        time.sleep(1.0)
    send({"jsonrpc": "2.0", "id": request_id, "result": text_result(f"liftoff after {n}s")})


def call_tool(request_id: Any, params: dict[str, Any]) -> dict[str, Any] | None:
    name, args = params.get("name"), params.get("arguments") or {}
    if name == "echo":
        return text_result(str(args.get("text", "")))
    if name == "add":
        return text_result(str(args.get("a", 0) + args.get("b", 0)))
    if name == "countdown":
        token = (params.get("_meta") or {}).get("progressToken")
        n = max(0, min(int(args.get("n", 3)), 60))
        threading.Thread(target=countdown, args=(request_id, n, token), daemon=True).start()
        return None
    return {"content": [{"type": "text", "text": f"unknown tool {name}"}], "isError": True}


def handle(message: dict[str, Any]) -> None:
    method, request_id = message.get("method"), message.get("id")
    if method is None or request_id is None:
        return  # notifications and responses need no answer
    params = message.get("params") or {}
    result: dict[str, Any] | None
    if method == "initialize":
        result = {
            "protocolVersion": params.get("protocolVersion", PROTOCOL_VERSION),
            "capabilities": {"tools": {}},
            "serverInfo": {"name": "mcproxy-demo", "version": "0.1.0"},
        }
    elif method == "ping":
        result = {}
    elif method == "tools/list":
        result = {"tools": TOOLS}
    elif method == "tools/call":
        result = call_tool(request_id, params)
        if result is None:
            return
    else:
        send(
            {
                "jsonrpc": "2.0",
                "id": request_id,
                "error": {"code": -32601, "message": f"method not found: {method}"},
            }
        )
        return
    send({"jsonrpc": "2.0", "id": request_id, "result": result})


def main() -> None:
    print("mcproxy demo server ready", file=sys.stderr, flush=True)
    for line in sys.stdin:
        if line.strip():
            try:
                handle(json.loads(line))
            except (ValueError, TypeError) as exc:
                print(f"bad message: {exc}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
