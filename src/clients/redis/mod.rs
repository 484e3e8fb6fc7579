//! Redis: the source of profiles and dirty flags, the version clocks, the
//! leases, the dead-letter entries and the L2 cache of applied versions.
//!
//! [`RedisStore`] is one type with an `impl` block per concern, one file each:
//!
//! - [`flags`]: marking users dirty (versions from the shard clocks), reading a
//!   shard's flags oldest-first, and the fenced compare-and-delete that clears
//!   them once published: `scripts/mark.lua`, `scripts/clear_flags.lua`.
//! - [`deletes`]: deleting users (a versioned delete, flagged like a mark).
//! - [`profiles`]: writing and loading the upstream's profiles, and walking
//!   their keys.
//! - [`legacy`]: draining the seed's `SADD` flag set.
//! - [`static_pending`]: immediate changes accepted and not yet in MongoDB.
//! - [`applied`]: the L2 cache of applied versions.
//! - [`profile_cache`]: the L2 cache of composed profiles for reads.
//! - [`jobs`]: background jobs' records, locks and leases (resync,
//!   consistency checks).
//! - [`leases`]: shard leases, fencing epochs and membership heartbeats.
//! - [`dlq`]: open dead-letter entries; [`outbox`]: dead letters parked while
//!   Kafka is away.
//!
//! Every multi-key operation is a Lua script over the keys of one shard (one
//! cluster slot), kept as a file under `scripts/` whose header states its KEYS,
//! ARGV and reply; shared fragments live in `scripts/includes/`. Scripts are
//! loaded once and called by SHA. Every per-user read is pipelined. A few
//! batch commands (the idle scan's `shards_with_work.lua`, the cached-profile
//! invalidation) take every shard's keys at once on a single Redis and one
//! shard's a call on a cluster (`slot_groups`).

mod applied;
mod deletes;
mod dlq;
mod flags;
mod jobs;
mod leases;
mod legacy;
mod offsets;
mod operations;
mod outbox;
mod profile_cache;
mod profiles;
mod sinks;
mod static_pending;
mod whitelist;

pub use jobs::Checkpoint;
pub use legacy::LegacyPop;
pub use profile_cache::CACHE_PLACEHOLDER;
pub use profiles::ScanCursor;
pub use static_pending::{PendingState, PendingStatic};
pub use whitelist::WhitelistChange;

use crate::{
    config::RedisConfig,
    model::Section,
    shard::{Keys, shard_of},
};
use fred::{
    clients::WithOptions,
    interfaces::ConfigInterface,
    prelude::*,
    types::{ClusterHash, CustomCommand, FromValue, scripts::Script},
};
use std::{collections::BTreeMap, time::Duration};

/// A command sent [`now_or_never`](RedisStore::now_or_never) is written to
/// Redis within this long of the call, or not at all.
const NOW_OR_NEVER: Duration = Duration::from_secs(2);

/// A Lua script from `scripts/`, with the fragments it names from
/// `scripts/includes/` put before it; built once, called by SHA.
macro_rules! lua_script {
    ($file:literal $(, $include:literal)*) => {
        std::sync::LazyLock::new(|| {
            fred::types::scripts::Script::from_lua(concat!(
                $(include_str!(concat!("scripts/includes/", $include)), "\n",)*
                include_str!(concat!("scripts/", $file))
            ))
        })
    };
}
use lua_script;

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

/// The Redis side of datasync.
#[derive(Clone)]
pub struct RedisStore {
    pool: Pool,
    keys: Keys,
    shards: u32,
    /// A Redis Cluster: a script may only touch keys of one slot.
    cluster: bool,
}

