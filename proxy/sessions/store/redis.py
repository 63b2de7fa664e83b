"""Sessions and stored responses in Redis, shared by every replica and worker
(redis.asyncio): one server, a master found through Redis Sentinel, or a Redis Cluster
(proxy/shared_redis.py).

Keys, under the configured prefix P, with O a digest of the owner (so that any owner
string makes a safe key part) and T the owner's part of a key: O itself on one server
or a Sentinel-managed master (the names as they always were), `{O}` on a cluster (a
hash tag, so that all of an owner's keys share a hash slot):

- `P session:T:ID`   hash of the session's fields and counters (and, per writer, the
                     number of the last turn it recorded: the retry guard)
- `P turns:T:ID`     list of turns (JSON), oldest first
- `P digests:T:ID`   set of the history digests that point to the session
- `P history:T:D`    string: the session id indexed under digest D (expires with retention)
- `P sessions:T`     sorted set of the owner's session ids by last update
- `P response:T:RID` hash of a stored response: created, session_id (absent: none),
                     response, messages
- `P session-responses:T:ID`  set of the ids of the session's stored responses
- `P sessions`       sorted set of `O:ID` by last update (for the retention purge)
- `P responses`      sorted set of `O:RID` by creation (for the retention purge)

Like sessions, responses carry no TTL: the retention purge removes them. Recording a
turn, deleting a session and putting or deleting a response are Lua scripts, one each,
over the owner's keys only: each is atomic, so replicas writing to one session
concurrently never lose a turn or a token, and a response and its session's set never
disagree; on a cluster each runs on the node of the owner's slot. The two purge
indexes span owners, so they are updated by commands of their own in the same round
trip (the scripts could not reach them on a cluster): an entry may briefly lag its
session, and the purge allows for that (it deletes a session only if it is still older
than the cut-off, and removes an entry only if nobody moved it meanwhile).

Through Sentinel a batch of turns is acknowledged once a replica has it too (WAIT, 50 ms
at most), so that a failover right after does not lose it; without a replica in reach
it is acknowledged on the master's word alone.

Why one module of over 400 lines: the Redis store's keys, its Lua scripts and the
calls that send them are read together (a key's shape and a script's arguments
change as one).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio import RedisCluster
from redis.asyncio.sentinel import SentinelConnectionPool
from redis.commands.core import AsyncScript
from redis.exceptions import (
    BusyLoadingError,
    ClusterDownError,
    NoScriptError,
    ReadOnlyError,
    RedisClusterException,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from proxy.sessions.store.base import (
    Page,
    Session,
    StoredResponse,
    TurnRecord,
    UnknownCursor,
    session_from_row,
)
from proxy.shared_redis import SharedRedis, client_for, close_pool, send_scripts

_FIND = """
local sid = redis.call('GET', KEYS[1])
if sid and redis.call('EXISTS', ARGV[1] .. sid) == 1 then return sid end
return false
"""

# KEYS: session, turns, digests, owner's sessions
# ARGV: 1 id, 2 at, 3 source, 4 key_id, 5 model, 6-8 usage, 9 turn, 10 first turn,
#       11 (unused), 12 history key prefix, 13 ttl seconds (0: none),
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

# KEYS: session, turns, digests, owner's sessions, the session's responses
# ARGV: 1 id, 2 history key prefix, 3 response key prefix, 4 cut-off ('': none)
# Returns {1 or 0: whether the session existed, the ids of the responses deleted}, or
# {2, updated} for a session updated since the cut-off (left alone).
_DELETE = """
if ARGV[4] ~= '' then
  local updated = redis.call('HGET', KEYS[1], 'updated')
  if updated and tonumber(updated) >= tonumber(ARGV[4]) then return {2, updated} end
end
local existed = redis.call('DEL', KEYS[1])
redis.call('DEL', KEYS[2])
for _, digest in ipairs(redis.call('SMEMBERS', KEYS[3])) do
  local key = ARGV[2] .. digest
  if redis.call('GET', key) == ARGV[1] then redis.call('DEL', key) end
