"""The Lua scripts of :mod:`worker.redis_bus`: each check-and-act on a session runs atomically.

They name no key: every key comes in ``KEYS`` from ``worker.redis_bus``; the key layout (the
hand-out stream, a session's meta hash, audio and results streams...) is documented in
``worker.redis_keys``. Audio entry ids are ``{t_ms}-{seq + 1}``, so the last entry's id gives
the next expected ``seq``.
"""

from __future__ import annotations

PUSH = """
-- KEYS meta audio results; ARGV seq t_ms pcm cut_ms ttl_ms is_end t_s attach. With is_end and an
-- attach generation (not ''), the end is written only while that is the session's latest
-- attach (meta ``a``): -5 otherwise (a gateway's grace expiry of a session resumed elsewhere).
if redis.call('EXISTS', KEYS[1]) == 0 then return {-1, 0} end
if redis.call('HEXISTS', KEYS[1], 'e') == 1 then return {-2, 0} end
if ARGV[6] == '1' and ARGV[8] ~= '' and redis.call('HGET', KEYS[1], 'a') ~= ARGV[8] then
  return {-5, 0}
end
local last = redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', 1)
local ms, nxt = 0, 0
if #last > 0 then
  local a, b = string.match(last[1][1], '(%d+)-(%d+)')
  ms, nxt = tonumber(a), tonumber(b)
end
local ttl = ARGV[5]
if ARGV[6] == '1' then
  redis.call('XADD', KEYS[2], ms .. '-' .. (nxt + 1), 'e', '1')
  redis.call('HSET', KEYS[1], 'e', '1')
else
  local seq, t_ms = tonumber(ARGV[1]), tonumber(ARGV[2])
  if seq < nxt then return {0, nxt} end
  if seq > nxt then return {-3, nxt} end
  if t_ms < ms then return {-4, ms} end
  redis.call('XADD', KEYS[2], 'MINID', '~', ARGV[4], t_ms .. '-' .. (seq + 1),
             't', ARGV[7], 'p', ARGV[3])
end
for i = 1, 3 do redis.call('PEXPIRE', KEYS[i], ttl) end
return {1, nxt}
"""

OWNED = """
local function owned(meta, worker)
  local x = redis.call('HGET', meta, 'x')
  if not x then return nil end
  local p = redis.call('XPENDING', KEYS[1], ARGV[1], x, x, 1)
  if #p == 0 or p[1][2] ~= worker then return nil end
  return x
end
"""

RENEW = OWNED + """
-- KEYS sessions meta...; ARGV group worker
local lost = {}
for i = 2, #KEYS do
  local x = owned(KEYS[i], ARGV[2])
  if x then redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, x, 'JUSTID')
  else table.insert(lost, i - 1) end
end
return lost
"""

RELEASE = OWNED + """
-- KEYS sessions meta; ARGV group worker sid
local x = owned(KEYS[2], ARGV[2])
if not x then return 0 end
redis.call('XACK', KEYS[1], ARGV[1], x)
redis.call('XDEL', KEYS[1], x)
redis.call('HSET', KEYS[2], 'x', redis.call('XADD', KEYS[1], '*', 's', ARGV[3]))
return 1
"""

FINISH = OWNED + """
-- KEYS sessions meta audio results active; ARGV group worker sid result_ttl_ms
local x = owned(KEYS[2], ARGV[2])
if not x then return 0 end
redis.call('XACK', KEYS[1], ARGV[1], x)
redis.call('XDEL', KEYS[1], x)
redis.call('DEL', KEYS[3])
redis.call('HSET', KEYS[2], 'd', '1', 'e', '1')
redis.call('PEXPIRE', KEYS[2], ARGV[4])
redis.call('PEXPIRE', KEYS[4], ARGV[4])
redis.call('SREM', KEYS[5], ARGV[3])
return 1
"""

ATTACH = """
-- KEYS meta. The session's new attach generation, or -1 when it is unknown.
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
return redis.call('HINCRBY', KEYS[1], 'a', 1)
"""

CREATE = """
-- KEYS meta sessions active; ARGV sid sr ch enc ttl_ms
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
local x = redis.call('XADD', KEYS[2], '*', 's', ARGV[1])
redis.call('HSET', KEYS[1], 'sr', ARGV[2], 'ch', ARGV[3], 'enc', ARGV[4], 'n', 0, 'x', x)
redis.call('PEXPIRE', KEYS[1], ARGV[5])
redis.call('SADD', KEYS[3], ARGV[1])
return 1
"""

ADOPT = """
-- KEYS sessions meta; ARGV group entry worker. Returns {claim count, sr, ch, enc}, or {0} for a
-- stale entry (session expired, finished, or handed out again under a newer entry), which is
-- dropped. The parameters are returned as stored: the caller parses them, and fails the session
-- alone when they do not parse.
local m = redis.call('HMGET', KEYS[2], 'x', 'd', 'sr', 'ch', 'enc')
if m[1] ~= ARGV[2] or m[2] then
  redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
  redis.call('XDEL', KEYS[1], ARGV[2])
  return {0}
end
redis.call('HSET', KEYS[2], 'o', ARGV[3])
return {redis.call('HINCRBY', KEYS[2], 'n', 1), m[3], m[4], m[5]}
"""

PUBLISH = OWNED + """
-- KEYS sessions meta results; ARGV group worker result max_results ttl_ms final. The fence: a
-- worker publishes only while the session's entry is in its own PEL (an empty worker: no check,
-- for tools and tests that play a worker). Returns the result id, or false when not the owner.
-- Stored once: after a final (its id in meta ``f``) nothing more is stored, and a result equal
-- to the last one stored (a call repeated because its reply was lost) is not stored again; both
-- return the id of what is stored.
if ARGV[2] ~= '' and not owned(KEYS[2], ARGV[2]) then return false end
local final = redis.call('HGET', KEYS[2], 'f')
if final then return final end
local last = redis.call('XREVRANGE', KEYS[3], '+', '-', 'COUNT', 1)
if #last > 0 and last[1][2][2] == ARGV[3] then return last[1][1] end
local id = redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[4], '*', 'r', ARGV[3])
if ARGV[6] == '1' then redis.call('HSET', KEYS[2], 'f', id) end
redis.call('PEXPIRE', KEYS[3], ARGV[5])
redis.call('PEXPIRE', KEYS[2], ARGV[5])
return id
"""

FORGET = """
-- KEYS sessions heartbeat; ARGV group worker. Deletes the worker's consumer when it is not alive
-- (no heartbeat) and holds nothing (an empty PEL: deleting a consumer discards its PEL).
if redis.call('EXISTS', KEYS[2]) == 1 then return 0 end
if #redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', 1, ARGV[2]) > 0 then return 0 end
redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[2])
return 1
"""
