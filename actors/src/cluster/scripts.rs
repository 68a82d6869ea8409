//! The Lua scripts that change an agent's claim: each runs atomically on the one key
//! of that agent (`Keys::agent`), so two nodes can never both hold an id.

/// Claims an agent id for a member.
///
/// `KEYS[1]` the agent's hash; `ARGV`: member, session, metadata, the member the
/// caller found lost (its lease gone) or `""`, and the time (epoch seconds).
///
/// Granted when the id is free, already held by this member (the member's registry
/// decided the takeover), or held by the lost member named: the incarnation counter
/// grows by one. Answers `{"granted", incarnation}`, plus `inc, seq, session, meta, at` of
/// the lost holder's incarnation when one was taken from it (its end is the caller's
/// to publish); `{"held", member}` otherwise.
pub const CLAIM: &str = r"
local holder = redis.call('HGET', KEYS[1], 'node')
local lost = false
if holder and holder ~= ARGV[1] then
  if holder ~= ARGV[4] then
    return {'held', holder}
  end
  lost = redis.call('HMGET', KEYS[1], 'inc', 'seq', 'session', 'meta', 'at')
end
local inc = redis.call('HINCRBY', KEYS[1], 'inc', 1)
redis.call('HSET', KEYS[1], 'node', ARGV[1], 'session', ARGV[2], 'seq', 1, 'meta', ARGV[3],
  'at', ARGV[5])
if lost then
  return {'granted', inc, lost[1], lost[2], lost[3], lost[4], lost[5]}
end
return {'granted', inc}
";

/// Releases an id its member held.
///
/// `KEYS[1]` the agent's hash; `ARGV`: member, incarnation (or `""`: any). Answers
/// `{inc, seq, session, meta, at}` of the released incarnation, or nil when the member
/// did not hold that incarnation (someone else ended it). The counter stays.
pub const RELEASE: &str = r"
local held = redis.call('HMGET', KEYS[1], 'node', 'inc', 'seq', 'session', 'meta', 'at')
if held[1] ~= ARGV[1] or (ARGV[2] ~= '' and held[2] ~= ARGV[2]) then
  return nil
end
redis.call('HDEL', KEYS[1], 'node', 'session', 'seq', 'meta', 'at')
return {held[2], held[3], held[4], held[5], held[6]}
";

/// Records the seq of the last event of a held incarnation (the next seqs are the
/// reaper's if the member is lost).
///
/// `KEYS[1]` the agent's hash; `ARGV`: member, incarnation, seq.
pub const PROGRESS: &str = r"
local held = redis.call('HMGET', KEYS[1], 'node', 'inc')
if held[1] == ARGV[1] and held[2] == ARGV[2] then
  redis.call('HSET', KEYS[1], 'seq', ARGV[3])
end
return 0
";

/// Hands a held id over to another member (a takeover across nodes, decided by the
/// holder once it ended its incarnation's connection).
///
/// `KEYS[1]` the agent's hash; `ARGV`: holding member, its incarnation, new member,
/// new session, new metadata, the time (epoch seconds). Answers the new incarnation,
/// or nil when the holder no longer holds that incarnation.
pub const HAND_OVER: &str = r"
local held = redis.call('HMGET', KEYS[1], 'node', 'inc')
if held[1] ~= ARGV[1] or held[2] ~= ARGV[2] then
  return nil
end
local inc = redis.call('HINCRBY', KEYS[1], 'inc', 1)
redis.call('HSET', KEYS[1], 'node', ARGV[3], 'session', ARGV[4], 'seq', 1, 'meta', ARGV[5],
  'at', ARGV[6])
return inc
";
