//! Typed configuration: `config/default.toml` (embedded), then a file given with
//! `--config`, then environment variables `DATASYNC__SECTION__KEY`.
//!
//! Loading reports every problem at once — unknown keys, values of the wrong type,
//! and values that fail validation — so `datasync config check` can list them all.

use serde::{Deserialize, Serialize};
use std::{fmt, path::Path, time::Duration};

mod healing;
mod operations;
mod security;
mod sinks;
pub use healing::{ConsistencyConfig, MissingProfile, ResyncConfig};
pub use operations::{OperationsConfig, ReplayConfig, WhitelistConfig};
pub use security::{
    ADMIN_TOKEN_NAME, HttpConfig, KafkaClientProperties, RateLimit, RateLimits, Role, TokenConfig,
    is_loopback,
};
pub use sinks::{SinkConfig, SinkKind};

/// The embedded defaults.
pub const DEFAULT_TOML: &str = include_str!("../../config/default.toml");

/// Prefix of the environment variables that override config keys.
pub const ENV_PREFIX: &str = "DATASYNC__";

/// The largest `sync.page_size`: one page is one pipeline, one publish batch
/// and one clear script, and Redis blocks while a script runs.
pub const MAX_PAGE_SIZE: usize = 50_000;

/// Every problem found while loading or validating a configuration.
#[derive(Debug, thiserror::Error)]
pub struct ConfigError {
    pub problems: Vec<String>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "invalid configuration ({} problem(s)):",
            self.problems.len()
        )?;
        for p in &self.problems {
            writeln!(f, "  - {p}")?;
        }
        Ok(())
    }
}

