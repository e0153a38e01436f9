"""The durable engine: the SQLite store, the session runner that executes the core's actions,
the outbox that delivers committed messages in LSN order, and the hub of live sessions."""
