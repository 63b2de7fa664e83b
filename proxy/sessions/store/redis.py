"""Sessions and stored responses in Redis, shared by every replica and worker
(redis.asyncio).

Keys, under the configured prefix P, with O a digest of the owner (so that any owner
string makes a safe key part):

- `P session:O:ID`   hash of the session's fields and counters
- `P turns:O:ID`     list of turns (JSON), oldest first
- `P digests:O:ID`   set of the history digests that point to the session
- `P history:O:D`    string: the session id indexed under digest D (expires with retention)
- `P sessions:O`     sorted set of the owner's session ids by last update
- `P sessions`       sorted set of `O:ID` by last update (for the retention purge)
- `P response:O:RID` hash of a stored response: created, session_id (absent: none),
                     response, messages
- `P session-responses:O:ID`  set of the ids of the session's stored responses
- `P responses`      sorted set of `O:RID` by creation (for the retention purge)

Like sessions, responses carry no TTL: the retention purge removes them. Recording a
turn, deleting a session and putting or deleting a response are Lua scripts, one round
trip each: each is atomic, so replicas writing to one session concurrently never lose
a turn or a token, and a response and its index entries never disagree. The scripts build
some key names from the prefix, which suits one Redis server or a replicated pair,
not Redis Cluster.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Any

import redis.asyncio as aioredis

from proxy.sessions.store.base import (
    Page,
    Session,
    StoredResponse,
    TurnRecord,
    UnknownCursor,
    session_from_row,
)

_FIND = """
local sid = redis.call('GET', KEYS[1])
if sid and redis.call('EXISTS', ARGV[1] .. sid) == 1 then return sid end
return false
"""

# KEYS: session, turns, digests, owner's sessions, all sessions
# ARGV: 1 id, 2 at, 3 source, 4 key_id, 5 model, 6-8 usage, 9 turn, 10 first turn,
#       11 member of all sessions, 12 history key prefix, 13 ttl seconds (0: none),
#       14 writer field ('' for none), 15 the turn's number in that writer's order,
#       16.. digests
# A turn whose number is not above the last one its writer recorded in the session
# is one already written (a batch retried after a failure): skipped, returns -1.
_RECORD = """
if ARGV[14] ~= '' then
  local last = redis.call('HGET', KEYS[1], ARGV[14])
  if last and tonumber(last) >= tonumber(ARGV[15]) then return -1 end
end
local created = 0
if redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('HSET', KEYS[1], 'created', ARGV[2], 'updated', ARGV[2], 'source', ARGV[3],
    'key_id', ARGV[4], 'model', ARGV[5], 'turn_count', 0, 'prompt_tokens', 0,
    'completion_tokens', 0, 'total_tokens', 0)
  created = 1
end
local updated = redis.call('HGET', KEYS[1], 'updated')
if tonumber(ARGV[2]) > tonumber(updated) then
  updated = ARGV[2]
  redis.call('HSET', KEYS[1], 'updated', updated)
end
redis.call('HSET', KEYS[1], 'source', ARGV[3])
if ARGV[5] ~= '' then redis.call('HSET', KEYS[1], 'model', ARGV[5]) end
redis.call('HINCRBY', KEYS[1], 'turn_count', 1)
redis.call('HINCRBY', KEYS[1], 'prompt_tokens', ARGV[6])
redis.call('HINCRBY', KEYS[1], 'completion_tokens', ARGV[7])
redis.call('HINCRBY', KEYS[1], 'total_tokens', ARGV[8])
if created == 1 then
  redis.call('RPUSH', KEYS[2], ARGV[10])
else
  redis.call('RPUSH', KEYS[2], ARGV[9])
end
redis.call('ZADD', KEYS[4], updated, ARGV[1])
redis.call('ZADD', KEYS[5], updated, ARGV[11])
if ARGV[14] ~= '' then redis.call('HSET', KEYS[1], ARGV[14], ARGV[15]) end
local ttl = tonumber(ARGV[13])
for i = 16, #ARGV do
  local key = ARGV[12] .. ARGV[i]
  if ttl > 0 then
    redis.call('SET', key, ARGV[1], 'EX', ttl)
  else
    redis.call('SET', key, ARGV[1])
  end
  redis.call('SADD', KEYS[3], ARGV[i])
end
return created
"""

# KEYS: session, turns, digests, owner's sessions, all sessions, the session's
#       responses, all responses
# ARGV: 1 id, 2 member of all sessions, 3 history key prefix, 4 response key prefix,
#       5 the owner's part of a member of all responses ('O:')
_DELETE = """
local existed = redis.call('DEL', KEYS[1])
redis.call('DEL', KEYS[2])
for _, digest in ipairs(redis.call('SMEMBERS', KEYS[3])) do
  local key = ARGV[3] .. digest
  if redis.call('GET', key) == ARGV[1] then redis.call('DEL', key) end