/// A value that must never be printed (tokens, passwords).
#[derive(Clone, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Self(s.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// A connection URL with its password (if any) replaced by `***`, for logs
/// and errors.
pub fn mask_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let (authority, tail) = match rest.find(['/', '?']) {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split_once(':').map_or(userinfo, |(u, _)| u);
            format!("{scheme}://{user}:***@{host}{tail}")
        }
        None => url.to_string(),
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.0.is_empty() { "\"\"" } else { "\"***\"" })
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct Config {
    pub instance: InstanceConfig,
    pub redis: RedisConfig,
    pub kafka: KafkaConfig,
    pub mongo: MongoConfig,
    pub sync: SyncConfig,
    pub mailbox: MailboxConfig,
    pub applier: ApplierConfig,
    pub cache: CacheConfig,
    pub http: HttpConfig,
    pub lease: LeaseConfig,
    pub retry: crate::retry::RetryConfig,
    pub dlq: DlqConfig,
    pub shutdown: ShutdownConfig,
    pub startup: StartupConfig,
    pub telemetry: TelemetryConfig,
    pub resync: ResyncConfig,
    pub consistency: ConsistencyConfig,
    pub replay: ReplayConfig,
    pub whitelist: WhitelistConfig,
    pub operations: OperationsConfig,
    /// Where changes are applied (`[[sinks]]`); empty = `[mongo]` alone.
    #[serde(default)]
    pub sinks: Vec<SinkConfig>,
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ShardMode {
    /// This instance scans every shard.
    All,
    /// The seed's static split: shards where `shard % total == index`, each
    /// still guarded by its lease.
    Fixed,
    /// Leases on every shard, shared evenly among the live instances.
    Lease,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct InstanceConfig {
    /// This instance's name in events and logs; empty = `<hostname>-<pid>`.
    pub id: String,
    /// How shards are assigned to this instance.
    pub mode: ShardMode,
    /// With `mode = "fixed"`: this instance's index, `0..total`.
    pub index: u32,
    /// With `mode = "fixed"`: how many instances split the shards.
    pub total: u32,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct RedisConfig {
    /// `redis://[user:password@]host:port[/db]`; `rediss://` for TLS.
    pub url: Secret,
    /// With `rediss://`: PEM file of the CA certificates to trust; empty =
    /// the system's roots.
    pub tls_ca: String,
    /// Route commands as a Redis Cluster client.
    pub cluster: bool,
    /// Connections in the client pool.
    pub pool_size: usize,
    /// Prefix of datasync's own keys.
    pub key_prefix: String,
    /// Template of the profile key; `{id}` is replaced by the user id.
    pub profile_key: String,
    /// The seed's legacy dirty set, drained into the sharded flags.
    pub legacy_dirty_set: String,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct KafkaConfig {
    /// Bootstrap servers, comma separated.
    pub brokers: String,
    /// Topic of critical (static) changes.
    pub static_topic: String,
    /// Topic of batched (dynamic) changes.
    pub dynamic_topic: String,
    /// Dead-letter topic.
    pub dlq_topic: String,
    /// Partitions of topics datasync creates.
    pub partitions: i32,
    /// Create the topics at start if they do not exist.
    pub create_topics: bool,
    /// Upper bound for one delivery (`message.timeout.ms`).
    #[serde(with = "humantime_serde")]
    pub message_timeout: Duration,
    /// Producer batching delay (`linger.ms`).
    #[serde(with = "humantime_serde")]
    pub linger: Duration,
    /// Longest a consumer's fetch waits at the broker (`fetch.wait.max.ms`).
    #[serde(with = "humantime_serde")]
    pub fetch_max_wait: Duration,
    /// Consumer group of the MongoApplier.
    pub consumer_group: String,
    /// Consumer session timeout (`session.timeout.ms`).
    #[serde(with = "humantime_serde")]
    pub session_timeout: Duration,
    /// librdkafka properties for every producer and consumer (SASL, SSL…).
    pub client: KafkaClientProperties,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct MongoConfig {
    /// Connection string. Add `retryWrites=false` for SecantusDB.
    pub url: Secret,
    pub database: String,
    pub collection: String,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct SyncConfig {
    /// Scan interval; zero = continuous drain.
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    /// Number of virtual shards.
    pub shards: u32,
    /// Flags read per page.
    pub page_size: usize,
    /// Pages in flight at once.
    pub max_in_flight_pages: usize,
    /// Drain the legacy dirty set each cycle.
    pub legacy_drain: bool,
    /// Members popped from the legacy set and not acknowledged for this long
    /// (their drainer died between pop and ack) are flagged again.
    #[serde(with = "humantime_serde")]
    pub legacy_recovery_after: Duration,
    /// Pause after an empty cycle in continuous mode.
    #[serde(with = "humantime_serde")]
    pub idle_backoff: Duration,
    /// A flagged user whose profile key is missing: a dead letter, or a delete.
    pub missing_profile: MissingProfile,
    /// Tombstones (deleted users' documents) are purged this long after the
    /// delete.
    #[serde(with = "humantime_serde")]
    pub tombstone_retention: Duration,
    /// How often the purge runs; zero = never.
    #[serde(with = "humantime_serde")]
    pub tombstone_purge_interval: Duration,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct MailboxConfig {
    pub scanner: usize,
    pub loader: usize,
    pub resolver: usize,
    pub publisher: usize,
    pub applier: usize,
    pub dlq: usize,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct ApplierConfig {
    /// Run the MongoApplier in this process.
    pub enabled: bool,
    /// Events that close a window.
    pub window_max_events: usize,
    /// Time after a window's first event that closes it.
    #[serde(with = "humantime_serde")]
    pub window_max_wait: Duration,
    /// The same for the static (immediate) topic, whose windows are small.
    #[serde(with = "humantime_serde")]
    pub static_window_wait: Duration,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct CacheConfig {
    /// Entries of the L1 cache of applied versions.
    pub l1_capacity: u64,
    /// Time to live of an L1 entry.
    #[serde(with = "humantime_serde")]
    pub l1_ttl: Duration,
    /// Look up in MongoDB the users the Redis L2 does not know (see
    /// [`crate::cache`]).
    pub mongo_fallback: bool,
    /// Entries of the L1 cache of composed profiles (`GET /v1/profiles/{id}`).
    pub profile_l1_capacity: u64,
    /// How long another process's write may take to show in this process's L1.
    #[serde(with = "humantime_serde")]
    pub profile_l1_ttl: Duration,
    /// Time to live of a composed profile in the Redis L2.
    #[serde(with = "humantime_serde")]
    pub profile_l2_ttl: Duration,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct LeaseConfig {
    /// How long a shard lease (and an instance's heartbeat) lives without
    /// renewal. Renewed every third of it; a page starts only while more than
    /// half of it is left; a dead instance's shards are taken over within it
    /// plus one renewal interval.
    #[serde(with = "humantime_serde")]
    pub ttl: Duration,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct DlqConfig {
    /// How often dead letters parked in Redis (while Kafka was unreachable) are
    /// forwarded to the DLQ topic, and the open-entries gauge refreshed.
    #[serde(with = "humantime_serde")]
    pub forward_interval: Duration,
    /// Most entries `GET /v1/dlq` returns when no limit is given.
    pub list_limit: usize,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct ShutdownConfig {
    /// Time allowed for a graceful stop.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct StartupConfig {
    /// How long to keep trying Redis at start before giving up (without it
    /// nothing can be accepted safely).
    #[serde(with = "humantime_serde")]
    pub redis_timeout: Duration,
    /// Fail at start unless Kafka and MongoDB answer within
    /// `backends_timeout`, instead of starting degraded and connecting in the
    /// background.
    pub require_backends: bool,
    /// With `require_backends`: how long to wait for them.
    #[serde(with = "humantime_serde")]
    pub backends_timeout: Duration,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct TelemetryConfig {
    /// `text` or `json`.
    pub log_format: String,
    /// Default log filter.
    pub log_filter: String,
    /// How often the backlog (pending flags, pending immediate changes,
    /// consumer lag) is sampled into gauges and `/v1/stats`.
    #[serde(with = "humantime_serde")]
    pub backlog_interval: Duration,
}

impl Config {
    /// The embedded defaults alone.
    pub fn default_config() -> Config {
        Self::from_layers(&[], std::iter::empty()).expect("embedded default config is valid")
    }

    /// Defaults, then `file` (if any), then the process environment.
    pub fn load(file: Option<&Path>) -> Result<Config, ConfigError> {
        let mut layers = Vec::new();
        if let Some(path) = file {
            let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
                problems: vec![format!("cannot read config file {}: {e}", path.display())],
            })?;
            layers.push((path.display().to_string(), text));
        }
        Self::from_layers(&layers, std::env::vars())
    }

    /// Defaults, then each `(name, toml text)` layer, then `env` pairs that start
    /// with [`ENV_PREFIX`].
    pub fn from_layers(
        layers: &[(String, String)],
        env: impl Iterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let mut problems = Vec::new();
        let mut merged: toml::Table = DEFAULT_TOML.parse().expect("embedded default.toml parses");
        for (name, text) in layers {
            match text.parse::<toml::Table>() {
                Ok(t) => merge(&mut merged, t),
                Err(e) => problems.push(format!("{name}: {e}")),
            }
        }
        let mut env: Vec<_> = env.filter(|(k, _)| k.starts_with(ENV_PREFIX)).collect();
        env.sort();
        for (key, value) in env {
            let path: Vec<String> = key[ENV_PREFIX.len()..]
                .split("__")
                .map(|s| s.to_ascii_lowercase())
                .collect();
            if path.iter().any(|p| p.is_empty()) {
                problems.push(format!("environment variable {key}: empty key segment"));
                continue;
            }
            set_path(&mut merged, &path, parse_env_value(&value));
        }
        if !problems.is_empty() {
            return Err(ConfigError { problems });
        }

        let mut unknown = Vec::new();
        let parsed: Result<Config, _> =
            serde_ignored::deserialize(toml::Value::Table(merged), |p| unknown.push(p.to_string()));
        problems.extend(unknown.into_iter().map(|k| format!("unknown key `{k}`")));
        match parsed {
            Ok(cfg) => {
                problems.extend(cfg.validate());
                if problems.is_empty() {
                    Ok(cfg)
                } else {
                    Err(ConfigError { problems })
                }
            }
            Err(e) => {
                problems.push(e.to_string().trim().to_string());
                Err(ConfigError { problems })
            }
        }
    }

    /// Checks the values' meaning; returns one line per problem, naming the key.
    pub fn validate(&self) -> Vec<String> {
        let mut p = Vec::new();
        let mut need = |ok: bool, msg: &str| {
            if !ok {
                p.push(msg.to_string());
            }
        };
        need(!self.redis.url.is_empty(), "redis.url: must not be empty");
        need(
            self.redis.pool_size >= 1,
            "redis.pool_size: must be at least 1",
        );
        need(
            !self.redis.key_prefix.is_empty(),
            "redis.key_prefix: must not be empty",
        );
        need(
            self.redis.profile_key.contains("{id}"),
            "redis.profile_key: must contain the placeholder {id}",
        );
        need(
            !self.kafka.brokers.is_empty(),
            "kafka.brokers: must not be empty",
        );
        for (k, v) in [
            ("kafka.static_topic", &self.kafka.static_topic),
            ("kafka.dynamic_topic", &self.kafka.dynamic_topic),
            ("kafka.dlq_topic", &self.kafka.dlq_topic),
            ("kafka.consumer_group", &self.kafka.consumer_group),
            ("mongo.database", &self.mongo.database),
            ("mongo.collection", &self.mongo.collection),
        ] {
            need(!v.is_empty(), &format!("{k}: must not be empty"));
        }
        need(
            self.kafka.static_topic != self.kafka.dynamic_topic,
            "kafka.static_topic: must differ from kafka.dynamic_topic",
        );
        need(
            self.kafka.partitions >= 1,
            "kafka.partitions: must be at least 1",
        );
        need(
            !self.kafka.message_timeout.is_zero(),
            "kafka.message_timeout: must be more than zero",
        );
        need(
            (Duration::from_millis(1)..=Duration::from_secs(30))
                .contains(&self.kafka.fetch_max_wait),
            "kafka.fetch_max_wait: must be between 1ms and 30s",
        );
        need(
            self.mongo.url.expose().starts_with("mongodb://")
                || self.mongo.url.expose().starts_with("mongodb+srv://"),
            "mongo.url: must start with mongodb:// or mongodb+srv://",
        );
        need(
            (1..=16384).contains(&self.sync.shards),
            "sync.shards: must be between 1 and 16384",
        );
        need(
            (1..=MAX_PAGE_SIZE).contains(&self.sync.page_size),
            &format!("sync.page_size: must be between 1 and {MAX_PAGE_SIZE}"),
        );
        need(
            self.sync.max_in_flight_pages >= 1,
            "sync.max_in_flight_pages: must be at least 1",
        );
        for (k, v) in [
            ("mailbox.scanner", self.mailbox.scanner),
            ("mailbox.loader", self.mailbox.loader),
            ("mailbox.resolver", self.mailbox.resolver),
            ("mailbox.publisher", self.mailbox.publisher),
            ("mailbox.applier", self.mailbox.applier),
            ("mailbox.dlq", self.mailbox.dlq),
        ] {
            need(v >= 1, &format!("{k}: must be at least 1"));
        }
        need(
            self.applier.window_max_events >= 1,
            "applier.window_max_events: must be at least 1",
        );
        need(
            self.cache.l1_capacity >= 1,
            "cache.l1_capacity: must be at least 1",
        );
        if self.instance.mode == ShardMode::Fixed {
            need(
                self.instance.total >= 1,
                "instance.total: must be at least 1",
            );
            need(
                self.instance.index < self.instance.total,
                "instance.index: must be less than instance.total",
            );
        }
        need(
            matches!(self.telemetry.log_format.as_str(), "text" | "json"),
            "telemetry.log_format: must be \"text\" or \"json\"",
        );
        need(
            !self.dlq.forward_interval.is_zero(),
            "dlq.forward_interval: must be more than zero",
        );
        need(
            self.dlq.list_limit >= 1,
            "dlq.list_limit: must be at least 1",
        );
        need(
            self.telemetry.backlog_interval >= Duration::from_millis(100),
            "telemetry.backlog_interval: must be at least 100ms",
        );
        need(
            self.lease.ttl >= Duration::from_millis(300),
            "lease.ttl: must be at least 300ms",
        );
        self.http.validate(&mut p);
        self.kafka.client.validate(&mut p);
        self.retry.validate(&mut p);
        self.resync.validate(&mut p);
        self.consistency.validate(&mut p);
        self.replay.validate(&mut p);
        self.whitelist.validate(&mut p);
        self.operations.validate(&mut p);
        sinks::validate(&self.sinks, &mut p);
        p
    }

    /// The instance id, filled in when the config leaves it empty.
    pub fn instance_id(&self) -> String {
        if !self.instance.id.is_empty() {
            return self.instance.id.clone();
        }
        let host = std::fs::read_to_string("/etc/hostname")
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|_| "datasync".into());
        format!("{host}-{}", std::process::id())
    }
}

/// Merges `over` into `base`, table by table; `over` wins on any other value.
pub fn merge(base: &mut toml::Table, over: toml::Table) {
    for (k, v) in over {
        match (base.get_mut(&k), v) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) => merge(b, o),
            (_, v) => {
                base.insert(k, v);
            }
        }
    }
}

fn set_path(table: &mut toml::Table, path: &[String], value: toml::Value) {
    let (last, parents) = path.split_last().expect("non-empty path");
    let mut t = table;
    for seg in parents {
        let entry = t
            .entry(seg.clone())
            .or_insert_with(|| toml::Value::Table(Default::default()));
        if !entry.is_table() {
            *entry = toml::Value::Table(Default::default());
        }
        t = entry.as_table_mut().expect("just made a table");
    }
    t.insert(last.clone(), value);
}

/// An environment value is read as a TOML value when it is one (numbers, booleans,
/// quoted strings, arrays) and as a plain string otherwise.
fn parse_env_value(raw: &str) -> toml::Value {
    format!("v = {raw}")
        .parse::<toml::Table>()
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_string()))
}

#[cfg(test)]
mod tests;
