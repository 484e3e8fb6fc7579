//! Redis: the source of profiles and dirty flags, the version clocks, and the L2
//! cache of applied versions. Every multi-key operation is a Lua script over the
//! keys of one shard (one cluster slot); every per-user read is pipelined.

use crate::{
    config::RedisConfig,
    proto::json_to_bson,
    shard::{Keys, shard_of},
};
use fred::{
    prelude::*,
    types::{Value as RValue, scripts::Script},
};
use mongodb::bson::{Bson, Document};
use std::{
    collections::{BTreeMap, HashMap},
    sync::LazyLock,
    time::Duration,
};

/// Which half of a profile a version belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Section {
    Static,
    Dynamic,
}

impl Section {
    pub fn tag(self) -> &'static str {
        match self {
            Section::Static => "s",
            Section::Dynamic => "d",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RedisError {
    #[error("redis: {0}")]
    Command(#[from] fred::error::Error),
    /// The shard's lease is no longer the caller's: another instance owns it.
    #[error("shard {shard}: lease lost; the new owner handles its flags")]
    Fenced { shard: u32 },
    #[error("redis returned an unexpected reply to {what}: {reply}")]
    Reply { what: &'static str, reply: String },
}

impl crate::retry::Retryable for RedisError {
    /// Connection trouble and timeouts pass; a bad reply does not.
    fn is_retryable(&self) -> bool {
        match self {
            RedisError::Command(e) => {
                !matches!(e.kind(), ErrorKind::InvalidArgument | ErrorKind::Parse)
            }
            RedisError::Reply { .. } | RedisError::Fenced { .. } => false,
        }
    }
}

/// Why one user's profile could not be loaded. Permanent: retrying cannot help
/// until the upstream writes the profile again.
#[derive(Debug, Clone, thiserror::Error, PartialEq)]
pub enum ProfileError {
    #[error("profile key `{key}` does not exist")]
    Missing { key: String },
    #[error("profile key `{key}` is not valid JSON: {reason}")]
    BadJson { key: String, reason: String },
    #[error("profile key `{key}` holds JSON that is not an object")]
    NotAnObject { key: String },
    #[error("profile key `{key}` has Redis type `{kind}`; expected a string or a hash")]
    WrongType { key: String, kind: String },
}

/// Allocates one version per user from the shard's hybrid logical clock and flags
/// each user with it. `v = max(now_µs, last + 1)`, strictly increasing per shard.
/// The users' cached composed profiles are dropped in the same step.
/// KEYS: dirty zset, clock, then one profile-cache key per user. ARGV: user ids.
/// Returns the versions in order.
static MARK: LazyLock<Script> = LazyLock::new(|| {
    Script::from_lua(
        r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local last = tonumber(redis.call('GET', KEYS[2]) or '0')
local v = last + 1
if now > v then v = now end
local out = {}
for i = 1, #ARGV do
  if i > 1 then v = v + 1 end
  redis.call('ZADD', KEYS[1], string.format('%.0f', v), ARGV[i])
  redis.call('DEL', KEYS[2 + i])
  out[i] = v
end
redis.call('SET', KEYS[2], string.format('%.0f', v))
return out
"#,
    )
});

/// Accepts immediate (static) changes of one shard: allocates a version per
/// change from the shard clock (as MARK does), keeps each as pending until the
/// broker confirms it, and drops the users' cached profiles.
/// KEYS: static-pending hash, clock, then one profile-cache key per user.
/// ARGV: user, profile JSON, user, profile JSON, ... Returns the versions.
static STAGE_STATIC: LazyLock<Script> = LazyLock::new(|| {
    Script::from_lua(
        r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local last = tonumber(redis.call('GET', KEYS[2]) or '0')
local v = last + 1
if now > v then v = now end
local out = {}
for i = 1, #ARGV / 2 do
  if i > 1 then v = v + 1 end
  local vs = string.format('%.0f', v)
  redis.call('HSET', KEYS[1], ARGV[2 * i - 1], vs .. '|p|' .. ARGV[2 * i])
  redis.call('DEL', KEYS[2 + i])
  out[i] = v
end
redis.call('SET', KEYS[2], string.format('%.0f', v))
return out
"#,
    )
});

/// Lua fragment: closes the dead-letter entry in hash `h`, field `f`, if it is
/// for version `v` or older (its JSON's `version`). A newer entry stays open.
const CLOSE_DEAD_LETTER: &str = r#"
local function close_dead_letter(h, f, v)
  local e = redis.call('HGET', h, f)
  if not e then return end
  local ok, d = pcall(cjson.decode, e)
  if not ok or type(d) ~= 'table' or tonumber(d.version) == nil or tonumber(d.version) <= v then
    redis.call('HDEL', h, f)
  end
end
"#;

/// Marks pending immediate changes as acknowledged by the broker (state `p` or
/// `r` → `a`), if still at the published version: the scanner no longer
/// republishes them, and profile reads keep overlaying them until they are
/// applied. KEYS: static-pending hash. ARGV: user, version, ...
static STATIC_ACKED: LazyLock<Script> = LazyLock::new(|| {
    Script::from_lua(
        r#"
local n = 0
for i = 1, #ARGV, 2 do
  local cur = redis.call('HGET', KEYS[1], ARGV[i])
  local v, state, json = string.match(cur or '', '^(%d+)|(%a)|(.*)$')
  if v == ARGV[i + 1] and (state == 'p' or state == 'r') then
    redis.call('HSET', KEYS[1], ARGV[i], v .. '|a|' .. json)
    n = n + 1
  end
end
return n
"#,
    )
});

/// Drops pending immediate changes once MongoDB has settled them (applied, or
/// superseded by a newer stored version): entries at or below the settled
/// version; and closes the users' static dead letters up to that version.
/// A change MongoDB rejected is not settled: it stays pending for a redrive.
/// KEYS: static-pending hash, dead-letter hash. ARGV: user, version, ...
static STATIC_SETTLED: LazyLock<Script> = LazyLock::new(|| {
    Script::from_lua(format!(
        "{CLOSE_DEAD_LETTER}{}",
        r#"
local n = 0
for i = 1, #ARGV, 2 do
  local v = tonumber(ARGV[i + 1])
  local cur = redis.call('HGET', KEYS[1], ARGV[i])
  if cur then
    local pv = tonumber(string.match(cur, '^(%d+)|'))
    if pv and pv <= v then
      redis.call('HDEL', KEYS[1], ARGV[i])
      n = n + 1
    end
  end
  close_dead_letter(KEYS[2], ARGV[i] .. '|s', v)
end
return n
"#
    ))
});

/// Puts rejected (or never acknowledged) immediate changes back in line for
/// publishing, for a DLQ redrive: each user's pending change gets a new
/// version from the shard clock (as STAGE_STATIC allocates) and the state `r`,
/// which the scanner publishes at its next pass; the cached profile is dropped.
/// KEYS: static-pending hash, clock, then one profile-cache key per user.
/// ARGV: users. Returns the new versions, 0 where nothing was pending.
static RESTAGE_STATIC: LazyLock<Script> = LazyLock::new(|| {
    Script::from_lua(
        r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local v = tonumber(redis.call('GET', KEYS[2]) or '0')
local out = {}
for i = 1, #ARGV do
  out[i] = 0
  local cur = redis.call('HGET', KEYS[1], ARGV[i])
  local json = cur and string.match(cur, '^%d+|%a|(.*)$')
  if json then
    v = v + 1
    if now > v then v = now end
    redis.call('HSET', KEYS[1], ARGV[i], string.format('%.0f', v) .. '|r|' .. json)
    redis.call('DEL', KEYS[2 + i])
    out[i] = v
  end
end
redis.call('SET', KEYS[2], string.format('%.0f', v))
return out
"#,
    )
});

/// Fills a profile-cache entry only if the fill's placeholder is still there:
/// any invalidation in between (a mark, an immediate change, an applied write)
/// deleted it, and the possibly stale value is dropped. KEYS: cache key.
/// ARGV: placeholder, value, ttl ms.
static CACHE_FILL: LazyLock<Script> = LazyLock::new(|| {
    Script::from_lua(
        r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
  return 1
end
return 0
"#,
    )
});

/// Compare-and-delete: removes a flag only if its score is still the version that
/// was published, and then closes the user's dynamic dead letter if it is for
/// that version or an older one (it synced). A flag whose score moved on, and
/// every static dead letter, are left alone.
/// Fenced: when ARGV[1] is not empty it must equal the shard's lease value, or
/// nothing is touched and -1 is returned.
/// KEYS: dirty zset, dead-letter hash, lease. ARGV: fence, user, version, ...
static CLEAR: LazyLock<Script> = LazyLock::new(|| {
    Script::from_lua(format!(
        "{CLOSE_DEAD_LETTER}{}",
        r#"
if ARGV[1] ~= '' and redis.call('GET', KEYS[3]) ~= ARGV[1] then return -1 end
local n = 0
local dlq = redis.call('EXISTS', KEYS[2]) == 1
for i = 2, #ARGV, 2 do
  local s = redis.call('ZSCORE', KEYS[1], ARGV[i])
  if s and tonumber(s) == tonumber(ARGV[i + 1]) then
    redis.call('ZREM', KEYS[1], ARGV[i])
    n = n + 1
    if dlq then close_dead_letter(KEYS[2], ARGV[i] .. '|d', tonumber(ARGV[i + 1])) end
  end
end
return n
"#
    ))
});

/// Takes a free lease: allocates the shard's next epoch and stores
/// `token|epoch` with a TTL. The epoch is a hybrid logical clock,
/// `max(now_µs, last + 1)`, not a bare counter: if a Redis failover loses the
/// last acquisition (replication is asynchronous), the next owner still gets
/// an epoch above every one handed out before, as long as the new primary's
/// clock is not behind by more than the failover took. Fences compare the
/// whole `token|epoch` value, whose token is unique per process start, so even
/// a repeated epoch could not let a zombie clear flags.
/// KEYS: lease, epoch. ARGV: token, ttl ms. Returns the epoch, 0 if taken.
static ACQUIRE: LazyLock<Script> = LazyLock::new(|| {
    Script::from_lua(
        r#"
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local e = tonumber(redis.call('GET', KEYS[2]) or '0') + 1
if now > e then e = now end
local es = string.format('%.0f', e)
redis.call('SET', KEYS[2], es)
redis.call('SET', KEYS[1], ARGV[1] .. '|' .. es, 'PX', ARGV[2])
return e
"#,
    )
});

/// Extends a lease only if the caller still holds it. KEYS: lease. ARGV: value,
/// ttl ms. Returns 1 if renewed.
static RENEW: LazyLock<Script> = LazyLock::new(|| {
    Script::from_lua(
        r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
"#,
    )
});

/// Compare-and-delete of a lease: only the holder releases it. KEYS: lease.
/// ARGV: value. Returns 1 if released.
static RELEASE: LazyLock<Script> = LazyLock::new(|| {
    Script::from_lua(
        r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
"#,
    )
});

/// Raises applied versions in the L2 hash, never lowers them.
/// KEYS: applied hash. ARGV: field, version, field, version, ...
static APPLIED_MAX: LazyLock<Script> = LazyLock::new(|| {
    Script::from_lua(
        r#"
for i = 1, #ARGV, 2 do
  local cur = tonumber(redis.call('HGET', KEYS[1], ARGV[i]) or '0')
  if tonumber(ARGV[i + 1]) > cur then
    redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
  end
end
return 1
"#,
    )
});

/// Moves up to ARGV[1] members from the legacy set into the popped sorted set in
/// one step, scored by a pop id unique to this call (`max(now_µs, last + 1)`
/// from the pop clock), so an acknowledgement only removes what its own pop
/// moved. A member popped again by another drainer before the first one acked
/// carries the newer id and survives the first ack. Members are added in
/// chunks: Lua's `unpack` fails past about 8,000 values, and Redis keeps a
/// script's earlier writes when a later command fails.
/// KEYS: legacy set, popped zset, pop clock (same slot). ARGV: count.
/// Returns `{pop id, {members}}`; the id is 0 when the set was empty.
static LEGACY_POP: LazyLock<Script> = LazyLock::new(|| {
    Script::from_lua(
        r#"
local m = redis.call('SPOP', KEYS[1], tonumber(ARGV[1]))
if #m == 0 then return {'0', m} end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local id = tonumber(redis.call('GET', KEYS[3]) or '0') + 1
if now > id then id = now end
local ids = string.format('%.0f', id)
redis.call('SET', KEYS[3], ids)
for i = 1, #m, 500 do
  local args = {}
  for j = i, math.min(i + 499, #m) do
    args[#args + 1] = ids
    args[#args + 1] = m[j]
  end
  redis.call('ZADD', KEYS[2], unpack(args))
end
return {ids, m}
"#,
    )
});

/// Acknowledges popped members once they are flagged: removes each only if its
/// score is still the pop id it was moved with (compare-and-delete).
/// KEYS: popped zset. ARGV: member, pop id, member, pop id, ...
/// Returns how many were removed.
static LEGACY_ACK: LazyLock<Script> = LazyLock::new(|| {
    Script::from_lua(
        r#"
local n = 0
for i = 1, #ARGV, 2 do
  local s = redis.call('ZSCORE', KEYS[1], ARGV[i])
  if s and tonumber(s) == tonumber(ARGV[i + 1]) then
    redis.call('ZREM', KEYS[1], ARGV[i])
    n = n + 1
  end
end
return n
"#,
    )
});

/// Popped members whose drainer never acknowledged them (it died between pop
/// and ack): those popped more than ARGV[1] µs ago by Redis' clock, oldest
/// first, at most ARGV[2]. Members of the set-typed draining key of earlier
/// releases are first moved in with pop id 0, so they are recovered too.
/// KEYS: popped zset, earlier draining set. Returns `{member, pop id, ...}`.
static LEGACY_STALE: LazyLock<Script> = LazyLock::new(|| {
    Script::from_lua(
        r#"
if redis.call('TYPE', KEYS[2]).ok == 'set' then
  local old = redis.call('SPOP', KEYS[2], 500)
  for i = 1, #old do redis.call('ZADD', KEYS[1], 'NX', 0, old[i]) end
end
local t = redis.call('TIME')
local cutoff = tonumber(t[1]) * 1000000 + tonumber(t[2]) - tonumber(ARGV[1])
return redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', string.format('%.0f', cutoff),
  'WITHSCORES', 'LIMIT', 0, tonumber(ARGV[2]))
"#,
    )
});

/// Members moved out of the legacy set by one pop, each with its pop id.
pub type LegacyPop = Vec<(String, i64)>;

/// Values of profile-cache keys that mark a fill in progress start with this.
pub const CACHE_PLACEHOLDER: &str = "\u{1}fill:";

/// The Redis side of datasync.
#[derive(Clone)]
pub struct RedisStore {
    pool: Pool,
    keys: Keys,
    shards: u32,
}

impl RedisStore {
    /// Connects a pool (cluster routing when configured) with reconnection.
    pub async fn connect(c: &RedisConfig, shards: u32) -> Result<Self, RedisError> {
        let mut url = c.url.expose().to_string();
        if c.cluster && url.starts_with("redis://") {
            url = url.replacen("redis://", "redis-cluster://", 1);
        }
        let config = Config::from_url(&url)?;
        let pool = Builder::from_config(config)
            .with_connection_config(|cc| {
                cc.connection_timeout = Duration::from_secs(5);
                cc.internal_command_timeout = Duration::from_secs(10);
            })
            .with_performance_config(|p| {
                p.default_command_timeout = Duration::from_secs(30);
            })
            .set_policy(ReconnectPolicy::new_exponential(0, 100, 5_000, 2))
            .build_pool(c.pool_size)?;
        pool.init().await?;
        Ok(Self {
            pool,
            keys: Keys::from_config(c),
            shards,
        })
    }

    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    pub fn shards(&self) -> u32 {
        self.shards
    }

    pub fn client(&self) -> &Client {
        self.pool.next()
    }

    /// Flags users dirty, allocating a version for each; one script per shard,
    /// all shards at once. Returns `(user, version)` in input order.
    pub async fn mark(&self, users: &[String]) -> Result<Vec<(String, i64)>, RedisError> {
        let ids: Vec<&str> = users.iter().map(String::as_str).collect();
        let versions = self
            .allocate_versions(
                &MARK,
                &ids,
                |shard| self.keys.dirty(shard),
                |i| vec![users[i].clone()],
            )
            .await?;
        Ok(users.iter().cloned().zip(versions).collect())
    }

    /// Runs a version-allocating script (MARK, STAGE_STATIC) once per shard, all
    /// shards at once. Its KEYS are `first(shard)`, the shard's clock, then each
    /// user's profile-cache key; its ARGV are `args(i)` for each user index `i`.
    /// Returns one version per user, in input order.
    async fn allocate_versions(
        &self,
        script: &Script,
        users: &[&str],
        first: impl Fn(u32) -> String,
        args: impl Fn(usize) -> Vec<String>,
    ) -> Result<Vec<i64>, RedisError> {
        let by_shard = self.by_shard(users.iter().copied());
        let calls = by_shard.iter().map(|(&shard, idx)| {
            let mut keys = Vec::with_capacity(idx.len() + 2);
            keys.push(first(shard));
            keys.push(self.keys.clock(shard));
            keys.extend(
                idx.iter()
                    .map(|&i| self.keys.profile_cache(shard, users[i])),
            );
            let argv: Vec<String> = idx.iter().flat_map(|&i| args(i)).collect();
            async move {
                let v: Vec<i64> = script
                    .evalsha_with_reload(self.client(), keys, argv)
                    .await?;
                Ok::<_, RedisError>(v)
            }
        });
        let results = futures::future::try_join_all(calls).await?;
        let mut out = vec![0; users.len()];
        for ((_, idx), versions) in by_shard.iter().zip(results) {
            if versions.len() != idx.len() {
                return Err(RedisError::Reply {
                    what: "version allocation",
                    reply: format!("{} versions for {} users", versions.len(), idx.len()),
                });
            }
            for (&i, v) in idx.iter().zip(versions) {
                out[i] = v;
            }
        }
        Ok(out)
    }

    /// Writes profiles as JSON strings, pipelined.
    pub async fn write_profiles(&self, profiles: &[(String, String)]) -> Result<(), RedisError> {
        let pipe = self.client().pipeline();
        for (user, json) in profiles {
            let _: () = pipe
                .set(self.keys.profile(user), json.as_str(), None, None, false)
                .await?;
        }
        let _: Vec<RValue> = pipe.all().await?;
        Ok(())
    }

    /// The oldest flags of a shard with a version above `after`.
    pub async fn read_flags(
        &self,
        shard: u32,
        after: Option<i64>,
        limit: usize,
    ) -> Result<Vec<(String, i64)>, RedisError> {
        let min = match after {
            Some(v) => format!("({v}"),
            None => "-inf".to_string(),
        };
        let raw: Vec<(String, f64)> = self
            .client()
            .zrangebyscore(
                self.keys.dirty(shard),
                min.as_str(),
                "+inf",
                true,
                Some((0, limit as i64)),
            )
            .await?;
        Ok(raw.into_iter().map(|(u, s)| (u, s as i64)).collect())
    }

    /// How many flags the given shards hold, in one pipeline.
    pub async fn count_flags(
        &self,
        shards: impl IntoIterator<Item = u32>,
    ) -> Result<u64, RedisError> {
        let pipe = self.client().pipeline();
        for shard in shards {
            let _: () = pipe.zcard(self.keys.dirty(shard)).await?;
        }
        let counts: Vec<u64> = pipe.all().await?;
        Ok(counts.into_iter().sum())
    }

    /// Loads profiles: one pipeline of GETs, then one of HGETALLs for the keys
    /// that hold hashes. One result per user, in order.
    pub async fn load_profiles(
        &self,
        users: &[String],
    ) -> Result<Vec<Result<Document, ProfileError>>, RedisError> {
        let pipe = self.client().pipeline();
        for u in users {
            let _: () = pipe.get(self.keys.profile(u)).await?;
        }
        let replies: Vec<Result<RValue, fred::error::Error>> = pipe.try_all().await;
        let mut out = Vec::with_capacity(users.len());
        let mut hashes = Vec::new();
        for (i, (u, r)) in users.iter().zip(replies).enumerate() {
            let key = self.keys.profile(u);
            out.push(match r {
                Ok(RValue::Null) => Err(ProfileError::Missing { key }),
                Ok(v) => match v.as_bytes() {
                    Some(b) => parse_json_profile(&key, b),
                    None => Err(ProfileError::WrongType {
                        key,
                        kind: format!("{:?}", v.kind()),
                    }),
                },
                Err(e) if e.details().contains("WRONGTYPE") => {
                    hashes.push(i);
                    Err(ProfileError::WrongType {
                        key,
                        kind: "unknown".into(),
                    })
                }
                Err(e) => return Err(e.into()),
            });
        }
        if !hashes.is_empty() {
            let pipe = self.client().pipeline();
            for &i in &hashes {
                let _: () = pipe.hgetall(self.keys.profile(&users[i])).await?;
                let _: () = pipe.r#type(self.keys.profile(&users[i])).await?;
            }
            let replies: Vec<RValue> = pipe.all().await?;
            for (&i, pair) in hashes.iter().zip(replies.chunks(2)) {
                let key = self.keys.profile(&users[i]);
                let kind = pair[1].as_string().unwrap_or_default();
                out[i] = if kind == "hash" {
                    let map: BTreeMap<String, String> = pair[0].clone().convert()?;
                    Ok(map.into_iter().map(|(k, v)| (k, Bson::String(v))).collect())
                } else {
                    Err(ProfileError::WrongType { key, kind })
                };
            }
        }
        Ok(out)
    }

    /// Compare-and-delete of a shard's flags. Returns how many were removed.
    /// With a `fence` (the lease value the caller holds), nothing is removed
    /// unless the caller still holds the shard's lease.
    pub async fn clear_flags(
        &self,
        shard: u32,
        flags: &[(String, i64)],
        fence: Option<&str>,
    ) -> Result<u64, RedisError> {
        if flags.is_empty() {
            return Ok(0);
        }
        let mut args = Vec::with_capacity(flags.len() * 2 + 1);
        args.push(fence.unwrap_or_default().to_string());
        for (u, v) in flags {
            args.push(u.clone());
            args.push(v.to_string());
        }
        let n: i64 = CLEAR
            .evalsha_with_reload(
                self.client(),
                vec![
                    self.keys.dirty(shard),
                    self.keys.dlq(shard),
                    self.keys.lease(shard),
                ],
                args,
            )
            .await?;
        if n < 0 {
            return Err(RedisError::Fenced { shard });
        }
        Ok(n as u64)
    }

    /// Accepts immediate changes of users' static profiles (`(user, JSON
    /// object)`), one script per shard; returns their versions in order.
    pub async fn stage_static(&self, changes: &[(&str, String)]) -> Result<Vec<i64>, RedisError> {
        let users: Vec<&str> = changes.iter().map(|c| c.0).collect();
        self.allocate_versions(
            &STAGE_STATIC,
            &users,
            |shard| self.keys.static_pending(shard),
            |i| vec![changes[i].0.to_string(), changes[i].1.clone()],
        )
        .await
    }

    /// Immediate changes of one shard the broker has not acknowledged.
    pub async fn static_pending(&self, shard: u32) -> Result<Vec<PendingStatic>, RedisError> {
        let map: BTreeMap<String, String> = self
            .client()
            .hgetall(self.keys.static_pending(shard))
            .await?;
        Ok(map
            .into_iter()
            .filter_map(|(user_id, v)| {
                let (version, state, json) = parse_pending(&v)?;
                (state != PendingState::Acked).then(|| PendingStatic {
                    user_id,
                    version,
                    json: json.to_string(),
                    redriven: state == PendingState::Redriven,
                })
            })
            .collect())
    }

    /// The accepted immediate change of one user not yet settled in MongoDB,
    /// acknowledged or not: `(version, JSON)`.
    pub async fn static_pending_of(&self, user: &str) -> Result<Option<(i64, String)>, RedisError> {
        let shard = shard_of(user, self.shards);
        let v: Option<String> = self
            .client()
            .hget(self.keys.static_pending(shard), user)
            .await?;
        Ok(v.and_then(|v| {
            let (version, _, json) = parse_pending(&v)?;
            Some((version, json.to_string()))
        }))
    }

    /// Marks immediate changes acknowledged by the broker: `(user, version)`.
    pub async fn static_acked(&self, entries: &[(&str, i64)]) -> Result<(), RedisError> {
        self.static_script(&STATIC_ACKED, entries, |shard| {
            vec![self.keys.static_pending(shard)]
        })
        .await
    }

    /// Drops immediate changes MongoDB has settled, and closes their static
    /// dead letters: `(user, version)`.
    pub async fn static_settled(&self, entries: &[(&str, i64)]) -> Result<(), RedisError> {
        self.static_script(&STATIC_SETTLED, entries, |shard| {
            vec![self.keys.static_pending(shard), self.keys.dlq(shard)]
        })
        .await
    }

    async fn static_script(
        &self,
        script: &Script,
        entries: &[(&str, i64)],
        keys: impl Fn(u32) -> Vec<String>,
    ) -> Result<(), RedisError> {
        for (shard, idx) in self.by_shard(entries.iter().map(|e| e.0)) {
            let mut args = Vec::with_capacity(idx.len() * 2);
            for &i in &idx {
                args.push(entries[i].0.to_string());
                args.push(entries[i].1.to_string());
            }
            let _: i64 = script
                .evalsha_with_reload(self.client(), keys(shard), args)
                .await?;
        }
        Ok(())
    }

    /// Puts users' pending immediate changes back in line for publishing with
    /// new versions (a DLQ redrive). One version per user, in order; `None`
    /// where the user has no pending change (it was applied or superseded).
    pub async fn restage_static(&self, users: &[&str]) -> Result<Vec<Option<i64>>, RedisError> {
        let versions = self
            .allocate_versions(
                &RESTAGE_STATIC,
                users,
                |shard| self.keys.static_pending(shard),
                |i| vec![users[i].to_string()],
            )
            .await?;
        Ok(versions.into_iter().map(|v| (v > 0).then_some(v)).collect())
    }

    /// The flag version of a user, if it is flagged.
    pub async fn flag_of(&self, user: &str) -> Result<Option<i64>, RedisError> {
        let shard = shard_of(user, self.shards);
        let v: Option<f64> = self.client().zscore(self.keys.dirty(shard), user).await?;
        Ok(v.map(|v| v as i64))
    }

    /// The cached composed profile of `user`, or a fill placeholder: `Ok(Some)`
    /// is a hit; `Ok(None)` means the caller placed `placeholder` and should
    /// fill with [`cache_fill`](Self::cache_fill).
    pub async fn cache_get_or_lease(
        &self,
        user: &str,
        placeholder: &str,
    ) -> Result<Option<String>, RedisError> {
        let key = self.keys.profile_cache(shard_of(user, self.shards), user);
        let pipe = self.client().pipeline();
        let _: () = pipe
            .set(
                &key,
                placeholder,
                Some(Expiration::PX(5_000)),
                Some(SetOptions::NX),
                false,
            )
            .await?;
        let _: () = pipe.get(&key).await?;
        let (_, current): (RValue, Option<String>) = pipe.all().await?;
        Ok(current.filter(|c| c != placeholder && !c.starts_with(CACHE_PLACEHOLDER)))
    }

    /// Stores a composed profile if no invalidation happened since the lease.
    pub async fn cache_fill(
        &self,
        user: &str,
        placeholder: &str,
        value: &str,
        ttl: Duration,
    ) -> Result<bool, RedisError> {
        let key = self.keys.profile_cache(shard_of(user, self.shards), user);
        let n: i64 = CACHE_FILL
            .evalsha_with_reload(
                self.client(),
                vec![key],
                vec![
                    placeholder.to_string(),
                    value.to_string(),
                    ttl.as_millis().to_string(),
                ],
            )
            .await?;
        Ok(n == 1)
    }

    /// Drops cached composed profiles (after MongoDB changed).
    pub async fn cache_invalidate(&self, users: &[&str]) -> Result<(), RedisError> {
        if users.is_empty() {
            return Ok(());
        }
        let pipe = self.client().pipeline();
        for u in users {
            let _: () = pipe
                .del(self.keys.profile_cache(shard_of(u, self.shards), u))
                .await?;
        }
        let _: Vec<RValue> = pipe.all().await?;
        Ok(())
    }

    /// Tries to take a free lease; the new epoch, or `None` if it is held.
    pub async fn lease_acquire(
        &self,
        shard: u32,
        token: &str,
        ttl: Duration,
    ) -> Result<Option<i64>, RedisError> {
        let e: i64 = ACQUIRE
            .evalsha_with_reload(
                self.client(),
                vec![self.keys.lease(shard), self.keys.epoch(shard)],
                vec![token.to_string(), ttl.as_millis().to_string()],
            )
            .await?;
        Ok((e > 0).then_some(e))
    }

    /// Extends a lease held as `value`; false if it is no longer held so.
    pub async fn lease_renew(
        &self,
        shard: u32,
        value: &str,
        ttl: Duration,
    ) -> Result<bool, RedisError> {
        let n: i64 = RENEW
            .evalsha_with_reload(
                self.client(),
                vec![self.keys.lease(shard)],
                vec![value.to_string(), ttl.as_millis().to_string()],
            )
            .await?;
        Ok(n == 1)
    }

    /// Releases a lease held as `value`.
    pub async fn lease_release(&self, shard: u32, value: &str) -> Result<bool, RedisError> {
        let n: i64 = RELEASE
            .evalsha_with_reload(
                self.client(),
                vec![self.keys.lease(shard)],
                vec![value.to_string()],
            )
            .await?;
        Ok(n == 1)
    }

    /// Every shard's lease value and remaining TTL (ms), in one pipeline.
    pub async fn leases(&self) -> Result<Vec<(Option<String>, i64)>, RedisError> {
        let pipe = self.client().pipeline();
        for shard in 0..self.shards {
            let _: () = pipe.get(self.keys.lease(shard)).await?;
            let _: () = pipe.pttl(self.keys.lease(shard)).await?;
        }
        let replies: Vec<RValue> = pipe.all().await?;
        Ok(replies
            .chunks(2)
            .map(|p| (p[0].as_string(), p[1].as_i64().unwrap_or(-2)))
            .collect())
    }

    /// Records this instance's heartbeat, drops expired members, and returns
    /// the live members, sorted.
    pub async fn heartbeat(
        &self,
        instance: &str,
        ttl: Duration,
    ) -> Result<Vec<String>, RedisError> {
        let now = crate::actors::publisher::now_ms();
        let key = self.keys.members();
        let pipe = self.client().pipeline();
        let _: () = pipe
            .zadd(
                &key,
                None,
                None,
                false,
                false,
                ((now + ttl.as_millis() as i64) as f64, instance),
            )
            .await?;
        let _: () = pipe
            .zremrangebyscore(&key, f64::NEG_INFINITY, now as f64)
            .await?;
        let _: () = pipe.zrange(&key, 0, -1, None, false, None, false).await?;
        let (_, _, mut members): (i64, i64, Vec<String>) = pipe.all().await?;
        members.sort();
        Ok(members)
    }

    /// Removes this instance from the members (graceful stop).
    pub async fn leave(&self, instance: &str) -> Result<(), RedisError> {
        let _: i64 = self.client().zrem(self.keys.members(), instance).await?;
        Ok(())
    }

    /// The stored dead-letter entries (JSON) of `(user, section)` pairs, `None`
    /// where none is open.
    pub async fn dlq_entries(
        &self,
        keys: &[(&str, Section)],
    ) -> Result<Vec<Option<String>>, RedisError> {
        let mut out = vec![None; keys.len()];
        for (shard, idx) in self.by_shard(keys.iter().map(|k| k.0)) {
            let fields: Vec<String> = idx
                .iter()
                .map(|&i| section_field(keys[i].0, keys[i].1))
                .collect();
            let got: Vec<Option<String>> = if fields.len() == 1 {
                vec![self.client().hget(self.keys.dlq(shard), &fields[0]).await?]
            } else {
                self.client().hmget(self.keys.dlq(shard), fields).await?
            };
            for (i, v) in idx.into_iter().zip(got) {
                out[i] = v;
            }
        }
        Ok(out)
    }

    /// Opens (or replaces) dead-letter entries: `(user, section, JSON)`.
    pub async fn dlq_put(&self, entries: &[(&str, Section, String)]) -> Result<(), RedisError> {
        for (shard, idx) in self.by_shard(entries.iter().map(|e| e.0)) {
            let map: Vec<(String, &str)> = idx
                .iter()
                .map(|&i| {
                    let (u, s, json) = &entries[i];
                    (section_field(u, *s), json.as_str())
                })
                .collect();
            let _: i64 = self.client().hset(self.keys.dlq(shard), map).await?;
        }
        Ok(())
    }

    /// Closes dead-letter entries `(user, section)`; returns how many were open.
    /// Closing a dynamic entry also closes the user's entry in the one-field-
    /// per-user form of earlier releases.
    pub async fn dlq_remove(&self, keys: &[(&str, Section)]) -> Result<u64, RedisError> {
        let mut n = 0;
        for (shard, idx) in self.by_shard(keys.iter().map(|k| k.0)) {
            let mut fields = Vec::with_capacity(idx.len());
            for &i in &idx {
                let (u, s) = keys[i];
                fields.push(section_field(u, s));
                if s == Section::Dynamic {
                    fields.push(u.to_string());
                }
            }
            let removed: u64 = self.client().hdel(self.keys.dlq(shard), fields).await?;
            n += removed;
        }
        Ok(n)
    }

    /// Open dead letters per shard, in one pipeline.
    pub async fn dlq_counts(&self) -> Result<Vec<u64>, RedisError> {
        let pipe = self.client().pipeline();
        for shard in 0..self.shards {
            let _: () = pipe.hlen(self.keys.dlq(shard)).await?;
        }
        Ok(pipe.all().await?)
    }

    /// Every open dead letter of one shard: `(user, section, JSON)`.
    pub async fn dlq_shard(
        &self,
        shard: u32,
    ) -> Result<Vec<(String, Section, String)>, RedisError> {
        let map: BTreeMap<String, String> = self.client().hgetall(self.keys.dlq(shard)).await?;
        Ok(map
            .into_iter()
            .map(|(field, json)| {
                let (user, section) = parse_section_field(&field);
                (user.to_string(), section, json)
            })
            .collect())
    }

    /// Parks an encoded dead-letter record until Kafka is back.
    pub async fn outbox_push(&self, records: &[Vec<u8>]) -> Result<(), RedisError> {
        if records.is_empty() {
            return Ok(());
        }
        let pipe = self.client().pipeline();
        for r in records {
            let _: () = pipe
                .xadd(
                    self.keys.dlq_outbox(),
                    false,
                    None,
                    "*",
                    vec![("record", bytes::Bytes::copy_from_slice(r))],
                )
                .await?;
        }
        let _: Vec<RValue> = pipe.all().await?;
        Ok(())
    }

    /// The oldest `n` parked records: `(stream id, bytes)`.
    pub async fn outbox_read(&self, n: u64) -> Result<Vec<(String, Vec<u8>)>, RedisError> {
        let entries: Vec<(String, HashMap<String, bytes::Bytes>)> = self
            .client()
            .xrange(self.keys.dlq_outbox(), "-", "+", Some(n))
            .await?;
        Ok(entries
            .into_iter()
            .filter_map(|(id, mut f)| f.remove("record").map(|b| (id, b.to_vec())))
            .collect())
    }

    /// Drops forwarded records from the outbox.
    pub async fn outbox_ack(&self, ids: &[String]) -> Result<(), RedisError> {
        if ids.is_empty() {
            return Ok(());
        }
        let _: i64 = self
            .client()
            .xdel(self.keys.dlq_outbox(), ids.to_vec())
            .await?;
        Ok(())
    }

    /// Records parked in the outbox.
    pub async fn outbox_len(&self) -> Result<u64, RedisError> {
        Ok(self.client().xlen(self.keys.dlq_outbox()).await?)
    }

    /// Groups item indices by the shard of their user.
    fn by_shard<'a>(&self, users: impl Iterator<Item = &'a str>) -> BTreeMap<u32, Vec<usize>> {
        let mut m: BTreeMap<u32, Vec<usize>> = BTreeMap::new();
        for (i, u) in users.enumerate() {
            m.entry(shard_of(u, self.shards)).or_default().push(i);
        }
        m
    }

    /// L2: the applied `(static, dynamic)` versions of users of one shard, in one
    /// HMGET (`None` = unknown).
    pub async fn applied_versions(
        &self,
        shard: u32,
        users: &[&str],
    ) -> Result<Vec<(Option<i64>, Option<i64>)>, RedisError> {
        if users.is_empty() {
            return Ok(vec![]);
        }
        let fields: Vec<String> = users
            .iter()
            .flat_map(|u| {
                [
                    section_field(u, Section::Static),
                    section_field(u, Section::Dynamic),
                ]
            })
            .collect();
        let raw: Vec<Option<i64>> = self
            .client()
            .hmget(self.keys.applied(shard), fields)
            .await?;
        Ok(raw.chunks(2).map(|p| (p[0], p[1])).collect())
    }

    /// L2: raises the applied versions of one shard.
    pub async fn raise_applied(
        &self,
        shard: u32,
        entries: &[(&str, Section, i64)],
    ) -> Result<(), RedisError> {
        if entries.is_empty() {
            return Ok(());
        }
        let mut args = Vec::with_capacity(entries.len() * 2);
        for (u, s, v) in entries {
            args.push(section_field(u, *s));
            args.push(v.to_string());
        }
        let _: i64 = APPLIED_MAX
            .evalsha_with_reload(self.client(), vec![self.keys.applied(shard)], args)
            .await?;
        Ok(())
    }

    /// Moves up to `n` members of the legacy set into the popped set; the pop
    /// id and the members. Acknowledge them with [`legacy_ack`](Self::legacy_ack)
    /// once they are flagged.
    pub async fn legacy_pop(&self, n: usize) -> Result<LegacyPop, RedisError> {
        let keys = vec![
            self.keys.legacy().to_string(),
            self.keys.legacy_popped(),
            self.keys.legacy_pop_clock(),
        ];
        let (id, members): (String, Vec<String>) = LEGACY_POP
            .evalsha_with_reload(self.client(), keys, vec![n as i64])
            .await?;
        let id = id.parse().map_err(|_| RedisError::Reply {
            what: "legacy pop",
            reply: id.clone(),
        })?;
        Ok(members.into_iter().map(|m| (m, id)).collect())
    }

    /// Up to `n` popped members left unacknowledged for longer than `after` (by
    /// a drainer that died between pop and ack), with their pop ids.
    pub async fn legacy_unacked(&self, n: usize, after: Duration) -> Result<LegacyPop, RedisError> {
        let keys = vec![self.keys.legacy_popped(), self.keys.legacy_draining()];
        let flat: Vec<String> = LEGACY_STALE
            .evalsha_with_reload(
                self.client(),
                keys,
                vec![after.as_micros().to_string(), n.to_string()],
            )
            .await?;
        flat.chunks(2)
            .map(|p| match p {
                [m, s] => s
                    .parse::<f64>()
                    .map(|s| (m.clone(), s as i64))
                    .map_err(|_| RedisError::Reply {
                        what: "popped legacy members",
                        reply: s.clone(),
                    }),
                _ => Err(RedisError::Reply {
                    what: "popped legacy members",
                    reply: format!("{p:?}"),
                }),
            })
            .collect()
    }

    /// Acknowledges flagged members: removes each one only if it still carries
    /// the pop id it was taken with. Returns how many were removed.
    pub async fn legacy_ack(&self, popped: &[(String, i64)]) -> Result<u64, RedisError> {
        if popped.is_empty() {
            return Ok(0);
        }
        let mut args = Vec::with_capacity(popped.len() * 2);
        for (m, id) in popped {
            args.push(m.clone());
            args.push(id.to_string());
        }
        let n: i64 = LEGACY_ACK
            .evalsha_with_reload(self.client(), vec![self.keys.legacy_popped()], args)
            .await?;
        Ok(n as u64)
    }

    /// PING, for readiness.
    pub async fn ping(&self) -> Result<(), RedisError> {
        let _: String = self.client().ping(None).await?;
        Ok(())
    }
}

/// Where an accepted immediate change stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PendingState {
    /// `p`: not yet acknowledged by the broker.
    Published,
    /// `r`: put back in line by a DLQ redrive; published at the next scan.
    Redriven,
    /// `a`: acknowledged by the broker, waiting for MongoDB.
    Acked,
}

/// An immediate change the broker has not acknowledged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingStatic {
    pub user_id: String,
    pub version: i64,
    /// The static profile, a JSON object.
    pub json: String,
    /// Put back in line by a redrive: publish it without waiting.
    pub redriven: bool,
}

/// `"<version>|<p, r or a>|<JSON>"` → (version, state, JSON).
fn parse_pending(v: &str) -> Option<(i64, PendingState, &str)> {
    let (version, rest) = v.split_once('|')?;
    let (state, json) = rest.split_once('|')?;
    let state = match state {
        "p" => PendingState::Published,
        "r" => PendingState::Redriven,
        "a" => PendingState::Acked,
        _ => return None,
    };
    Some((version.parse().ok()?, state, json))
}

/// The hash field of one section of one user: `<user>|s` or `<user>|d` (the
/// applied-version cache and the dead-letter hash).
fn section_field(user: &str, section: Section) -> String {
    format!("{user}|{}", section.tag())
}

/// The inverse of [`section_field`]; a field without a section suffix (the
/// dead-letter form of earlier releases) is dynamic.
fn parse_section_field(field: &str) -> (&str, Section) {
    match field.rsplit_once('|') {
        Some((u, "s")) => (u, Section::Static),
        Some((u, "d")) => (u, Section::Dynamic),
        _ => (field, Section::Dynamic),
    }
}

fn parse_json_profile(key: &str, bytes: &[u8]) -> Result<Document, ProfileError> {
    let v: serde_json::Value =
        serde_json::from_slice(bytes).map_err(|e| ProfileError::BadJson {
            key: key.to_string(),
            reason: e.to_string(),
        })?;
    match json_to_bson(&v) {
        Bson::Document(d) => Ok(d),
        _ => Err(ProfileError::NotAnObject {
            key: key.to_string(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_profiles_parse_or_name_the_problem() {
        assert!(parse_json_profile("k", br#"{"a":1}"#).is_ok());
        assert_eq!(
            parse_json_profile("k", b"[1]"),
            Err(ProfileError::NotAnObject { key: "k".into() })
        );
        let err = parse_json_profile("user:1:profile", b"{oops").unwrap_err();
        assert!(
            err.to_string()
                .starts_with("profile key `user:1:profile` is not valid JSON"),
            "{err}"
        );
    }
}
