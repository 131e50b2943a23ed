"""The Redis backend: ``redis://host:port/db`` (or ``rediss://`` for TLS), with redis-py.

Every state change is ONE Lua script: each operation has its own (``SCRIPTS``: the shared
``PRELUDE`` plus the operation's body), run with EVALSHA. The command's fixed part (EVALSHA,
the script's SHA1, the queue's keys) is encoded once per queue and operation; a call only
encodes its own arguments and writes the bytes to the connection's socket. When Redis answers
NOSCRIPT (it restarted, or someone ran SCRIPT FLUSH) the same call is sent again as EVAL,
which also puts the script back in Redis's cache. A script runs alone and whole, so nothing is
half-done; it checks its arguments before its first write (Redis does not roll a script back
when it fails midway) and never raises on a record it did not expect: a corrupt record goes
to the dead letters with a reason.

All keys of a queue start with ``procwire:{<name>}:``, so they share one hash tag and one
Redis Cluster slot. Time (delays, leases, backoff) is Redis's ``TIME``, read inside each script:
one clock for every client.

Wake-ups: every script that makes a job ready or delayed ends with ``PUBLISH
procwire:{<name>}:wake``. Each process that waits on the queue keeps one subscriber connection
(a thread reading it turns messages into a generation bump that blocked ``get`` calls and
asyncio tasks wait on). The waiter also wakes at the moment the next delayed job or lease end
is due, and at least once per second (``SAFETY_POLL``), so a lost message or a subscriber
connection that is down costs at most a second, never a job.

Connections: our own small pool of redis-py connections (one per thread at a time), with
redis-py's retries OFF (its default Retry would sleep up to seconds behind our timeouts). A call
that cannot reach Redis retries (5 ms doubling to 200 ms) until its ``timeout`` and then raises
``procwire.Timeout``. A reply lost AFTER the command was sent is ambiguous (it may have run):
reads (``stats``, ``dead_letters``), ``claim`` and ``extend`` are sent again (a claim that ran
leased jobs nobody will ack: their leases expire and they come back; so a claim, once sent,
waits at least ``CLAIM_GRACE`` = 2 s for its answer, even past a shorter ``get`` timeout,
rather than strand jobs under a lease nobody holds); ``put``, ``ack``,
``nack``, ``fail``, ``release``, ``requeue_dead`` and ``purge`` raise ``QueueError`` saying so,
because doing them twice would be wrong (a second put is a second job; a second ack reports
``LeaseLost`` for a job that was acked).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import select
import socket
import threading
import time
import urllib.parse
import weakref
from typing import Any

from .._errors import AddressError, AuthenticationError, ProcwireError, Timeout
from ._backend import Backend, ClaimResult, DeadRow, NewJob, RawJob, StatsRow
from ._errors import QueueError

try:
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry
    _HiredisParser: Any = None
    _NOT_ENOUGH_DATA: Any = None
    try:
        from redis._parsers import hiredis as _hiredis_parser

        _HiredisParser = _hiredis_parser._HiredisParser
        _NOT_ENOUGH_DATA = _hiredis_parser.NOT_ENOUGH_DATA
    except (ImportError, AttributeError):  # pragma: no cover - another redis-py layout
        pass
except ImportError as _exc:  # pragma: no cover - the extra is missing
    raise ProcwireError("a redis:// queue needs redis-py: pip install 'procwire[redis]'"
                        ) from _exc

__all__ = ["SCRIPTS", "SHAS", "RedisBackend", "open_backend"]

_CONN_ERRORS = (redis.ConnectionError, redis.TimeoutError, OSError)
# Answers that mean "the script did not run; try again shortly".
_RETRY_REPLIES = ("BUSY", "LOADING", "TRYAGAIN", "MASTERDOWN", "CLUSTERDOWN", "ASK ")
_RETRY_ERRORS = (redis.BusyLoadingError, redis.exceptions.TryAgainError,
                 redis.exceptions.ClusterDownError, redis.exceptions.AskError)
_MAX_IDLE_CONNECTIONS = 16   # more idle connections than this are closed on return
_HEARTBEAT = 15.0            # a silent subscriber connection is PINGed after this long
_FIRST_SUBSCRIBE = 0.5       # the first waiter waits this long for SUBSCRIBE to be confirmed
# A claim that was sent waits at least this long for its answer (even past the caller's
# timeout): given up on, the jobs it leased would wait for their lease to end.
CLAIM_GRACE = 2.0
_KEYS = ("ready", "delayed", "leased", "dead", "parked", "keys", "heads", "stats", "seq")

PRELUDE = r"""
-- procwire queue: the helpers every operation's script starts with (each operation is a
-- script of its own: this prelude plus its body, see BODIES).
--
-- Keys, all <prefix>NAME (they share the queue's hash tag, so one Redis Cluster slot holds the
-- whole queue; KEYS[1], the ready set, is the one declared: it routes the call to that slot):
--   ready    ZSET  score -priority, member = zero-padded id (equal scores sort by member:
--                    FIFO by id)
--   delayed  ZSET  score = due time
--   leased   ZSET  score = lease end
--   dead     ZSET  score 0, member = padded id (dead letters in id order)
--   parked   ZSET  score = due time: grouped jobs waiting behind their group's head
--   keys     HASH  dedup key -> padded id
--   heads    HASH  group -> padded id of the group's head (the one job of the group that is
--                    ready, delayed or leased)
--   stats    HASH  put, acked, retried, expired, failed
--   seq      STRING the last id handed out
-- Job records are HASHes at <prefix>j:<id> (fields below); a group's live jobs are in
-- <prefix>g:<sha1(group)> (ZSET, score 0, member = padded id).
-- ARGV[1] = operation (as a label), ARGV[2] = <prefix>, the rest depends on the operation.
--
-- A job is in exactly one of ready, delayed, leased, parked, dead. Nothing is kept after an
-- ack: the record, its key and its group entry go in the same script.
--
-- Job fields: d data, st state (r ready, d delayed, l leased, p parked, x dead), pr priority,
-- vis due time / lease end, eq enqueued at, at attempts, ma max attempts, tk lease token,
-- k dedup key, g group, er last error, da died at.
--
-- Nothing here may fail after the first write (Redis does not roll a script back): arguments
-- are checked first, and a record that is not what we wrote (corrupt) is moved to the dead
-- letters with a reason instead of raising.

