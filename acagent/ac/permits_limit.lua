-- ARGV: cap, the version the change was decided on, the new limit, 1 for a decrease.
-- Compare and set: the effective limit changes only while its version is
-- still the one the agent decided on (of the agents that saw one 429 burst,
-- one halves; the others read the new limit). Returns {limit, version,
-- version of the last decrease, 1 if set}. Runs after permits_prelude.lua.
local cap, expected, new = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local limit, version, lowered = effective(cap)
if version ~= expected then return {limit, version, lowered, 0} end
version = version + 1
if ARGV[4] == '1' then lowered = version end
limit = math.max(1, math.min(cap, new))
redis.call('HSET', L, 'limit', limit, 'version', version, 'lowered', lowered)
redis.call('PEXPIRE', L, 3600000)
return {limit, version, lowered, 1}
