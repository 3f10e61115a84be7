-- Run before acquire, release, renew and limit: the Redis clock as `now` (ms),
-- the key names, tidy() (drops expired leases and waiters that stopped
-- polling), epoch_of(grace), held() (the leases, without the sentinel) and
-- effective(cap).
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local H, Q, A, S, E, R, L = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7]
local SENTINEL = '$SENTINEL'
local function tidy()
  redis.call('ZREMRANGEBYSCORE', H, '-inf', now)
  local gone = redis.call('ZRANGEBYSCORE', A, '-inf', now)
  for _, w in ipairs(gone) do redis.call('ZREM', Q, w) end
  redis.call('ZREMRANGEBYSCORE', A, '-inf', now)
end
-- The epoch; a store without it, or whose holders lost the sentinel (the
-- key was evicted or not replicated), lost leases: nothing is granted for
-- ``grace`` ms, while the holders' renewers re-add them.
local function epoch_of(grace)
  local epoch = tonumber(redis.call('GET', E))
  if not epoch or not redis.call('ZSCORE', H, SENTINEL) then
    epoch = now + grace
    redis.call('SET', E, epoch)
    redis.call('ZADD', H, '+inf', SENTINEL)
  end
  return epoch
end
local function held() return redis.call('ZCARD', H) - 1 end
-- The effective limit (permits_limit.lua sets it; none set: the cap), its
-- version and the version its last decrease made.
local function effective(cap)
  local v = redis.call('HMGET', L, 'limit', 'version', 'lowered')
  return math.max(1, math.min(cap, tonumber(v[1]) or cap)), tonumber(v[2]) or 0, tonumber(v[3]) or 0
end
