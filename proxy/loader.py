"""Loading a configuration as the proxy runs it: the file's shape (proxy/config.py),
then the chain's entries, each checked against its middleware's options
(proxy/chain.py). Every error of both comes back at once, with its path."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import proxy.middleware  # noqa: F401  (registers the built-in middleware types)
from proxy.chain import resolve_entries
from proxy.config import ConfigError, LoadedConfig, MiddlewareEntry, parse_text, read_file


def load_text(
    text: str, *, env: Mapping[str, str] | None = None, source: Path | None = None
) -> LoadedConfig:
    """Parse, interpolate and validate a configuration, chain included."""
    parsed = parse_text(text, env=env)
    errors = list(parsed.errors)
    entries: tuple[MiddlewareEntry, ...] = ()
    if parsed.chain is not None:
        entries, chain_errors = resolve_entries(parsed.chain)
        errors.extend(chain_errors)
    if errors or parsed.config is None:
        raise ConfigError(errors or ["<root>: invalid configuration"])
    return LoadedConfig(config=parsed.config, chain=entries, source=source)


def load(
    path: str | os.PathLike[str] | None = None, *, env: Mapping[str, str] | None = None
) -> LoadedConfig:
    """Load the configuration file named by `path` or by CHAT_PROXY_CONFIG."""
    text, source = read_file(path, env=env)
    return load_text(text, env=os.environ if env is None else env, source=source)
