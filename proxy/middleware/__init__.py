"""The built-in middlewares; importing this package registers every module in it."""

from __future__ import annotations

import importlib
import pkgutil

import proxy.ratelimit.middleware
import proxy.sessions  # noqa: F401  (registers session)

for _info in pkgutil.iter_modules(__path__):
    if not _info.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_info.name}")
