"""Command line: parse arguments, load the config, hand over to ``daemon.serve``. Nothing else.

mcproxy [--config FILE] [--upstream TARGET] [--listen HOST:PORT] [--db PATH] ...
mcproxy check-config [--config FILE] [...]     validate (config, tokens), print the effective config
mcproxy [--config FILE | --db PATH] sessions list|show|events|delete ...   (see admin.py)
mcproxy connect ws://HOST:PORT/mcp       stdio <-> reconnecting WebSocket bridge (bridge.py)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import msgspec
import structlog

from mcproxy import __version__, config, log
from mcproxy.errors import ConfigError, ReloadFailed, StoreError
from mcproxy.ops import admin

EXIT_CONFIG = 2
EXIT_RUNTIME = 1


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mcproxy",
        description="Durable, reconnectable MCP sessions (WebSocket and Streamable HTTP)"
        " in front of an MCP server.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="other commands:\n"
        "  mcproxy connect ws://HOST:PORT/mcp   bridge stdio to a durable session (put it"
        " where a\n"
        "                                       desktop client expects a stdio server);"
        " see\n"
        "                                       mcproxy connect --help\n"
        "  mcproxy sessions list|show|events|delete\n"
        "                                       inspect or end stored sessions; see\n"
        "                                       mcproxy sessions --help",
    )
    p.add_argument(
        "command",
        nargs="?",
        choices=["run", "check-config"],
        default="run",
        help="run the daemon (default) or print the effective config",
    )
    p.add_argument("--config", "-c", help="TOML config file (see config.example.toml)")
    p.add_argument("--upstream", help="upstream server, e.g. 'stdio:python -m my_server'")
    p.add_argument("--listen", help=f"HOST:PORT to serve on (default {config.DEFAULT_LISTEN})")
    p.add_argument("--db", help="SQLite file for sessions and event logs")
    p.add_argument(
        "--require-session-id",
        action="store_true",
        default=None,
        help="refuse WebSocket upgrades without mcp_session_id (SEP draft v0)",
    )
    p.add_argument(
        "--demo-page",
        action="store_true",
        default=None,
        help="serve the browser tool console on /demo/ ([demo] enabled)",
    )
    p.add_argument("--durability", choices=["normal", "full"])
    p.add_argument("--log-format", choices=["auto", "json", "console"])
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    p.add_argument("--version", action="version", version=f"mcproxy {__version__}")
    return p


def _overrides(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    pairs = {
        ("upstream", "target"): args.upstream,
        ("server", "listen"): args.listen,
        ("server", "require_session_id"): args.require_session_id,
        ("store", "path"): args.db,
        ("store", "durability"): args.durability,
        ("demo", "enabled"): args.demo_page,
        ("log", "format"): args.log_format,
        ("log", "level"): args.log_level,
    }
    out: dict[str, dict[str, Any]] = {}
    for (section, key), value in pairs.items():
        if value is not None:
            out.setdefault(section, {})[key] = value
    return out


def _first_command(argv: list[str]) -> str | None:
    """The first positional word, skipping the values of the options that take one."""
    index = _command_index(argv)
    return None if index is None else argv[index]


def _command_index(argv: list[str]) -> int | None:
    takes_value = {"--config", "-c", "--upstream", "--listen", "--db", "--durability"}
    skip = False
    for index, word in enumerate(argv):
        if skip:
            skip = False
        elif word in takes_value or word in {"--log-format", "--log-level"}:
            skip = True
        elif not word.startswith("-"):
            return index
    return None


def _options(argv: list[str]) -> list[str]:
    """The daemon's arguments without the command word: what a reload passes to
    ``check-config`` and to the next program (``run`` is the default command)."""
    index = _command_index(argv)
    return argv if index is None else argv[:index] + argv[index + 1 :]


def _sessions(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="mcproxy")
    p.add_argument("--config", "-c", help="TOML config file: its store.path is used")
    p.add_argument("--db", help="SQLite file (overrides the config)")
    admin.add_parser(p.add_subparsers(dest="command", required=True))
    args, rest = p.parse_known_args(argv)
    if rest:
        p.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        cfg = config.load(args.config, {"store": {"path": args.db}} if args.db else None)
    except ConfigError as exc:
        print(f"mcproxy: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    return admin.run(args, Path(config.db_path(cfg)))


def _connect(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="mcproxy connect",
        description="Bridge stdio to a durable mcproxy session over a reconnecting WebSocket:"
        " put this command where a desktop MCP client expects a stdio server.",
    )
    p.add_argument("url", help="the proxy's WebSocket endpoint, e.g. ws://127.0.0.1:8765/mcp")
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"], default="warning")
    args = p.parse_args(argv[argv.index("connect") + 1 :])
    if not args.url.startswith(("ws://", "wss://")):
        p.error("the URL must start with ws:// or wss://")
    log.configure("json", args.log_level)  # stderr: stdout belongs to the MCP stream

    import uvloop

    from mcproxy.client.bridge import run

    try:
        return uvloop.run(run(args.url))
    except KeyboardInterrupt:
        return EXIT_RUNTIME


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = _first_command(argv)
    if command == "sessions":
        return _sessions(argv)
    if command == "connect":
        return _connect(argv)
    args = _parser().parse_args(argv)
    try:
        cfg = config.load(args.config, _overrides(args))
    except ConfigError as exc:
        print(f"mcproxy: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    if args.command == "check-config":
        # Also what a reload runs before it replaces the program (ops/reload.py): the
        # daemon's code must import, and what it reads at start-up beside the config too.
        from mcproxy.ops.daemon import load_tokens

        try:
            load_tokens(cfg)
        except ConfigError as exc:
            print(f"mcproxy: {exc}", file=sys.stderr)
            return EXIT_CONFIG
        print(msgspec.json.format(msgspec.json.encode(cfg)).decode())
        return 0
    log.configure(cfg.log.format, cfg.log.level)

    import uvloop  # imported here: only the daemon needs it

    from mcproxy.ops.daemon import serve

    # From here on stderr is the log: a failure is one more log line (JSON under journald).
    try:
        uvloop.run(serve(cfg, argv=_options(argv)))
    except ConfigError as exc:  # e.g. a socket systemd passed, a tokens file others can read
        structlog.get_logger("mcproxy").error("daemon.config_error", error=str(exc))
        return EXIT_CONFIG
    except StoreError as exc:
        structlog.get_logger("mcproxy").error("daemon.store_failed", error=str(exc))
        return EXIT_RUNTIME
    except ReloadFailed:  # logged as reload.failed
        return EXIT_RUNTIME
    except KeyboardInterrupt:
        return EXIT_RUNTIME
    return 0
