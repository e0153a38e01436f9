"""Upstream drivers: the protocol every kind implements (``base``), a stdio child per
session (``stdio``), a remote Streamable HTTP server (``http``) and the shared pool of children
(``shared``). They import the core and the leaves, never the engine or the fronts."""
