"""The session store protocol and the records that cross it.

A session belongs to an owner (the API key id, or `ip:ADDR` without auth): every
method takes the owner, and the same session id under two owners is two sessions.
Writes come from one background writer per process, in batches; reads come from the
request path (`find_session`, one round trip) and from the Sessions API.

Stored responses (the Responses API's `store`, `previous_response_id` and
GET/DELETE /v1/responses/{id}) live in the same store, per owner too, and go with the
session they belong to: deleting or purging a session deletes its responses.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import orjson

from proxy import jsonfast


class UnknownCursor(LookupError):
    """`after` names a session the owner does not have."""


@dataclass(slots=True)
class Session:
    """A session as stored: its counters, and its turns when asked for."""

    id: str
    created: float
    updated: float
    source: str
    key_id: str | None
    model: str | None
    turn_count: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    turns: list[dict[str, Any]] | None = None


@dataclass(slots=True)
class TurnRecord:
    """One completed turn to append to a session (created by the write if absent).

    `opening` replaces the turn's messages when this write creates the session, so
    the first turn of a session named by the client keeps the whole context it was
    started with. `digests` index the conversation as it stands after the turn, for
    continuation; a digest always points to the session that wrote it last.
    """

    owner: str
    session_id: str
    at: float
    source: str
    key_id: str | None
    model: str | None
    turn: dict[str, Any]
    opening: list[Any] | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    digests: tuple[str, ...] = ()
    # how long an index entry is worth keeping (Redis expires it; None: forever)
    digest_ttl: float | None = None
    # the turn and the opening turn as JSON text, when the caller wrote them already
    # (the session middleware takes its snapshot of the request that way): a store
    # keeps this text, or what it reads back, rather than `turn`, which may then share
    # objects with the request
    text: str | None = None
    first_text: str | None = None
    # who wrote the turn and its number in that writer's order: a store that cannot
    # write a batch atomically (Redis) records the last number per writer in the
    # session and skips a turn it already holds, so that a batch retried after a
    # failure half-way never duplicates a turn ("": no such guard)
    writer: str = ""
    seq: int = 0

    def first_turn(self) -> dict[str, Any]:
        if self.opening is None:
            return self.turn
        return {**self.turn, "messages": self.opening}

    def first_turn_text(self) -> str | None:
        """`text` of `first_turn()`."""
        return self.text if self.opening is None else self.first_text


def plain_json(value: Any) -> bool:
    """Whether a tree holds only dicts, lists, strings, integers, booleans, None and
    finite floats: what orjson writes as the standard encoder does (it writes NaN as
    null, and objects the standard encoder refuses, such as datetimes, as it likes)."""
    return jsonfast.plain_tree(value) is True


def json_text(value: Any) -> str | None:
    """orjson's compact text of a plain JSON tree, which reads back as the standard
    encoder's would; None for any other value (NaN, an integer beyond 64 bits, a lone
    surrogate, a key that is not a string, an object that is not JSON)."""
    if plain_json(value):
        try:
            return orjson.dumps(value).decode()
        except TypeError:
            pass
    return None


@dataclass(frozen=True, slots=True)
class StoredResponse:
    """A response kept for GET /v1/responses/{id} and `previous_response_id`.

    The store keeps both texts as given and returns them character for character; the
    caller bounds their size."""

    id: str  # resp_...
    owner: str
    created: float  # Unix time
    # the session it belongs to (a conversation continued by previous_response_id is
    # the same session); None: none
    session_id: str | None
    # the Response object, JSON text, as GET returns it
    response: str
    # JSON text: the chat messages a later previous_response_id continues from
    messages: str


@dataclass(slots=True)
class Page:
    data: list[Session] = field(default_factory=list)
    has_more: bool = False


class SessionStore(Protocol):
    """What the session middleware and the Sessions API need of a store."""

    async def find_session(self, owner: str, digest: str) -> str | None:
        """The id of the owner's existing session indexed under `digest`, if any."""
        ...

    async def record_turns(self, records: Sequence[TurnRecord]) -> None:
        """Append each turn to its session, atomically per turn."""
        ...

    async def get_session(self, owner: str, session_id: str) -> Session | None:
        """One session with its turns, oldest turn first."""
        ...

    async def list_sessions(self, owner: str, limit: int, after: str | None = None) -> Page:
        """The owner's sessions, most recently updated first (ties: higher id first),
        starting after the session `after`; raises UnknownCursor if it is not one."""
        ...

    async def delete_session(self, owner: str, session_id: str) -> bool:
        """Remove a session, its turns, its index entries and the owner's stored
        responses of that session (its history is gone, so is what continues it);
        False if the session was absent (its responses, if any, are removed all the
        same)."""
        ...

    async def purge(self, before: float) -> int:
        """Remove every session not updated since `before` (Unix time), with its
        responses, and every stored response created before `before`; how many
        sessions."""
        ...

    async def put_response(self, record: StoredResponse) -> None:
        """Keep a response under (owner, id), replacing one the owner has by that id."""
        ...

    async def get_response(self, owner: str, response_id: str) -> StoredResponse | None:
        """The owner's response by that id; None if unknown or another owner's."""
        ...

    async def delete_response(self, owner: str, response_id: str) -> bool:
        """Remove the owner's response by that id, and nothing else (its session stays);
        False if the owner has none by that id."""
        ...

    async def ping(self) -> bool: ...

    async def close(self) -> None: ...


def session_from_row(row: dict[str, Any], session_id: str) -> Session:
    """A Session from string-valued fields (Redis hashes)."""

    def num(name: str) -> int:
        try:
            return int(row.get(name) or 0)
        except ValueError:
            return 0

    return Session(
        id=session_id,
        created=float(row.get("created") or 0),
        updated=float(row.get("updated") or 0),
        source=str(row.get("source") or "new"),
        key_id=row.get("key_id") or None,
        model=row.get("model") or None,
        turn_count=num("turn_count"),
        prompt_tokens=num("prompt_tokens"),
        completion_tokens=num("completion_tokens"),
        total_tokens=num("total_tokens"),
    )