-- Redis 5 and 6 replicate a script's effects only when asked (7 always does, and has
-- REDIS_VERSION): we read TIME before writing.
if not redis.REDIS_VERSION then pcall(redis.replicate_commands) end

local P = ARGV[2]
local K_READY, K_DELAYED, K_LEASED, K_DEAD = KEYS[1], P .. 'delayed', P .. 'leased', P .. 'dead'
local K_PARKED, K_KEYS, K_HEADS = P .. 'parked', P .. 'keys', P .. 'heads'
local K_STATS, K_SEQ = P .. 'stats', P .. 'seq'
-- Redis TIME, read once per script: by tick() at the start of every operation that needs
-- the clock (ack only needs it when a group moves on, see leave_group).
local now
local function tick()
  local t = redis.call('TIME')
  now = tonumber(t[1]) + tonumber(t[2]) / 1000000
end
local woke = false -- something became ready or delayed: wake the waiters at the end

local function jkey(id) return P .. 'j:' .. id end
local function mem(id) return string.format('%016d', id) end
-- The id a set member names, or nil when it is not one we wrote (16 digits).
local function idof(m)
  if #m == 16 and not string.find(m, '%D') then return tonumber(m) end
  return nil
end
-- A finite number, or nil ('nan', 'inf', '0x..' garbage, a missing field).
local function num(s)
  local x = tonumber(s)
  if x and x == x and x > -1e300 and x < 1e300 then return x end
  return nil
end
-- An integer that round-trips through a double, or nil.
local function int(s)
  local x = num(s)
  if x and x == math.floor(x) and x > -9007199254740992 and x < 9007199254740992 then
    return x
  end
  return nil
end
local function istr(x) return string.format('%d', x) end
local function gkey(g) return P .. 'g:' .. redis.sha1hex(g) end
local function fmt(x) return string.format('%.6f', x) end
local INDEX = {r = K_READY, d = K_DELAYED, l = K_LEASED, p = K_PARKED, x = K_DEAD}

-- The job record, checked; or nil and what the key holds when it is not a proper record.
local function load(id)
  local key = jkey(id)
  local v = redis.pcall('HMGET', key, 'd', 'st', 'pr', 'vis', 'eq', 'at', 'ma', 'tk', 'k', 'g')
  if v.err then return nil, redis.call('TYPE', key).ok end -- not a hash
  local j = {id = id, d = v[1], st = v[2], pr = int(v[3]), vis = num(v[4]), eq = num(v[5]),
             at = int(v[6]), ma = int(v[7]), tk = v[8], k = v[9], g = v[10]}
  if not j.d or not INDEX[j.st] or not j.pr or not j.vis or not j.eq or not j.at
      or not j.ma then
    return nil, redis.call('TYPE', key).ok -- 'none' (missing) or 'hash' (bad fields)
  end
  return j
end

local promote

-- A counter in the stats hash; one that is not an integer (overwritten) starts again.
local function stat(field, n)
  local r = redis.pcall('HINCRBY', K_STATS, field, n)
  if type(r) ~= 'number' then
    if redis.call('TYPE', K_STATS).ok ~= 'hash' then redis.call('DEL', K_STATS) end
    redis.call('HSET', K_STATS, field, n)
  end
end

-- A new id. A sequence that was overwritten with something else starts again above every id
-- still in use.
local function next_id()
  local r = redis.pcall('INCR', K_SEQ)
  if type(r) == 'number' then return r end
  local top = 0
  for _, index in ipairs({K_READY, K_DELAYED, K_LEASED, K_PARKED, K_DEAD}) do
    for _, m in ipairs(redis.call('ZRANGE', index, 0, -1)) do
      local id = idof(m)
      if id and id > top then top = id end
    end
  end
  redis.call('SET', K_SEQ, top + 1)
  return top + 1
end

-- A set member that names no job of ours (not an id we wrote, e.g. a stray ZADD): it leaves
-- the set and becomes a dead letter of its own (a new id), its payload the member, with why.
local function bury_stray(index, where, m, reason)
  redis.call('ZREM', index, m)
  local id = next_id()
  redis.call('HSET', jkey(id), 'd', m, 'st', 'x', 'pr', '0', 'vis', fmt(now), 'eq', fmt(now),
             'at', '0', 'ma', '1', 'da', fmt(now),
             'er', reason or ('corrupt entry: a member of the ' .. where
                              .. ' set is not a job id (it is this dead letter\'s payload)'))
  redis.call('ZADD', K_DEAD, 0, mem(id))
  stat('failed', 1)
end

-- A job leaves its group (acked, dead, purged): the group's next job takes its turn.
local function leave_group(g, id)
  if not now then tick() end
  local m = mem(id)
  redis.call('ZREM', gkey(g), m)
  if redis.call('HGET', K_HEADS, g) == m then
    redis.call('HDEL', K_HEADS, g)
    promote(g)
  end
end

-- Replace a record that is not what we wrote by a dead-letter stub saying why; what could be
-- read of it (the payload, key and group) is kept.
local function bury_corrupt(id, ty)
  local key = jkey(id)
  local m = mem(id)
  local raw, k, g = '', false, false
  local reason
  if ty == 'none' then
    reason = 'corrupt entry: the job record is missing'
  elseif ty == 'hash' then
    reason = 'corrupt entry: the job record lacks fields or holds bad values'
    local v = redis.call('HMGET', key, 'd', 'k', 'g')
    raw, k, g = v[1] or '', v[2], v[3]
  else
    reason = 'corrupt entry: the job record is a ' .. ty .. ', not a hash'
    if ty == 'string' then raw = redis.call('GET', key) end
  end
  for _, index in pairs(INDEX) do redis.call('ZREM', index, m) end
  redis.call('DEL', key)
  redis.call('HSET', key, 'd', raw, 'st', 'x', 'pr', '0', 'vis', fmt(now), 'eq', fmt(now),
             'at', '0', 'ma', '1', 'er', reason, 'da', fmt(now))
  if k then redis.call('HSET', key, 'k', k) end
  redis.call('ZADD', K_DEAD, 0, m)
  stat('failed', 1)
  if g then
    redis.call('HSET', key, 'g', g)
    leave_group(g, id)
  end
