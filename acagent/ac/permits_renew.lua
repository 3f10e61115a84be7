-- ARGV: cap, lease ms, tokens...
-- Extends the leases of the tokens. A missing one (the store lost it) is
-- re-added only while the holders are below the effective limit (never
-- above a lowered one): this process still
-- holds that permit and nobody took it. Otherwise it is lost (someone else
-- may hold it now). Returns {leases re-added, lost tokens...}.
-- Runs after permits_prelude.lua.
local limit, lease = effective(tonumber(ARGV[1])), tonumber(ARGV[2])
epoch_of(lease)
tidy()
local out = {0}
for i = 3, #ARGV do
  local token = ARGV[i]
  if redis.call('ZSCORE', H, token) then
    redis.call('ZADD', H, now + lease, token)
  elseif held() < limit then
    redis.call('ZADD', H, now + lease, token)
    out[1] = out[1] + 1
  else
    out[#out + 1] = token
  end
end
return out
