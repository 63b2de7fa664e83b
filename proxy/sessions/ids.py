"""Session ids: the ids the proxy makes, the ids a client may send, and the id the
backend is sent.

The backend is sent (in `forward_header`) not the session id but `sess_` + the first
32 hex digits of SHA-256(owner + NUL + session id): the same for every turn of a
session, on every replica and after restarts (so a backend's prefix cache still groups
a conversation), and different for two keys that name the same conversation id, whose
sessions are two sessions. The client sees its own id.
"""

from __future__ import annotations

import hashlib
import os
import re
import time
from collections.abc import Callable
from typing import Any

from proxy.errors import bad_request

SAFE_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
ID_PREFIX = "sess_"
ID_TIME_DIGITS = 12  # hex digits of the creation time: 48 bits of milliseconds
ID_RANDOM_BYTES = 16  # 128 random bits

clock: Callable[[], float] = time.time  # the time sessions are stamped with


def new_session_id() -> str:
    """A new session id: `sess_`, the creation time in milliseconds (12 hex digits of
    `clock`, so that ids sort by creation and a store's inserts stay near each other),
    then 128 random bits (32 hex digits). Nothing in it counts sessions or ties one to
    another session of the same process; one system call per id."""
    ms = int(clock() * 1000) & 0xFFFF_FFFF_FFFF
    return f"{ID_PREFIX}{ms:012x}{os.urandom(ID_RANDOM_BYTES).hex()}"


def forwarded_id(owner: str, session_id: str) -> str:
    """The id the backend is sent for the owner's session: a function of both, so
    that two owners' sessions of one id never reach it as one (whichever rule found
    the session, even an id the proxy generated: a client may send any id back)."""
    data = (
        owner.encode("utf-8", "surrogateescape")
        + b"\0"
        + session_id.encode("utf-8", "surrogateescape")
    )
    return ID_PREFIX + hashlib.sha256(data).hexdigest()[:32]


def client_session_id(value: Any, param: str) -> str:
    """A session id the client named, checked: 400 unless it is a safe id."""
    if not isinstance(value, str) or not SAFE_ID.match(value):
        raise bad_request(
            f"`{param}` must be 1 to 128 letters, digits, '.', '_', ':' or '-'.",
            param=param,
            code="invalid_session_id",
        )
    return value