end
redis.call('DEL', KEYS[3])
redis.call('ZREM', KEYS[4], ARGV[1])
redis.call('ZREM', KEYS[5], ARGV[2])
for _, rid in ipairs(redis.call('SMEMBERS', KEYS[6])) do
  redis.call('DEL', ARGV[4] .. rid)
  redis.call('ZREM', KEYS[7], ARGV[5] .. rid)
end
redis.call('DEL', KEYS[6])
return existed
"""

# KEYS: response, all responses
# ARGV: 1 response id, 2 member of all responses, 3 created, 4 session id,
#       5 '1' if there is a session, 6 response, 7 messages,
#       8 the owner's session-responses key prefix
# A response put again under its id leaves the set of the session it was in before.
_PUT_RESPONSE = """
local old = redis.call('HGET', KEYS[1], 'session_id')
if old and (ARGV[5] ~= '1' or old ~= ARGV[4]) then
  redis.call('SREM', ARGV[8] .. old, ARGV[1])
end
redis.call('HSET', KEYS[1], 'created', ARGV[3], 'response', ARGV[6], 'messages', ARGV[7])
if ARGV[5] == '1' then
  redis.call('HSET', KEYS[1], 'session_id', ARGV[4])
  redis.call('SADD', ARGV[8] .. ARGV[4], ARGV[1])
else
  redis.call('HDEL', KEYS[1], 'session_id')
