-- ARGV: cap, lease ms, waiter ttl ms, owner, grant key prefix, idle ms, tokens...
-- Gives the tokens back, then hands free permits (up to the effective limit)
-- to the waiters at the head of the queue (each is told through its grant
-- list: the owner, how long the permit was idle before (ms), and the
-- effective limit it is granted under).
-- Idle: the last call on the tokens ended that long ago (a parked lease).
-- Returns leases removed.
-- Runs after permits_prelude.lua.
local limit, lease, waiter_ttl = effective(tonumber(ARGV[1])), tonumber(ARGV[2]), tonumber(ARGV[3])
local owner, grant, idle = ARGV[4], ARGV[5], tonumber(ARGV[6])
local n = 0
for i = 7, #ARGV do
  n = n + redis.call('ZREM', H, ARGV[i])
  redis.call('ZREM', Q, ARGV[i])
  redis.call('ZREM', A, ARGV[i])
  redis.call('DEL', grant .. ARGV[i])
end
if n > 0 then
  local last = tonumber(redis.call('ZSCORE', R, owner))
  if not last or last < now - idle then redis.call('ZADD', R, now - idle, owner) end
  redis.call('ZREMRANGEBYSCORE', R, '-inf', now - 60000)
end
if now >= epoch_of(lease) then
  tidy()
  local free = limit - held()
  if free > 0 then
    for _, w in ipairs(redis.call('ZRANGE', Q, 0, free - 1)) do
      redis.call('ZREM', Q, w)
      redis.call('ZREM', A, w)
      redis.call('ZADD', H, now + lease, w)
      redis.call('RPUSH', grant .. w, owner .. ' ' .. idle .. ' ' .. limit)
      redis.call('PEXPIRE', grant .. w, waiter_ttl)
    end
  end
end
return n
