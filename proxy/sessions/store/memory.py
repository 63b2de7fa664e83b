"""Sessions and stored responses in process memory: for tests, demos and
single-process deployments that do not need them to survive a restart.

Kept out of the cyclic collector's walk: a session's turns are JSON text (strings
are not tracked), so a session costs the collector a few containers however long it
is, not a tree of dicts per message. Bounded: at most `max_sessions` sessions, the
least recently updated evicted first (with one log line per eviction round), and at
most MAX_RESPONSES stored responses, the oldest first; and by the retention purge."""

from __future__ import annotations

import json
import logging
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import replace

from proxy.sessions.store.base import Page, Session, StoredResponse, TurnRecord, UnknownCursor

Key = tuple[str, str]


# stored responses one memory store holds at most
MAX_RESPONSES = 10_000
MAX_SESSIONS = 100_000

log = logging.getLogger("chat_proxy.sessions")


class MemoryStore:
    def __init__(self, max_sessions: int = MAX_SESSIONS) -> None:
        self.max_sessions = max_sessions
        # least recently updated first; each session's turns as JSON text
        self._sessions: OrderedDict[Key, Session] = OrderedDict()
        self._turns: dict[Key, list[str]] = {}
        self.evicted = 0
        self._index: dict[Key, str] = {}  # (owner, digest) -> session id
        self._digests: dict[Key, set[str]] = {}  # (owner, session id) -> its digests
        self._responses: dict[Key, StoredResponse] = {}  # (owner, response id)
        # (owner, session id) -> the ids of its stored responses
        self._session_responses: dict[Key, set[str]] = {}

    async def find_session(self, owner: str, digest: str) -> str | None:
        sid = self._index.get((owner, digest))
        if sid is None or (owner, sid) not in self._sessions:
            return None
        return sid

    async def record_turns(self, records: Sequence[TurnRecord]) -> None:
        for rec in records:
            key = (rec.owner, rec.session_id)
            session = self._sessions.get(key)
            if session is None:
                session = Session(
                    id=rec.session_id,
                    created=rec.at,
                    updated=rec.at,
                    source=rec.source,
                    key_id=rec.key_id,
                    model=rec.model,
                )
                self._sessions[key] = session
                self._turns[key] = []
                turn = rec.first_turn()
                text = rec.first_turn_text()
            else:
                self._sessions.move_to_end(key)
                turn = rec.turn
                text = rec.text
            session.updated = max(session.updated, rec.at)
            session.source = rec.source
            if rec.model:
                session.model = rec.model
            session.turn_count += 1
            session.prompt_tokens += rec.prompt_tokens
            session.completion_tokens += rec.completion_tokens
            session.total_tokens += rec.total_tokens
            # (no text: values only the standard encoder writes faithfully, such as
            # NaN or an integer beyond 64 bits)
            self._turns[key].append(text if text is not None else json.dumps(turn))
            for digest in rec.digests:
                self._index[(rec.owner, digest)] = rec.session_id
                self._digests.setdefault(key, set()).add(digest)
        if len(self._sessions) > self.max_sessions:
            self._evict()

    def _evict(self) -> None:
        n = 0
        while len(self._sessions) > self.max_sessions:
            owner, sid = next(iter(self._sessions))
            self._drop_session(owner, sid)
            n += 1
        self.evicted += n
        log.info(
            "memory store full: evicted %d least recently updated session(s)",
            n,
            extra={"max_sessions": self.max_sessions},
        )

    async def get_session(self, owner: str, session_id: str) -> Session | None:
        key = (owner, session_id)
        session = self._sessions.get(key)
        if session is None:
            return None
        # the standard parser: it reads integers beyond 64 bits exactly (orjson does not)
        turns = [json.loads(t) for t in self._turns.get(key, ())]
        return replace(session, turns=turns)

    async def list_sessions(self, owner: str, limit: int, after: str | None = None) -> Page:
        mine = [s for (o, _), s in self._sessions.items() if o == owner]
        mine.sort(key=lambda s: (s.updated, s.id), reverse=True)
        start = 0
        if after is not None:
            ids = [s.id for s in mine]
            if after not in ids:
                raise UnknownCursor(after)
            start = ids.index(after) + 1
        chunk = mine[start : start + limit]
        return Page([replace(s, turns=None) for s in chunk], start + limit < len(mine))

    async def delete_session(self, owner: str, session_id: str) -> bool:
        return self._drop_session(owner, session_id)

    def _drop_session(self, owner: str, session_id: str) -> bool:
        key = (owner, session_id)
        for rid in self._session_responses.pop(key, set()):
            self._responses.pop((owner, rid), None)
        self._turns.pop(key, None)
        if self._sessions.pop(key, None) is None:
            return False
        for digest in self._digests.pop(key, set()):
            if self._index.get((owner, digest)) == session_id:
                del self._index[(owner, digest)]
        return True

    async def purge(self, before: float) -> int:
        old = [key for key, s in self._sessions.items() if s.updated < before]
        for owner, sid in old:
            self._drop_session(owner, sid)
        for owner, rid in [k for k, r in self._responses.items() if r.created < before]:
            self._drop_response(owner, rid)
        return len(old)

    # -- stored responses --

    def _drop_response(self, owner: str, response_id: str) -> bool:
        record = self._responses.pop((owner, response_id), None)
        if record is None:
            return False
        if record.session_id is not None:
            ids = self._session_responses.get((owner, record.session_id))
            if ids is not None:
                ids.discard(response_id)
                if not ids:
                    del self._session_responses[(owner, record.session_id)]
        return True

    async def put_response(self, record: StoredResponse) -> None:
        self._drop_response(record.owner, record.id)
        self._responses[(record.owner, record.id)] = record
        # bounded: the oldest go first (the dict keeps the order they came in)
        while len(self._responses) > MAX_RESPONSES:
            owner, rid = next(iter(self._responses))
            self._drop_response(owner, rid)
        if record.session_id is not None:
            key = (record.owner, record.session_id)
            self._session_responses.setdefault(key, set()).add(record.id)

    async def get_response(self, owner: str, response_id: str) -> StoredResponse | None:
        return self._responses.get((owner, response_id))

    async def delete_response(self, owner: str, response_id: str) -> bool:
        return self._drop_response(owner, response_id)

    async def ping(self) -> bool:
        return True

    async def close(self) -> None:
        return None