end
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[2])
return 1
"""

# KEYS: response, all responses
# ARGV: 1 response id, 2 member of all responses, 3 the owner's session-responses
#       key prefix
_DELETE_RESPONSE = """
local sid = redis.call('HGET', KEYS[1], 'session_id')
local existed = redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], ARGV[2])
if sid then redis.call('SREM', ARGV[3] .. sid, ARGV[1]) end
return existed
"""


def _owner_key(owner: str) -> str:
    return hashlib.sha256(owner.encode("utf-8", "surrogateescape")).hexdigest()[:32]


class RedisStore:
    def __init__(self, url: str, prefix: str, pool: aioredis.ConnectionPool | None = None) -> None:
        """On `pool` when the application shares one (proxy/shared_redis.py); a
        client of its own otherwise."""
        self.prefix = prefix
        self._r: aioredis.Redis = (
            aioredis.Redis(connection_pool=pool)
            if pool is not None
            else aioredis.from_url(
                url, decode_responses=True, socket_connect_timeout=5, socket_timeout=10
            )
        )
        self._find = self._r.register_script(_FIND)
        self._record = self._r.register_script(_RECORD)
        self._delete = self._r.register_script(_DELETE)
        self._put_response = self._r.register_script(_PUT_RESPONSE)
        self._delete_response = self._r.register_script(_DELETE_RESPONSE)

    def _keys(self, o: str, sid: str) -> list[str]:
        p = self.prefix
        return [
            f"{p}session:{o}:{sid}",
            f"{p}turns:{o}:{sid}",
            f"{p}digests:{o}:{sid}",
            f"{p}sessions:{o}",
            f"{p}sessions",
        ]

    async def find_session(self, owner: str, digest: str) -> str | None:
        o = _owner_key(owner)
        found = await self._find(
            keys=[f"{self.prefix}history:{o}:{digest}"], args=[f"{self.prefix}session:{o}:"]
        )
        return str(found) if found else None

    async def record_turns(self, records: Sequence[TurnRecord]) -> None:
        if not records:
            return
        async with self._r.pipeline(transaction=False) as pipe:
            for rec in records:
                o = _owner_key(rec.owner)
                turn = (
                    rec.text if rec.text is not None else json.dumps(rec.turn, ensure_ascii=False)
                )
                if rec.opening is None:
                    first = turn
                elif rec.first_text is not None:
                    first = rec.first_text
                else:
                    first = json.dumps(rec.first_turn(), ensure_ascii=False)
                ttl = max(1, int(rec.digest_ttl)) if rec.digest_ttl else 0
                args: list[Any] = [
                    rec.session_id,
                    repr(rec.at),
                    rec.source,
                    rec.key_id or "",
                    rec.model or "",
                    rec.prompt_tokens,
                    rec.completion_tokens,
                    rec.total_tokens,
                    turn,
                    first,
                    f"{o}:{rec.session_id}",
                    f"{self.prefix}history:{o}:",
                    ttl,
                    rec.writer,
                    rec.seq,
                    *rec.digests,
                ]
                await self._record(keys=self._keys(o, rec.session_id), args=args, client=pipe)
            await pipe.execute()

    async def get_session(self, owner: str, session_id: str) -> Session | None:
        keys = self._keys(_owner_key(owner), session_id)
        async with self._r.pipeline(transaction=True) as pipe:
            pipe.hgetall(keys[0])
            pipe.lrange(keys[1], 0, -1)
            row, turns = await pipe.execute()
        if not row:
            return None
        session = session_from_row(row, session_id)
        session.turns = [json.loads(t) for t in turns]
        return session

    async def list_sessions(self, owner: str, limit: int, after: str | None = None) -> Page:
        o = _owner_key(owner)
        index = f"{self.prefix}sessions:{o}"
        start = 0
        if after is not None:
            rank: Any = await self._r.zrevrank(index, after)
            if rank is None:
                raise UnknownCursor(after)
            start = int(rank) + 1
        ids = [str(m) for m in await self._r.zrevrange(index, start, start + limit)]
        if not ids:
            return Page()
        async with self._r.pipeline(transaction=False) as pipe:
            for sid in ids[:limit]:
                pipe.hgetall(f"{self.prefix}session:{o}:{sid}")
            rows = await pipe.execute()
        data = [session_from_row(row, sid) for sid, row in zip(ids, rows, strict=False) if row]
        return Page(data, len(ids) > limit)

    async def _delete_many(self, pairs: Sequence[tuple[str, str]]) -> int:
        if not pairs:
            return 0
        p = self.prefix
        async with self._r.pipeline(transaction=False) as pipe:
            for o, sid in pairs:
                await self._delete(
                    keys=[*self._keys(o, sid), f"{p}session-responses:{o}:{sid}", f"{p}responses"],
                    args=[sid, f"{o}:{sid}", f"{p}history:{o}:", f"{p}response:{o}:", f"{o}:"],
                    client=pipe,
                )
            results = await pipe.execute()
        return sum(1 for r in results if int(r) > 0)

    async def delete_session(self, owner: str, session_id: str) -> bool:
        return await self._delete_many([(_owner_key(owner), session_id)]) > 0

    async def purge(self, before: float) -> int:
        total = 0
        while True:
            members = [
                str(m)
                for m in await self._r.zrangebyscore(
                    f"{self.prefix}sessions", "-inf", f"({before!r}", start=0, num=500
                )
            ]
            if not members:
                break
            pairs = [(m.partition(":")[0], m.partition(":")[2]) for m in members]
            total += await self._delete_many(pairs)
        while True:
            members = [
                str(m)
                for m in await self._r.zrangebyscore(
                    f"{self.prefix}responses", "-inf", f"({before!r}", start=0, num=500
                )
            ]
            if not members:
                return total
            async with self._r.pipeline(transaction=False) as pipe:
                for m in members:
                    o, _, rid = m.partition(":")
                    await self._delete_response(
                        keys=self._response_keys(o, rid),
                        args=[rid, m, f"{self.prefix}session-responses:{o}:"],
                        client=pipe,
                    )
                await pipe.execute()

    # -- stored responses --

    def _response_keys(self, o: str, response_id: str) -> list[str]:
        return [f"{self.prefix}response:{o}:{response_id}", f"{self.prefix}responses"]

    async def put_response(self, record: StoredResponse) -> None:
        o = _owner_key(record.owner)
        await self._put_response(
            keys=self._response_keys(o, record.id),
            args=[
                record.id,
                f"{o}:{record.id}",
                repr(float(record.created)),
                record.session_id or "",
                "1" if record.session_id is not None else "0",
                record.response,
                record.messages,
                f"{self.prefix}session-responses:{o}:",
            ],
        )

    async def get_response(self, owner: str, response_id: str) -> StoredResponse | None:
        row: Any = await self._r.hgetall(f"{self.prefix}response:{_owner_key(owner)}:{response_id}")
        if not row or "response" not in row:
            return None
        return StoredResponse(
            id=response_id,
            owner=owner,
            created=float(row.get("created") or 0),
            session_id=None if row.get("session_id") is None else str(row["session_id"]),
            response=str(row["response"]),
            messages=str(row.get("messages", "")),
        )

    async def delete_response(self, owner: str, response_id: str) -> bool:
        o = _owner_key(owner)
        existed = await self._delete_response(
            keys=self._response_keys(o, response_id),
            args=[response_id, f"{o}:{response_id}", f"{self.prefix}session-responses:{o}:"],
        )
        return int(existed) > 0

    async def ping(self) -> bool:
        return bool(await self._r.ping())

    async def close(self) -> None:
        await self._r.aclose()