impl RedisStore {
    /// Connects a pool (cluster routing when configured) with reconnection.
    pub async fn connect(c: &RedisConfig, shards: u32) -> Result<Self, RedisError> {
        let mut url = c.url.expose().to_string();
        if c.cluster {
            for scheme in ["redis", "rediss"] {
                if let Some(rest) = url.strip_prefix(&format!("{scheme}://")) {
                    url = format!("{scheme}-cluster://{rest}");
                    break;
                }
            }
        }
        crate::tls::ensure_provider();
        let mut config = Config::from_url(&url)?;
        if config.tls.is_some() {
            let tls = crate::tls::client_config(&c.tls_ca).map_err(|e| {
                fred::error::Error::new(
                    fred::error::ErrorKind::Tls,
                    format!("redis.tls_ca: {}", crate::error::report(e.as_ref())),
                )
            })?;
            config.tls = Some(tls.into());
        }
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
            cluster: c.cluster,
        })
    }

    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    pub fn shards(&self) -> u32 {
        self.shards
    }

    /// Runs a version-allocating script (MARK, DELETE, STAGE_STATIC) once per
    /// shard, all shards at once. Its KEYS are `lead(shard)`, the shard's
    /// clock, then each user's profile-cache key; its ARGV are `args(i)` for
    /// each user index `i`. Returns one version per user, in input order.
    async fn allocate_versions(
        &self,
        delivery: Delivery,
        script: &'static Script,
        users: &[&str],
        lead: impl Fn(u32) -> Vec<String>,
        args: impl Fn(usize) -> Vec<String>,
    ) -> Result<Vec<i64>, RedisError> {
        let by_shard = self.by_shard(users.iter().copied());
        let calls = by_shard.iter().map(|(&shard, idx)| {
            let mut keys = lead(shard);
            keys.reserve(idx.len() + 1);
            keys.push(self.keys.clock(shard));
            keys.extend(
                idx.iter()
                    .map(|&i| self.keys.profile_cache(shard, users[i])),
            );
            let argv: Vec<String> = idx.iter().flat_map(|&i| args(i)).collect();
            async move {
                let v: Vec<i64> = match delivery {
                    Delivery::Queued => {
                        script
                            .evalsha_with_reload(self.client(), keys, argv)
                            .await?
                    }
                    Delivery::NowOrNever => {
                        detached(eval(script, self.now_or_never(), keys, argv)).await?
                    }
                };
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

    /// The key lists that one multi-key command may take, from one list a
    /// shard (in order): on a cluster each shard's keys alone (they share its
    /// slot), on a single Redis all of them at once, so a batch costs one
    /// command there instead of one a shard.
    fn slot_groups(&self, per_shard: impl IntoIterator<Item = Vec<String>>) -> Vec<Vec<String>> {
        if self.cluster {
            per_shard.into_iter().filter(|k| !k.is_empty()).collect()
        } else {
            let all: Vec<String> = per_shard.into_iter().flatten().collect();
            if all.is_empty() { vec![] } else { vec![all] }
        }
    }

    /// Groups item indices by the shard of their user.
    fn by_shard<'a>(&self, users: impl Iterator<Item = &'a str>) -> BTreeMap<u32, Vec<usize>> {
        let mut m: BTreeMap<u32, Vec<usize>> = BTreeMap::new();
        for (i, u) in users.enumerate() {
            m.entry(shard_of(u, self.shards)).or_default().push(i);
        }
        m
    }

    /// PING, for readiness.
    pub async fn ping(&self) -> Result<(), RedisError> {
        let _: String = self.client().ping(None).await?;
        Ok(())
    }

    /// `CONFIG GET` of a parameter or glob pattern: each matching parameter
    /// and its value.
    pub async fn config_get(
        &self,
        pattern: &str,
    ) -> Result<std::collections::HashMap<String, String>, RedisError> {
        Ok(self.client().config_get(pattern).await?)
    }

    /// A connection of the pool, for the commands of this module's files.
    fn client(&self) -> &Client {
        self.pool.next()
    }

    /// A client whose commands go out now or not at all, for writes that
    /// carry (or remove) a profile and take their version when Redis runs
    /// them. Queued through a Redis restart, such a write could land seconds
    /// after its caller gave up and wrote the user's next change through
    /// another connection or service, and overwrite that newer change with
    /// the older one. So while the connection is down a command fails at
    /// once instead of waiting for the reconnection, and one still waiting
    /// in the client (for the reconnection, or to be sent again after the
    /// connection dropped) when [`NOW_OR_NEVER`] has passed is dropped
    /// unwritten: fred skips a command it has timed out. Run such commands
    /// with [`detached`], so the timeout runs even when the caller gives up
    /// first. The caller gets an error and retries with what is current.
    /// (A cluster's redirections are still followed within the deadline.)
    fn now_or_never(&self) -> WithOptions<Client> {
        self.fail_fast(NOW_OR_NEVER)
    }

    /// A client whose commands fail at once while the connection is down,
    /// and time out after `timeout`, instead of waiting for the reconnection.
    fn fail_fast(&self, timeout: Duration) -> WithOptions<Client> {
        self.client().with_options(&Options {
            fail_fast: true,
            timeout: Some(timeout),
            ..Default::default()
        })
    }
}

/// How a command waits for a connection: see [`RedisStore::now_or_never`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Delivery {
    /// Queued through a reconnection (fred's default): for reads, and for
    /// writes that are versioned or idempotent, so a late one does no harm.
    Queued,
    /// Sent now or failed.
    NowOrNever,
}

/// Runs a command in a task of its own, to its end: fred marks a command
/// timed out only when its future sees the timeout, and writes one whose
/// caller merely dropped it once the connection is back. Detached, a
/// now-or-never command is timed out even if its caller gives up first.
async fn detached<T: Send + 'static>(
    command: impl Future<Output = Result<T, fred::error::Error>> + Send + 'static,
) -> Result<T, fred::error::Error> {
    tokio::spawn(command).await.map_err(|e| {
        fred::error::Error::new(fred::error::ErrorKind::Canceled, format!("redis call: {e}"))
    })?
}

/// `EVALSHA` through a client with options, loading the script on a
/// `NOSCRIPT` reply (a now-or-never call runs it [`detached`]). fred's `Script::evalsha_with_reload`
/// takes a plain `Client` (a client with options derefs to one and loses
/// them), and a client with options has no `LuaInterface`, so the command
/// goes as a custom one, routed on a cluster by its first key.
async fn eval<R: FromValue + Send + 'static>(
    script: &'static Script,
    client: WithOptions<Client>,
    keys: Vec<String>,
    args: Vec<String>,
) -> Result<R, fred::error::Error> {
    let mut argv: Vec<Value> = Vec::with_capacity(2 + keys.len() + args.len());
    argv.push(script.sha1().clone().into());
    argv.push((keys.len() as i64).into());
    argv.extend(keys.into_iter().map(Value::from));
    argv.extend(args.into_iter().map(Value::from));
    let started = std::time::Instant::now();
    let evalsha = CustomCommand::new_static("EVALSHA", ClusterHash::Offset(2), false);
    match client
        .custom::<R, Value>(evalsha.clone(), argv.clone())
        .await
    {
        Err(e) if e.details().starts_with("NOSCRIPT") => {
            script.load(&client).await?;
            // The call keeps its deadline: the retry gets what is left.
            let mut options = client.options().clone();
            if let Some(timeout) = options.timeout {
                let left = timeout.saturating_sub(started.elapsed());
                if left.is_zero() {
                    return Err(fred::error::Error::new(
                        fred::error::ErrorKind::Timeout,
                        "redis call: no time left after loading the script",
                    ));
                }
                options.timeout = Some(left);
            }
            client.with_options(&options).custom(evalsha, argv).await
        }
        result => result,
    }
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
