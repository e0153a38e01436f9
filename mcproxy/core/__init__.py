"""The sans-I/O core: JSON-RPC envelope, framing, RFC 6455, the session state machine, the
Host/Origin guard and bearer tokens. Imports only ``mcproxy.errors``; no loop, socket, database
or clock (enforced by tests/unit/test_layers.py)."""