end
redis.call('DEL', KEYS[3])
redis.call('ZREM', KEYS[4], ARGV[1])
local out = {existed}
for _, rid in ipairs(redis.call('SMEMBERS', KEYS[5])) do
  redis.call('DEL', ARGV[3] .. rid)
  out[#out + 1] = rid
end
redis.call('DEL', KEYS[5])
return out
"""

# KEYS: response
# ARGV: 1 response id, 2 created, 3 session id, 4 '1' if there is a session,
#       5 response, 6 messages, 7 the owner's session-responses key prefix
# A response put again under its id leaves the set of the session it was in before.
_PUT_RESPONSE = """
local old = redis.call('HGET', KEYS[1], 'session_id')
if old and (ARGV[4] ~= '1' or old ~= ARGV[3]) then
  redis.call('SREM', ARGV[7] .. old, ARGV[1])
end
redis.call('HSET', KEYS[1], 'created', ARGV[2], 'response', ARGV[5], 'messages', ARGV[6])
if ARGV[4] == '1' then
  redis.call('HSET', KEYS[1], 'session_id', ARGV[3])
  redis.call('SADD', ARGV[7] .. ARGV[3], ARGV[1])
else
  redis.call('HDEL', KEYS[1], 'session_id')
end
return 1
"""

# KEYS: response
# ARGV: 1 response id, 2 the owner's session-responses key prefix, 3 cut-off ('': none)
# Returns 1 or 0 (whether it existed), or {2, created} for a response created since
# the cut-off (left alone).
_DELETE_RESPONSE = """
if ARGV[3] ~= '' then
  local created = redis.call('HGET', KEYS[1], 'created')
  if created and tonumber(created) >= tonumber(ARGV[3]) then return {2, created} end
end
local sid = redis.call('HGET', KEYS[1], 'session_id')
local existed = redis.call('DEL', KEYS[1])
if sid then redis.call('SREM', ARGV[2] .. sid, ARGV[1]) end
return existed
"""

# the purge indexes, one key each
# KEYS: index; ARGV: member, score: raise the member's score to `score`
_RAISE = """
local s = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not s or tonumber(s) < tonumber(ARGV[2]) then
  redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1])
end
return 1
"""
# KEYS: index; ARGV: member, score: remove the member if its score is still `score`
_UNINDEX = """
local s = redis.call('ZSCORE', KEYS[1], ARGV[1])
if s and tonumber(s) == tonumber(ARGV[2]) then redis.call('ZREM', KEYS[1], ARGV[1]) end
return 1
"""

_SCRIPTS = (_FIND, _RECORD, _DELETE, _PUT_RESPONSE, _DELETE_RESPONSE, _RAISE, _UNINDEX)

PURGE_PAGE = 500  # index entries a purge takes at a time
REPLICA_WAIT_MS = 50  # through Sentinel: how long a batch waits for a replica's copy

# what Redis answers while it cannot take a write that will succeed later: gone,
# restarting, a master demoted, a cluster reshaping
UNAVAILABLE = (
    RedisConnectionError,
    RedisTimeoutError,
    BusyLoadingError,
    ReadOnlyError,
    ClusterDownError,
    TryAgainError,
    RedisClusterException,
    OSError,
    TimeoutError,
)


def _owner_key(owner: str) -> str:
    return hashlib.sha256(owner.encode("utf-8", "surrogateescape")).hexdigest()[:32]


def _split(member: str) -> tuple[str, str]:
    """`O:ID` of a purge index: the owner's digest and the id."""
    o, _, rest = member.partition(":")
    return o, rest


Pipe = Any  # a redis.asyncio Pipeline or ClusterPipeline


