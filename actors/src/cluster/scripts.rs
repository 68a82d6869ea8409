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

/// Claims again an id this member holds, after Redis lost its data (see
/// `cluster::recovery`).
///
/// `KEYS[1]` the agent's hash; `ARGV`: member, incarnation, seq, session, metadata, the
/// time the incarnation began (epoch seconds). Answers 1 when the claim is this
/// member's (again), 2 when that incarnation was ended by a survivor (released: its end
/// was published there), 0 when another member holds the id or a later incarnation
/// exists.
pub const REASSERT: &str = r"
local held = redis.call('HMGET', KEYS[1], 'node', 'inc')
local inc = tonumber(held[2]) or 0
local mine = tonumber(ARGV[2])
if inc > mine or (held[1] and held[1] ~= ARGV[1]) then
  return 0
end
if inc == mine and not held[1] then
  return 2
end
redis.call('HSET', KEYS[1], 'node', ARGV[1], 'inc', ARGV[2], 'seq', ARGV[3], 'session', ARGV[4],
  'meta', ARGV[5], 'at', ARGV[6])
return 1
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

#[cfg(test)]
mod tests {
    //! The scripts against the shared Redis on 127.0.0.1:6379, under a key prefix of
    //! their own (removed afterwards).
    use super::REASSERT;

    fn redis() -> redis::Connection {
        redis::Client::open("redis://127.0.0.1:6379")
            .and_then(|client| client.get_connection())
            .expect("these tests need Redis on 127.0.0.1:6379 (scripts/test.sh starts it)")
    }

    /// Runs REASSERT for member `m1`, incarnation 3, seq 7 on `key`.
    fn reassert(redis: &mut redis::Connection, key: &str) -> i64 {
        redis::cmd("EVAL")
            .arg(REASSERT)
            .arg(1)
            .arg(key)
            .arg(&["m1", "3", "7", "session", "{}", "1.5"][..])
            .query(redis)
            .unwrap()
    }

    #[test]
    fn reassert_restores_a_lost_claim_keeps_its_own_and_yields_to_others() {
        let mut redis = redis();
        let key = format!("tether-unit-{}:agent:{{a}}", uuid::Uuid::new_v4().simple());
        let set = |redis: &mut redis::Connection, fields: &[(&str, &str)]| {
            let _: () = redis::cmd("DEL").arg(&key).query(redis).unwrap();
            if !fields.is_empty() {
                let _: () = redis::cmd("HSET")
                    .arg(&key)
                    .arg(fields)
                    .query(redis)
                    .unwrap();
            }
        };
        // Gone with Redis's data: claimed again, as it was.
        set(&mut redis, &[]);
        assert_eq!(reassert(&mut redis, &key), 1);
        let held: Vec<Option<String>> = redis::cmd("HMGET")
            .arg(&key)
            .arg(&["node", "inc", "seq"][..])
            .query(&mut redis)
            .unwrap();
        assert_eq!(
            held,
            [Some("m1".into()), Some("3".into()), Some("7".into())]
        );
        // Still this member's: kept.
        assert_eq!(reassert(&mut redis, &key), 1);
        // Released by a survivor (that incarnation's end was published there).
        set(&mut redis, &[("inc", "3")]);
        assert_eq!(reassert(&mut redis, &key), 2);
        // Held by another member, or a later incarnation exists: not ours.
        set(&mut redis, &[("node", "m2"), ("inc", "1")]);
        assert_eq!(reassert(&mut redis, &key), 0);
        set(&mut redis, &[("inc", "4")]);
        assert_eq!(reassert(&mut redis, &key), 0);
        set(&mut redis, &[]);
    }
}