end

local function set_ready(j)
  redis.call('HSET', jkey(j.id), 'st', 'r')
  redis.call('ZADD', K_READY, -j.pr, mem(j.id))
  j.st = 'r'
  woke = true
end

local function set_delayed(j, due)
  redis.call('HSET', jkey(j.id), 'st', 'd', 'vis', fmt(due))
  redis.call('ZADD', K_DELAYED, due, mem(j.id))
  j.st = 'd'
  woke = true
end

-- The group's oldest live job becomes its head (ready, or delayed until its time).
promote = function(g)
  local gk = gkey(g)
  for _ = 1, 1000 do -- bounded: each round removes a corrupt member or returns
    local first = redis.call('ZRANGE', gk, 0, 0)
    if #first == 0 then return end
    local m = first[1]
    local id = idof(m)
    if not id then
      bury_stray(gk, 'group', m)
    else
      local j, ty = load(id)
      if j and j.st == 'p' then
        redis.call('HSET', K_HEADS, g, m)
        redis.call('ZREM', K_PARKED, m)
        if j.vis <= now then set_ready(j) else set_delayed(j, j.vis) end
        return
      end
      redis.call('ZREM', gk, m)
      if j == nil then bury_corrupt(id, ty) end
    end
  end
end

local function unindex(j)
  redis.call('ZREM', INDEX[j.st], mem(j.id))
end

local function to_dead(j, reason)
  local key = jkey(j.id)
  unindex(j)
  redis.call('HDEL', key, 'tk')
  redis.call('HSET', key, 'st', 'x', 'da', fmt(now))
  if reason then redis.call('HSET', key, 'er', reason) else redis.call('HDEL', key, 'er') end
  redis.call('ZADD', K_DEAD, 0, mem(j.id))
  stat('failed', 1)
  j.st = 'x'
  if j.g then leave_group(j.g, j.id) end
end

-- Joins its group: parked, and the head if the group has none (or a broken one).
local function enter_group(j, due)
  local m = mem(j.id)
  redis.call('HSET', jkey(j.id), 'st', 'p', 'vis', fmt(due))
  redis.call('ZADD', K_PARKED, due, m)
  redis.call('ZADD', gkey(j.g), 0, m)
  local head = redis.call('HGET', K_HEADS, j.g)
  if head and (not idof(head) or redis.call('EXISTS', jkey(idof(head))) == 0) then
    redis.call('ZREM', gkey(j.g), head)
    redis.call('HDEL', K_HEADS, j.g)
    head = false
  end
  if not head then promote(j.g) end
end

local function opt(s) -- '' is None, '=value' is value
  if s == '' then return false end
  return string.sub(s, 2)
end

