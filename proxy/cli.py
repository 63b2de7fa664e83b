"""The command line: serve, check, keys."""

from __future__ import annotations

import argparse
import logging
import secrets
import sys
from typing import Any

import yaml

from proxy.config import ConfigError, LoadedConfig
from proxy.loader import load

log = logging.getLogger("chat_proxy")


def _load_or_exit(path: str | None) -> LoadedConfig:
    try:
        return load(path)
    except ConfigError as exc:
        print("configuration errors:", file=sys.stderr)
        for line in exc.errors:
            print(f"  {line}", file=sys.stderr)
        raise SystemExit(2) from None


def cmd_check(args: argparse.Namespace) -> int:
    from proxy.chain import BuildContext, build_chain, describe, order_warnings

    config = _load_or_exit(args.config)
    try:
        build_chain(BuildContext(config=config))
    except ConfigError as exc:
        print("configuration errors:", file=sys.stderr)
        for line in exc.errors:
            print(f"  {line}", file=sys.stderr)
        return 2
    print(f"{config.source}: ok")
    for line in order_warnings(config.chain):
        print(f"warning: {line}", file=sys.stderr)
    for line in describe(config):
        print(line)
    return 0


def cmd_keys_new(args: argparse.Namespace) -> int:
    from proxy.middleware.auth import SCOPES, sha256_hex

    key_id = args.id.strip()
    if not key_id:
        print("--id: must not be empty", file=sys.stderr)
        return 2
    scopes = list(dict.fromkeys(s.strip() for s in args.scopes.split(",") if s.strip()))
    unknown = [s for s in scopes if s not in SCOPES]
    if unknown or not scopes:
        what = f"unknown scope {', '.join(unknown)}" if unknown else "no scope given"
        print(f"--scopes: {what} (scopes: {', '.join(SCOPES)})", file=sys.stderr)
        return 2
    key = "sk-cp-" + secrets.token_urlsafe(32)
    entry: dict[str, Any] = {"id": key_id, "key_sha256": sha256_hex(key), "scopes": scopes}
    print(f"key (shown once, store it now): {key}")
    print("config entry (under the auth middleware's keys:, or in its keys_file):")
    print(yaml.safe_dump([entry], sort_keys=False).rstrip())
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from proxy.observability import setup_logging
    from proxy.server import serve

    config = _load_or_exit(args.config)
    setup_logging(config.server.log_level)
    host = args.host or config.server.host
    port = args.port if args.port is not None else config.server.port
    try:
        return serve(config, host=host, port=port, workers=args.workers, config_path=args.config)
    except ConfigError as exc:  # found while starting: the store cannot be opened
        print("cannot start:", file=sys.stderr)
        for line in exc.errors:
            print(f"  {line}", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="chat-proxy", description="An OpenAI-compatible LLM proxy."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="run the proxy")
    p.add_argument("--config", help="configuration file (default: $CHAT_PROXY_CONFIG)")
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    p.add_argument("--workers", type=int, default=1)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("check", help="validate a configuration and print the chain")
    p.add_argument("--config", help="configuration file (default: $CHAT_PROXY_CONFIG)")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("keys", help="manage API keys")
    keys = p.add_subparsers(dest="keys_command", required=True)
    k = keys.add_parser("new", help="print a new random key and its config entry")
    k.add_argument("--id", required=True)
    k.add_argument("--scopes", default="chat,models")
    k.set_defaults(func=cmd_keys_new)

    args = parser.parse_args(argv)
    result: int = args.func(args)
    return result


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