class RedisStore:
    def __init__(
        self,
        url: str,
        prefix: str,
        pool: SharedRedis | None = None,
        *,
        owns_pool: bool = False,
    ) -> None:
        """On `pool` when the application shares one (proxy/shared_redis.py), which
        this store closes only if `owns_pool`; a client of its own on `url` otherwise."""
        self.prefix = prefix
        self._pool = pool if owns_pool else None
        self._r: Any = (
            client_for(pool)
            if pool is not None
            else aioredis.from_url(
                url, decode_responses=True, socket_connect_timeout=5, socket_timeout=10
            )
        )
        # the client closes only a client of its own (a cluster's is the shared one)
        self._closes_client = pool is None or not isinstance(pool, RedisCluster)
        self.cluster = isinstance(self._r, RedisCluster)
        # through Sentinel a batch waits for a replica's copy (see the module's doc)
        self.wait_replica = isinstance(pool, SentinelConnectionPool)
        self._scripts_loaded = False
        self._find = self._r.register_script(_FIND)
        self._record = self._r.register_script(_RECORD)
        self._delete = self._r.register_script(_DELETE)
        self._put_response = self._r.register_script(_PUT_RESPONSE)
        self._delete_response = self._r.register_script(_DELETE_RESPONSE)
        self._raise = self._r.register_script(_RAISE)
        self._unindex = self._r.register_script(_UNINDEX)
        self._texts = {sc.sha: sc.script for sc in (self._find, self._record, self._raise)}
        # the session middleware's: which lookup a request will make, so that the
        # rate limiter sends it with its check (proxy/sessions/middleware.py)
        self.lookahead: Callable[[Any], tuple[str, str] | None] | None = None

    # -- keys --

    def _tag(self, o: str) -> str:
        """The owner's part of a key: a hash tag on a cluster (one slot per owner)."""
        return f"{{{o}}}" if self.cluster else o

    def _keys(self, o: str, sid: str) -> list[str]:
        p, t = self.prefix, self._tag(o)
        return [
            f"{p}session:{t}:{sid}",
            f"{p}turns:{t}:{sid}",
            f"{p}digests:{t}:{sid}",
            f"{p}sessions:{t}",
        ]

    def _history(self, o: str) -> str:
        return f"{self.prefix}history:{self._tag(o)}:"

    def _response_key(self, o: str, response_id: str) -> str:
        return f"{self.prefix}response:{self._tag(o)}:{response_id}"

    def _session_responses(self, o: str) -> str:
        return f"{self.prefix}session-responses:{self._tag(o)}:"

    @property
    def _all_sessions(self) -> str:
        return f"{self.prefix}sessions"

    @property
    def _all_responses(self) -> str:
        return f"{self.prefix}responses"

    # -- scripts in pipelines --

    async def _eval(
        self, pipe: Pipe, script: AsyncScript, keys: list[str], args: list[Any]
    ) -> None:
        """Queue a script in a pipeline as a raw EVALSHA: redis-py's cluster pipeline
        refuses evalsha, and its other pipelines ask SCRIPT EXISTS first (a round trip
        more per batch). The scripts are loaded once beforehand, and again when a
        server answers NOSCRIPT (`_pipeline`)."""
        pipe.execute_command("EVALSHA", script.sha, len(keys), *keys, *args)

    async def _load_scripts(self) -> None:
        for text in _SCRIPTS:
            await self._r.script_load(text)  # on a cluster: on every master
        self._scripts_loaded = True

    async def _pipeline(self, fill: Callable[[Pipe], Awaitable[None]]) -> list[Any]:
        """Run the commands `fill` queues in one round trip (one per node on a
        cluster); every script here may run twice (a master that restarted or was
        promoted lacks the scripts: they are loaded and the pipeline sent again)."""
        for attempt in range(2):
            if not self._scripts_loaded:
                await self._load_scripts()
            async with self._r.pipeline(transaction=False) as pipe:
                await fill(pipe)
                try:
                    result: list[Any] = await pipe.execute()
                    return result
                except NoScriptError:
                    # a server restarted, flushed its scripts or was promoted
                    if attempt:
                        raise
                    self._scripts_loaded = False
        raise AssertionError("unreachable")

    # -- the store --

    def unavailable(self, exc: BaseException) -> bool:
        """Whether `exc` says Redis cannot take writes now but will (the writer keeps
        the turns and tries again) rather than that this write is wrong."""
        return isinstance(exc, UNAVAILABLE)

    async def find_session(self, owner: str, digest: str) -> str | None:
        script, keys, args = self.find_call(owner, digest)
        if self.cluster:
            found = await script(keys=keys, args=args)
        else:
            (found,) = await self._send([("EVALSHA", script.sha, len(keys), *keys, *args)])
        return str(found) if found else None

    def find_call(self, owner: str, digest: str) -> tuple[AsyncScript, list[str], list[str]]:
        """The script, keys and arguments of `find_session`, for a caller that sends
        it in a round trip of its own (the rate limiter's check: proxy/ratelimit/
        redis.py). Its answer: the session id, or None (nil)."""
        o = _owner_key(owner)
        return self._find, [self._history(o) + digest], [self._keys(o, "")[0]]

    async def record_turns(self, records: Sequence[TurnRecord]) -> None:
        if not records:
            return
        commands: list[tuple[Any, ...]] = []
        for rec in records:
            o = _owner_key(rec.owner)
            turn = rec.text if rec.text is not None else json.dumps(rec.turn, ensure_ascii=False)
            if rec.opening is None:
                first = turn
            elif rec.first_text is not None:
                first = rec.first_text
            else:
                first = json.dumps(rec.first_turn(), ensure_ascii=False)
            ttl = max(1, int(rec.digest_ttl)) if rec.digest_ttl else 0
            at = repr(rec.at)
            keys = self._keys(o, rec.session_id)
            commands.append(
                (
                    "EVALSHA",
                    self._record.sha,
                    len(keys),
                    *keys,
                    rec.session_id,
                    at,
                    rec.source,
                    rec.key_id or "",
                    rec.model or "",
                    rec.prompt_tokens,
                    rec.completion_tokens,
                    rec.total_tokens,
                    turn,
                    first,
                    "",
                    self._history(o),
                    ttl,
                    rec.writer,
                    rec.seq,
                    *rec.digests,
                )
            )
            # the purge index, after the turn: as late as the session or later
            commands.append(
                ("EVALSHA", self._raise.sha, 1, self._all_sessions, f"{o}:{rec.session_id}", at)
            )
        if self.wait_replica:
            commands.append(("WAIT", 1, REPLICA_WAIT_MS))
        if self.cluster:

            async def fill(pipe: Pipe) -> None:
                for command in commands:
                    pipe.execute_command(*command)

            await self._pipeline(fill)
            return
        await self._send(commands)

    async def _send(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        """Commands in one round trip on one server or a Sentinel-managed master
        (`shared_redis.send_scripts`, which loads a script the server lacks); the
        first error is raised."""
        replies = await send_scripts(self._r, commands, self._texts)
        for reply in replies:
            if isinstance(reply, BaseException):
                raise reply
        return replies

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
        index = self._keys(o, "")[3]
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
                pipe.hgetall(self._keys(o, sid)[0])
            rows = await pipe.execute()
        data = [session_from_row(row, sid) for sid, row in zip(ids, rows, strict=False) if row]
        return Page(data, len(ids) > limit)

    async def _delete_sessions(
        self, pairs: Sequence[tuple[str, str]], before: float | None = None
    ) -> list[Any]:
        """Delete sessions (owner digest, id), those older than `before` only if
        given; the scripts' answers. Their responses leave the responses' index."""
        if not pairs:
            return []
        cut = "" if before is None else repr(before)

        async def fill(pipe: Pipe) -> None:
            for o, sid in pairs:
                await self._eval(
                    pipe,
                    self._delete,
                    [*self._keys(o, sid), self._session_responses(o) + sid],
                    [sid, self._history(o), self._response_key(o, ""), cut],
                )

        results = await self._pipeline(fill)
        gone = [
            f"{o}:{rid}"
            for (o, _), result in zip(pairs, results, strict=True)
            if int(result[0]) != 2
            for rid in result[1:]
        ]
        if gone:
            await self._r.zrem(self._all_responses, *gone)
        return results

    async def delete_session(self, owner: str, session_id: str) -> bool:
        o = _owner_key(owner)
        [result] = await self._delete_sessions([(o, session_id)])
        await self._r.zrem(self._all_sessions, f"{o}:{session_id}")
        return int(result[0]) == 1

    async def _purge_index(
        self,
        index: str,
        before: float,
        delete: Callable[[list[str]], Awaitable[list[Any]]],
    ) -> int:
        """Go through the entries of `index` older than `before`: each is deleted by
        `delete` (which leaves alone what was updated since) and leaves the index, or
        its score is raised to its record's (which was updated since); how many were
        deleted."""
        total = 0
        while True:
            entries: list[tuple[Any, float]] = await self._r.zrangebyscore(
                index, "-inf", f"({before!r}", start=0, num=PURGE_PAGE, withscores=True
            )
            if not entries:
                return total
            members = [str(m) for m, _ in entries]
            results = await delete(members)

            fixes: list[tuple[AsyncScript, str, Any]] = []
            for (member, score), result in zip(entries, results, strict=True):
                if isinstance(result, list) and int(result[0]) == 2:
                    fixes.append((self._raise, str(member), result[1]))
                else:
                    fixes.append((self._unindex, str(member), repr(score)))

            async def fill(pipe: Pipe, fixes: list[tuple[AsyncScript, str, Any]] = fixes) -> None:
                for script, member, score in fixes:
                    await self._eval(pipe, script, [index], [member, score])

            await self._pipeline(fill)
            total += sum(1 for r in results if int(r[0] if isinstance(r, list) else r) == 1)

    async def purge(self, before: float) -> int:
        async def sessions(members: list[str]) -> list[Any]:
            return await self._delete_sessions([_split(m) for m in members], before)

        async def responses(members: list[str]) -> list[Any]:
            cut = repr(before)

            async def fill(pipe: Pipe) -> None:
                for m in members:
                    o, rid = _split(m)
                    await self._eval(
                        pipe,
                        self._delete_response,
                        [self._response_key(o, rid)],
                        [rid, self._session_responses(o), cut],
                    )

            return await self._pipeline(fill)

        total = await self._purge_index(self._all_sessions, before, sessions)
        await self._purge_index(self._all_responses, before, responses)
        return total

    # -- stored responses --

    async def put_response(self, record: StoredResponse) -> None:
        o = _owner_key(record.owner)
        created = repr(float(record.created))

        async def fill(pipe: Pipe) -> None:
            await self._eval(
                pipe,
                self._put_response,
                [self._response_key(o, record.id)],
                [
                    record.id,
                    created,
                    record.session_id or "",
                    "1" if record.session_id is not None else "0",
                    record.response,
                    record.messages,
                    self._session_responses(o),
                ],
            )
            pipe.zadd(self._all_responses, {f"{o}:{record.id}": float(record.created)})

        await self._pipeline(fill)

    async def get_response(self, owner: str, response_id: str) -> StoredResponse | None:
        row: Any = await self._r.hgetall(self._response_key(_owner_key(owner), response_id))
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

        async def fill(pipe: Pipe) -> None:
            await self._eval(
                pipe,
                self._delete_response,
                [self._response_key(o, response_id)],
                [response_id, self._session_responses(o), ""],
            )
            pipe.zrem(self._all_responses, f"{o}:{response_id}")

        existed, _ = await self._pipeline(fill)
        return int(existed) > 0

    async def ping(self) -> bool:
        return bool(await self._r.ping())

    async def close(self) -> None:
        if self._closes_client:
            await self._r.aclose()
        if self._pool is not None:
            await close_pool(self._pool)
            self._pool = None