-- Delete the jobs whose token matches; returns the ids that did not.
-- One command over many keys or members (a list of up to thousands), 1000 at a time (Lua's
-- unpack has a limit).
local function bulk(cmd, key, list)
  for s = 1, #list, 1000 do
    local e = math.min(s + 999, #list)
    if key then
      redis.call(cmd, key, unpack(list, s, e))
    else
      redis.call(cmd, unpack(list, s, e))
    end
  end
end

-- Delete the jobs whose token matches; returns the ids that did not. Only the fields an ack
-- needs are read: a held job is deleted even when its other fields are corrupt. The index
-- entries and records go in one command each at the end.
local function ack(first)
  local lost, seen, dels, unidx = {}, {}, {}, {}
  local acked = 0
  for i = first, #ARGV, 2 do
    local id = tonumber(ARGV[i])
    local key = jkey(id)
    local v = redis.pcall('HMGET', key, 'st', 'tk', 'k', 'g')
    local st = not v.err and v[1]
    if st and st ~= 'x' and INDEX[st] and v[2] == ARGV[i + 1] and not seen[id] then
      seen[id] = true
      local m = mem(id)
      local list = unidx[INDEX[st]]
      if not list then
        list = {}
        unidx[INDEX[st]] = list
      end
      list[#list + 1] = m
      dels[#dels + 1] = key
      if v[3] and redis.call('HGET', K_KEYS, v[3]) == m then redis.call('HDEL', K_KEYS, v[3]) end
      if v[4] then leave_group(v[4], id) end
      acked = acked + 1
    else
      lost[#lost + 1] = id
    end
  end
  for index, list in pairs(unidx) do bulk('ZREM', index, list) end
  bulk('DEL', false, dels)
  if acked > 0 then stat('acked', acked) end
  return lost
end

local STATE = {r = 'ready', d = 'delayed', l = 'leased', p = 'parked', x = 'dead'}
-- Member m of `index` names job j, whose record puts it in another state. The entry goes; the
-- job stays as its record says when that index holds it, else it goes to the dead letters.
local function misplaced(index, where, m, j)
  redis.call('ZREM', index, m)
  if redis.call('ZSCORE', INDEX[j.st], m) then
    bury_stray(index, where, m, 'corrupt entry: the ' .. where .. ' set also listed job '
               .. j.id .. ', which is ' .. STATE[j.st] .. ' (the entry was removed)')
  else
    to_dead(j, 'corrupt entry: its record says ' .. STATE[j.st] .. ' but it was in the '
            .. where .. ' set')
  end
end

-- Due delayed jobs become ready; expired leases come back (or die after their last attempt).
-- Bounded per call; a caller that finds nothing looks again at once when the bound was hit.
local SWEEP = 1000
local function sweep()
  local full = false
  local due = redis.call('ZRANGEBYSCORE', K_DELAYED, '-inf', now, 'LIMIT', 0, SWEEP)
  if #due == SWEEP then full = true end
  for _, m in ipairs(due) do
    local id = idof(m)
    if not id then
      bury_stray(K_DELAYED, 'delayed', m)
    else
      local j, ty = load(id)
      if not j then
        redis.call('ZREM', K_DELAYED, m)
        bury_corrupt(id, ty)
      elseif j.st ~= 'd' then
        misplaced(K_DELAYED, 'delayed', m, j)
      else
        redis.call('ZREM', K_DELAYED, m)
        set_ready(j)
      end
    end
  end
  local expired = redis.call('ZRANGEBYSCORE', K_LEASED, '-inf', now, 'LIMIT', 0, SWEEP)
  if #expired == SWEEP then full = true end
  local back, dead = 0, 0
  for _, m in ipairs(expired) do
    local id = idof(m)
    local j, ty
    if id then j, ty = load(id) end
    if not id then
      bury_stray(K_LEASED, 'leased', m)
    elseif not j then
      bury_corrupt(id, ty)
    elseif j.st ~= 'l' then
      misplaced(K_LEASED, 'leased', m, j)
    elseif j.at >= j.ma then
      to_dead(j, 'lease expired on the last attempt (' .. j.at .. ')')
      dead = dead + 1
    else
      -- The token stays: the late holder may still ack while nobody else has the job.
      redis.call('ZREM', K_LEASED, m)
      redis.call('HSET', jkey(id), 'er', 'lease expired')
      set_ready(j)
      back = back + 1
    end
  end
  if back + dead > 0 then stat('expired', back + dead) end
  return full
end

local function finish(result)
  if woke then redis.call('PUBLISH', P .. 'wake', '') end
  return result
end
"""

# Each operation's body: its script is PRELUDE + body (one script per operation, so a call
# runs only its own code).
BODIES = {
    "put": r"""
tick()
-- ARGV: 3.. groups of 6: data, delay, priority, key, group, max_attempts
if (#ARGV - 2) % 6 ~= 0 then return redis.error_reply('ERR put: bad argument count') end
for i = 3, #ARGV, 6 do
  if not tonumber(ARGV[i + 1]) or not tonumber(ARGV[i + 2]) or not tonumber(ARGV[i + 5]) then
    return redis.error_reply('ERR put: bad number')
  end
end
local ids = {}
local inserted = 0
local ready = {} -- score, member pairs: one ZADD at the end
for i = 3, #ARGV, 6 do
  local k, g = opt(ARGV[i + 3]), opt(ARGV[i + 4])
  local holder = false
  if k then
    holder = redis.call('HGET', K_KEYS, k)
    if holder and (not idof(holder) or redis.call('EXISTS', jkey(idof(holder))) == 0) then
      holder = false
    end
  end
  if holder then
    ids[#ids + 1] = idof(holder)
  else
    local id = next_id()
    local delay = tonumber(ARGV[i + 1])
    local due = now + delay
    local key = jkey(id)
    local st = 'r'
    if g then st = 'p' elseif delay > 0 then st = 'd' end
    local f = {'d', ARGV[i], 'pr', ARGV[i + 2], 'vis', fmt(due), 'eq', fmt(now), 'at', '0',
               'ma', ARGV[i + 5], 'st', st}
    if k then
      f[#f + 1] = 'k'
      f[#f + 1] = k
      redis.call('HSET', K_KEYS, k, mem(id))
    end
    if g then
      f[#f + 1] = 'g'
      f[#f + 1] = g
    end
    redis.call('HSET', key, unpack(f))
    if g then
      enter_group({id = id, pr = tonumber(ARGV[i + 2]), g = g}, due)
    elseif delay > 0 then
      redis.call('ZADD', K_DELAYED, due, mem(id))
      woke = true
    else
      ready[#ready + 1] = -tonumber(ARGV[i + 2])
      ready[#ready + 1] = mem(id)
      woke = true
    end
    ids[#ids + 1] = id
    inserted = inserted + 1
  end
end
bulk('ZADD', K_READY, ready)
if inserted > 0 then stat('put', inserted) end
return finish(ids)
""",
    "claim": r"""
tick()
-- ARGV: 3 n, 4 lease seconds, 5 token, 6.. (id, token) pairs to ack first
local n, lease, token = tonumber(ARGV[3]), tonumber(ARGV[4]), ARGV[5]
local lost = ack(6)
local jobs = {}
local next_due = false
if n > 0 then
  local full = sweep()
  local buried = false
  local until_ = now + lease
  local leased = {} -- score, member pairs: one ZADD at the end
  -- The first n (priority, then id) leave the ready set in one command.
  local popped = redis.call('ZPOPMIN', K_READY, n)
  for p = 1, #popped, 2 do
    local m = popped[p]
    local id = idof(m)
    local j, ty
    if id then j, ty = load(id) end
    if j and j.st == 'r' then
      redis.call('HSET', jkey(id), 'st', 'l', 'tk', token, 'at', istr(j.at + 1),
                 'vis', fmt(until_))
      leased[#leased + 1] = until_
      leased[#leased + 1] = m
      for _, v in ipairs({id, j.d, j.at + 1, fmt(j.eq), istr(j.pr), j.k, j.g,
                          fmt(until_)}) do
        jobs[#jobs + 1] = v
      end
    else
      if not id then
        bury_stray(K_READY, 'ready', m)
      elseif not j then
        bury_corrupt(id, ty)
      else
        misplaced(K_READY, 'ready', m, j)
      end
      buried = true
    end
  end
  bulk('ZADD', K_LEASED, leased)
  if #jobs == 0 then
    if buried or full or redis.call('ZCARD', K_READY) > 0 then
      next_due = '0'
    else
      local due = false
      for _, index in ipairs({K_DELAYED, K_LEASED}) do
        local first = redis.call('ZRANGE', index, 0, 0, 'WITHSCORES')
        if #first > 0 then
          local s = tonumber(first[2])
          if not due or s < due then due = s end
        end
      end
      if due then next_due = fmt(math.max(0, due - now)) end
    end
  end
end
return finish({lost, next_due, jobs})
""",
    "ack": r"""
return finish(ack(3))
""",
    "nack": r"""
tick()
-- ARGV: 3 id, 4 token, 5 delay, 6 error ('' none, '=text')
local id, delay, err = tonumber(ARGV[3]), tonumber(ARGV[5]), opt(ARGV[6])
local j = load(id)
if not j or j.st == 'x' or j.tk ~= ARGV[4] then return 0 end
if j.at >= j.ma then
  to_dead(j, err)
else
  local key = jkey(id)
  unindex(j)
  redis.call('HDEL', key, 'tk')
  if err then redis.call('HSET', key, 'er', err) else redis.call('HDEL', key, 'er') end
  if delay > 0 then set_delayed(j, now + delay) else set_ready(j) end
  stat('retried', 1)
end
return finish(1)
""",
    "extend": r"""
tick()
-- ARGV: 3 seconds, 4.. (id, token) pairs. Still ours after the lease ran out, as long as
-- nobody was granted the job since.
local until_ = now + tonumber(ARGV[3])
local lost = {}
for i = 4, #ARGV, 2 do
  local id = tonumber(ARGV[i])
  local j = load(id)
  if j and j.st ~= 'x' and j.tk == ARGV[i + 1] then
    unindex(j)
    redis.call('HSET', jkey(id), 'st', 'l', 'vis', fmt(until_))
    redis.call('ZADD', K_LEASED, until_, mem(id))
  else
    lost[#lost + 1] = id
  end
end
return lost
""",
    "fail": r"""
tick()
-- ARGV: 3 id, 4 token ('' any), 5 reason
local id = tonumber(ARGV[3])
local j = load(id)
if not j or j.st == 'x' or (ARGV[4] ~= '' and j.tk ~= ARGV[4]) then return 0 end
to_dead(j, ARGV[5])
return finish(1)
""",
    "release": r"""
tick()
-- ARGV: 3 id, 4 token
local id = tonumber(ARGV[3])
local j = load(id)
if not j or j.st == 'x' or j.tk ~= ARGV[4] then return 0 end
unindex(j)
redis.call('HDEL', jkey(id), 'tk')
redis.call('HSET', jkey(id), 'at', istr(math.max(j.at - 1, 0)))
set_ready(j)
return finish(1)
""",
    "stats": r"""
tick()
local v = redis.pcall('HMGET', K_STATS, 'put', 'acked', 'retried', 'expired', 'failed')
if v.err then v = {} end
local due_d = redis.call('ZCOUNT', K_DELAYED, '-inf', now)
local due_p = redis.call('ZCOUNT', K_PARKED, '-inf', now)
local out = {
  redis.call('ZCARD', K_READY) + due_d + due_p,
  redis.call('ZCARD', K_DELAYED) - due_d + redis.call('ZCARD', K_PARKED) - due_p,
  redis.call('ZCARD', K_LEASED),
  redis.call('ZCARD', K_DEAD)}
for i = 1, 5 do out[#out + 1] = tonumber(v[i]) or 0 end
return out
""",
    "dead": r"""
tick()
-- ARGV: 3 limit
local out = {}
local limit = tonumber(ARGV[3])
local members = redis.call('ZRANGE', K_DEAD, 0, limit - 1)
local stray = false
for _, m in ipairs(members) do
  if not idof(m) then
    bury_stray(K_DEAD, 'dead', m)
    stray = true
  end
end
if stray then members = redis.call('ZRANGE', K_DEAD, 0, limit - 1) end
for _, m in ipairs(members) do
  local id = idof(m)
  if id then
    local v = {false, false, false, false, false, false, false}
    if redis.call('TYPE', jkey(id)).ok == 'hash' then
      v = redis.call('HMGET', jkey(id), 'd', 'at', 'eq', 'da', 'er', 'k', 'g')
    end
    out[#out + 1] = id
    out[#out + 1] = v[1]
    out[#out + 1] = istr(int(v[2]) or 0)
    out[#out + 1] = fmt(num(v[3]) or 0)
    out[#out + 1] = fmt(num(v[4]) or 0)
    for i = 5, 7 do out[#out + 1] = v[i] end
  end
end
return out
""",
    "requeue": r"""
tick()
-- ARGV: 3 'all' or 'ids', 4.. ids
local members
if ARGV[3] == 'all' then
  members = redis.call('ZRANGE', K_DEAD, 0, -1)
else
  members = {}
  for i = 4, #ARGV do
    local m = mem(tonumber(ARGV[i]))
    if redis.call('ZSCORE', K_DEAD, m) then members[#members + 1] = m end
  end
end
local n = 0
for _, m in ipairs(members) do
  local id = idof(m)
  local j = id and load(id)
  if j and j.st == 'x' then
    local key = jkey(id)
    redis.call('ZREM', K_DEAD, m)
    redis.call('HDEL', key, 'da', 'tk')
    redis.call('HSET', key, 'at', '0', 'vis', fmt(now))
    if j.g then enter_group(j, now) else set_ready(j) end
    n = n + 1
  end
end
return finish(n)
""",
    "purge": r"""
-- ARGV: 3 '1' dead only, '0' everything
local n = 0
if ARGV[3] == '1' then
  for _, m in ipairs(redis.call('ZRANGE', K_DEAD, 0, -1)) do
    local id = idof(m)
    if id then
      local key = jkey(id)
      if redis.call('TYPE', key).ok == 'hash' then
        local k = redis.call('HGET', key, 'k')
        if k and redis.call('HGET', K_KEYS, k) == m then redis.call('HDEL', K_KEYS, k) end
      end
      redis.call('DEL', key)
    end
    n = n + 1
  end
  redis.call('DEL', K_DEAD)
  return n
end
for _, index in ipairs({K_READY, K_DELAYED, K_LEASED, K_PARKED, K_DEAD}) do
  for _, m in ipairs(redis.call('ZRANGE', index, 0, -1)) do
    if idof(m) then redis.call('DEL', jkey(idof(m))) end
    n = n + 1
  end
end
for _, g in ipairs(redis.call('HKEYS', K_HEADS)) do redis.call('DEL', gkey(g)) end
redis.call('DEL', K_READY, K_DELAYED, K_LEASED, K_PARKED, K_DEAD, K_KEYS, K_HEADS)
return n
""",
}
SCRIPTS = {op: PRELUDE + body for op, body in BODIES.items()}
SHAS = {op: hashlib.sha1(text.encode()).hexdigest() for op, text in SCRIPTS.items()}


def _bulk(value: bytes | str) -> bytes:
    """One RESP bulk string."""
    b = value if isinstance(value, bytes) else value.encode()
    return b"$%d\r\n%b\r\n" % (len(b), b)


def _pack(args: list[Any]) -> bytes:
    """RESP bulk strings for ``args`` (bytes or str), back to back."""
    parts: list[bytes] = []
    add = parts.append
    for a in args:
        b = a if isinstance(a, bytes) else a.encode()
        add(b"$%d\r\n" % len(b))
        add(b)
        add(b"\r\n")
    return b"".join(parts)


# Every backend of this process, so that a forked child drops the parent's connections
# (they are the parent's: a child writing to them would interleave with the parent's
# commands) and its subscriber thread (not running in the child).
_BACKENDS: weakref.WeakSet[RedisBackend] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for backend in list(_BACKENDS):
        backend._forked()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _stale(conn: Any) -> bool:
    """An idle connection with anything to read (an EOF after the server closed it, e.g. it
    restarted; or data nobody asked for) is dead or out of step. One poll(0), no read."""
    sock = conn._sock
    cached = conn.__dict__.get("_procwire_poll")
    if cached is None or cached[0] is not sock:
        poller = select.poll()
        poller.register(sock, select.POLLIN | select.POLLPRI)
        cached = conn._procwire_poll = (sock, poller)
    if cached[1].poll(0):
        return True
    reader = getattr(conn._parser, "_reader", None)
    return bool(reader is not None and reader.has_data())


def _read_reply(conn: Any) -> Any:
    """The next reply on ``conn`` within the socket's timeout (set by the caller). With
    redis-py's hiredis parser the reply is read here (one recv, no timeout juggling);
    otherwise by redis-py. An error reply is raised as redis-py's exception for it."""
    parser = conn._parser
    if _HiredisParser is None or type(parser) is not _HiredisParser:
        return conn.read_response(timeout=conn._sock.gettimeout())
    reader = parser._reader
    response = reader.gets()
    if response is _NOT_ENOUGH_DATA:
        sock, buf = conn._sock, parser._buffer
        while response is _NOT_ENOUGH_DATA:
            try:
                n = sock.recv_into(buf)
            except TimeoutError as exc:
                raise redis.TimeoutError("Timeout reading from socket") from exc
            if n == 0:
                raise redis.ConnectionError("Connection closed by server.")
            reader.feed(buf, 0, n)  # type: ignore[arg-type]
            response = reader.gets()
    if isinstance(response, (redis.RedisError, ConnectionError)):
        raise response
    return response


def _redact(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    return urllib.parse.urlunsplit(parts._replace(netloc=f"***@{host}"))


def _opt(value: str | None) -> bytes:
    """None -> b'', a string -> b'=' + its UTF-8 (so '' stays distinct from None)."""
    return b"" if value is None else b"=" + value.encode("utf-8", "surrogatepass")


def _text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8", "surrogatepass")
        except UnicodeDecodeError:  # not what we wrote (a corrupt key, group or error)
            return value.decode("utf-8", "replace")
    return str(value)


def open_backend(url: str | None, name: str) -> RedisBackend:
    if url is None:  # pragma: no cover - backend_for sends None to SQLite
        raise AddressError("a Redis queue needs a redis:// url")
    return RedisBackend(url, name)


class RedisBackend(Backend):
    """One queue in one Redis database. See the module docstring."""

    def __init__(self, url: str, name: str) -> None:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme.lower() not in ("redis", "rediss"):
            raise AddressError(f"{_redact(url)!r}: not a redis:// or rediss:// url")
        self.description = _redact(url)
        self.name = name
        self.prefix = f"procwire:{{{name}}}:"
        self.keys = [self.prefix + k for k in _KEYS]
        # op -> (the number of fixed arguments, EVALSHA's fixed part, EVAL's), encoded once.
        # One declared key (ready); the scripts derive the others from the prefix.
        self._ops: dict[str, tuple[int, bytes, bytes]] = {}
        for op in SCRIPTS:
            fixed = _pack(["1", self.keys[0], op, self.prefix])
            n = 2 + 4
            self._ops[op] = (n, _bulk("EVALSHA") + _bulk(SHAS[op]) + fixed,
                             _bulk("EVAL") + _bulk(SCRIPTS[op]) + fixed)
        self.channel = self.prefix + "wake"
        try:
            pool = redis.ConnectionPool.from_url(
                url, socket_connect_timeout=5.0, socket_timeout=30.0, socket_keepalive=True,
                # redis-py's own retries sleep behind our timeouts: off; we retry ourselves.
                retry=Retry(NoBackoff(), 0), health_check_interval=0,
                # RESP2: pub/sub messages are plain replies we read ourselves.
                protocol=2)
        except (ValueError, TypeError) as exc:
            raise AddressError(f"{self.description!r}: {exc}") from exc
        self._conn_class: Any = pool.connection_class
        self._conn_kwargs: dict[str, Any] = dict(pool.connection_kwargs)
        self._free: list[Any] = []
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self._waker: _Waker | None = None
        self._closed = False
        _BACKENDS.add(self)
        #: Where a Redis Cluster MOVED answer sent us (host, port), if it did.
        self.moved_to: tuple[str, int] | None = None

    # -- connections ----------------------------------------------------------------------
    def _forked(self) -> None:
        """In a forked child (os.register_at_fork): the parent's sockets and threads are not
        ours, forget them (redis-py does not shut a socket down from another pid). The lock
        may have been held by a parent thread that does not exist here: a new one."""
        self._lock = threading.Lock()
        self._free = []
        self._waker = None
        self._pid = os.getpid()

    def new_connection(self, connect_timeout: float) -> Any:
        """A fresh, unconnected redis-py connection to this queue's server."""
        conn = self._conn_class(**self._conn_kwargs)
        conn.socket_connect_timeout = max(0.01, min(connect_timeout, 5.0))
        return conn

    def _checkout(self, timeout: float) -> Any:
        if self._closed:
            raise QueueError(f"queue {self.name!r} on {self.description} is closed")
        with self._lock:
            conn = self._free.pop() if self._free else None
        if conn is None:
            conn = self.new_connection(timeout)
        else:
            conn.socket_connect_timeout = max(0.01, min(timeout, 5.0))
        try:
            if conn._sock is not None:
                # An idle connection with something to read is dead (the server closed it,
                # e.g. it restarted) or out of step: reconnect before sending anything.
                try:
                    stale = _stale(conn)
                except (*_CONN_ERRORS, ValueError):
                    stale = True
                if stale:
                    conn.disconnect()
            if conn._sock is None:
                conn.connect()
        except BaseException:
            conn.disconnect()
            raise
        return conn

    def _checkin(self, conn: Any) -> None:
        with self._lock:
            if not self._closed and len(self._free) < _MAX_IDLE_CONNECTIONS:
                self._free.append(conn)
                return
        conn.disconnect()

    def _follow_moved(self, host: str, port: int) -> None:
        # MOVED: every key of this queue is in one slot, so that node serves the whole queue
        # from now on.
        with self._lock:
            self._conn_kwargs["host"] = host.strip("[]")
            self._conn_kwargs["port"] = port
            self.moved_to = (self._conn_kwargs["host"], port)
            old, self._free = self._free, []
        for c in old:
            c.disconnect()

    def _exec(self, op: str, args: list[Any], timeout: float, *, resend: bool,
              grace: float = 0.0) -> Any:
        """Run the script's ``op``. Retries until ``timeout`` while Redis cannot be reached;
        after a reply was lost, retries only when ``resend`` (see the module docstring).
        Once the command is sent, its answer is awaited at least ``grace`` seconds."""
        start = time.monotonic()
        deadline = start + timeout
        pause = 0.005
        cause: BaseException | None = None
        n_fixed, evalsha, eval_ = self._ops[op]
        header = b"*%d\r\n" % (n_fixed + len(args))
        packed = _pack(args)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise Timeout(f"{self.description}: no answer from Redis within {timeout:g} s"
                              f" ({cause or 'timed out'})")
            try:
                conn = self._checkout(left)
            except redis.AuthenticationError as exc:
                raise AuthenticationError(f"{self.description}: {exc}") from exc
            except _CONN_ERRORS as exc:
                cause = exc
                time.sleep(max(0.0, min(pause, deadline - time.monotonic())))
                pause = min(pause * 2, 0.2)
                continue
            sent = False
            try:
                # One timeout for the send and the answer (the socket keeps it: every call
                # sets its own).
                sock = conn._sock
                sock.settimeout(max(deadline - time.monotonic(), grace, 0.001))
                sock.sendall(b"".join((header, evalsha, packed)))
                sent = True
                try:
                    reply = _read_reply(conn)
                except redis.exceptions.NoScriptError:
                    # Redis restarted or its script cache was flushed: EVAL loads it again.
                    sock.settimeout(max(deadline - time.monotonic(), grace, 0.001))
                    sock.sendall(b"".join((header, eval_, packed)))
                    reply = _read_reply(conn)
            except (redis.ResponseError, redis.BusyLoadingError) as exc:
                self._checkin(conn)  # an error answer: the connection is in step
                text = str(exc)
                if isinstance(exc, redis.exceptions.MovedError):
                    self._follow_moved(exc.host, int(exc.port))
                    cause = exc
                    continue
                if isinstance(exc, _RETRY_ERRORS) or text.startswith(_RETRY_REPLIES):
                    cause = exc
                    time.sleep(max(0.0, min(pause, deadline - time.monotonic())))
                    pause = min(pause * 2, 0.2)
                    continue
                raise QueueError(f"{self.description}: {op}: {text}") from exc
            except _CONN_ERRORS as exc:
                conn.disconnect()
                if sent and not resend:
                    what = ("no answer in time" if isinstance(exc, redis.TimeoutError)
                            else "the connection was lost")
                    err = (f"{self.description}: {op} was sent but {what}: it may or may not "
                           f"have happened ({exc})")
                    if isinstance(exc, redis.TimeoutError):
                        raise Timeout(err) from exc
                    raise QueueError(err) from exc
                cause = exc
                if not sent:
                    time.sleep(max(0.0, min(pause, deadline - time.monotonic())))
                    pause = min(pause * 2, 0.2)
                continue
            except BaseException:
                conn.disconnect()  # e.g. KeyboardInterrupt mid-read: the stream is out of step
                raise
            self._checkin(conn)
            return reply

    # -- state changes --------------------------------------------------------------------
    def put_many(self, items: list[NewJob], timeout: float) -> list[int]:
        args: list[Any] = []
        for it in items:
            args += [it.data, repr(float(it.delay)), str(int(it.priority)), _opt(it.key),
                     _opt(it.group), str(int(it.max_attempts))]
        return [int(i) for i in self._exec("put", args, timeout, resend=False)]

    @staticmethod
    def _pairs(pairs: list[tuple[int, int]]) -> list[str]:
        out: list[str] = []
        for id_, token in pairs:
            out += [str(int(id_)), str(int(token))]
        return out

    def claim(self, n: int, lease: float, token: int, timeout: float,
              ack: list[tuple[int, int]] | None = None) -> ClaimResult:
        lost, next_due, flat = self._exec(
            "claim", [str(int(n)), repr(float(lease)), str(int(token)),
                      *self._pairs(ack or [])], timeout, resend=True, grace=CLAIM_GRACE)
        jobs = []
        for i in range(0, len(flat), 8):
            id_, data, attempts, eq, pr, key, grp, until = flat[i:i + 8]
            jobs.append(RawJob(int(id_), data, int(attempts), float(eq), int(pr), _text(key),
                               _text(grp), token, float(until)))
        return ClaimResult(jobs, [int(x) for x in lost],
                           None if next_due is None else float(next_due))

    def ack_many(self, pairs: list[tuple[int, int]], timeout: float) -> list[int]:
        return [int(x) for x in self._exec("ack", self._pairs(pairs), timeout, resend=False)]

    def nack(self, id: int, token: int, delay: float, error: str | None,
             timeout: float) -> bool:
        return bool(self._exec("nack", [str(int(id)), str(int(token)), repr(float(delay)),
                                        _opt(error)], timeout, resend=False))

    def extend_many(self, pairs: list[tuple[int, int]], seconds: float,
                    timeout: float) -> list[int]:
        return [int(x) for x in self._exec("extend", [repr(float(seconds)),
                                                      *self._pairs(pairs)],
                                           timeout, resend=True)]

    def fail(self, id: int, token: int | None, reason: str, timeout: float) -> bool:
        return bool(self._exec("fail", [str(int(id)), "" if token is None else str(int(token)),
                                        reason.encode("utf-8", "surrogatepass")],
                               timeout, resend=False))

    def release(self, id: int, token: int, timeout: float) -> bool:
        return bool(self._exec("release", [str(int(id)), str(int(token))], timeout,
                               resend=False))

    # -- inspection and maintenance --------------------------------------------------------
    def stats(self, timeout: float) -> StatsRow:
        return StatsRow(*(int(x) for x in self._exec("stats", [], timeout, resend=True)))

    def dead_letters(self, limit: int, timeout: float) -> list[DeadRow]:
        if limit <= 0:
            return []
        flat = self._exec("dead", [str(int(limit))], timeout, resend=True)
        out = []
        for i in range(0, len(flat), 8):
            id_, data, at, eq, da, er, key, grp = flat[i:i + 8]
            out.append(DeadRow(int(id_), data, int(at or 0), float(eq or 0), float(da or 0),
                               _text(er), _text(key), _text(grp)))
        return out

    def requeue_dead(self, ids: list[int] | None, timeout: float) -> int:
        args = ["all"] if ids is None else ["ids", *(str(int(i)) for i in ids)]
        return int(self._exec("requeue", args, timeout, resend=False))

    def purge(self, dead_only: bool, timeout: float) -> int:
        return int(self._exec("purge", ["1" if dead_only else "0"], timeout, resend=False))

    # -- wake-ups -------------------------------------------------------------------------
    def _get_waker(self) -> _Waker:
        w = self._waker
        if w is None:
            with self._lock:
                if self._closed:
                    raise QueueError(f"queue {self.name!r} on {self.description} is closed")
                if self._waker is None:
                    self._waker = _Waker(self)
                w = self._waker
            w.started.wait(_FIRST_SUBSCRIBE)
        return w

    def wake_generation(self) -> int:
        return self._get_waker().generation

    def wait(self, generation: int, timeout: float) -> None:
        self._get_waker().wait(generation, timeout)

    async def await_wake(self, generation: int, timeout: float) -> None:
        await self._get_waker().await_wake(generation, timeout)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            free, self._free = self._free, []
            waker, self._waker = self._waker, None
            mine = self._pid == os.getpid()
        if waker is not None and mine:
            waker.close()
        for c in free:
            c.disconnect()  # redis-py leaves a socket inherited across a fork alone


class _Waker:
    """This process's subscriber connection to the queue's wake channel, and the thread that
    reads it, reconnecting (50 ms doubling to 1 s) when it drops."""

    def __init__(self, backend: RedisBackend) -> None:
        self.backend = backend
        self.generation = 0
        self.cond = threading.Condition()
        self._async: set[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = set()
        self._stop = threading.Event()
        self.started = threading.Event()  # the first SUBSCRIBE was confirmed (or failed)
        self._conn: Any = None
        self._conn_lock = threading.Lock()
        #: times the subscriber connection was (re)established
        self.connects = 0
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name=f"procwire-queue-wake-{backend.name}"[:60])
        self._thread.start()

    def _run(self) -> None:
        pause = 0.05
        while not self._stop.is_set():
            conn = None
            try:
                conn = self.backend.new_connection(2.0)
                conn.connect()
                with self._conn_lock:
                    if self._stop.is_set():
                        return
                    self._conn = conn
                conn.send_command("SUBSCRIBE", self.backend.channel)
                if not conn.can_read(timeout=5.0):
                    raise redis.TimeoutError("SUBSCRIBE was not confirmed in 5 s")
                conn.read_response(disconnect_on_error=False)
                self.connects += 1
                # Whatever was published while we were not subscribed is lost: look again.
                self.bump()
                self.started.set()
                pause = 0.05
                self._read(conn)
            except _CONN_ERRORS:
                pass
            except redis.RedisError:
                pass  # e.g. NOPERM for SUBSCRIBE: the safety poll still finds the work
            finally:
                with self._conn_lock:
                    self._conn = None
                if conn is not None:
                    conn.disconnect()
            self.started.set()  # never let the first waiter wait for a server that is down
            if self._stop.wait(pause):
                return
            pause = min(pause * 2, 1.0)

    def _read(self, conn: Any) -> None:
        pinged = False
        while not self._stop.is_set():
            if conn.can_read(timeout=_HEARTBEAT):
                msg = conn.read_response(disconnect_on_error=False)
                pinged = False
                if isinstance(msg, list) and msg and msg[0] == b"message":
                    self.bump()
            elif pinged:
                raise redis.ConnectionError("the subscriber connection does not answer PING")
            else:
                conn.send_command("PING")  # a silently dead network is found within 30 s
                pinged = True

    def bump(self) -> None:
        with self.cond:
            self.generation += 1
            self.cond.notify_all()
            waiters = list(self._async)
        for loop, event in waiters:
            with contextlib.suppress(RuntimeError):  # that loop is closed
                loop.call_soon_threadsafe(event.set)

    def wait(self, generation: int, timeout: float) -> None:
        with self.cond:
            if self.generation == generation:
                self.cond.wait(timeout)

    async def await_wake(self, generation: int, timeout: float) -> None:
        loop = asyncio.get_running_loop()
        event = asyncio.Event()
        entry = (loop, event)
        with self.cond:
            if self.generation != generation:
                return
            self._async.add(entry)
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(event.wait(), timeout)
        finally:
            with self.cond:
                self._async.discard(entry)

    def close(self) -> None:
        self._stop.set()
        with self._conn_lock:
            conn = self._conn
            if conn is not None and conn._sock is not None:
                # Wakes the reader blocked in can_read: it sees EOF and stops.
                with contextlib.suppress(OSError):
                    conn._sock.shutdown(socket.SHUT_RDWR)
        self._thread.join(5)
        self.bump()
