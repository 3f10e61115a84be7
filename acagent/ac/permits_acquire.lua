-- ARGV: cap, lease ms, token, waiter ttl ms, grace ms, owner, margin ms, grant key.
-- Grants up to the effective limit. Returns {1, ms to wait before the first
-- request, ...} when the lease is taken, else {0, ms of grace left, ...};
-- ... is the effective limit, its version and the version of its last
-- decrease. Runs after permits_prelude.lua.
local cap, lease, token = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3]
local limit, version, lowered = effective(cap)
local waiter_ttl, grace = tonumber(ARGV[4]), tonumber(ARGV[5])
local owner, margin = ARGV[6], tonumber(ARGV[7])
local epoch = epoch_of(grace)
tidy()
local function granted()
  redis.call('DEL', ARGV[8])
  local wait = 0
  local rel = redis.call('ZRANGEBYSCORE', R, now - margin, '+inf', 'WITHSCORES')
  for i = 1, #rel, 2 do
    if rel[i] ~= owner then wait = math.max(wait, tonumber(rel[i + 1]) + margin - now) end
  end
  return {1, wait, limit, version, lowered}
end
if redis.call('ZSCORE', H, token) then
  redis.call('ZADD', H, now + lease, token)
  return granted()
end
if not redis.call('ZSCORE', Q, token) then
  redis.call('ZADD', Q, redis.call('INCR', S), token)
end
redis.call('ZADD', A, now + waiter_ttl, token)
if now < epoch then return {0, epoch - now, limit, version, lowered} end
local free = limit - held()
if free > 0 and redis.call('ZRANK', Q, token) < free then
  redis.call('ZREM', Q, token)
  redis.call('ZREM', A, token)
  redis.call('ZADD', H, now + lease, token)
  return granted()
end
return {0, 0, limit, version, lowered}
