//! # datasync
//!
//! Keeps user profiles in sync from Redis, through Kafka, into MongoDB — no change
//! lost, none applied twice in effect, none overwriting a newer one.
//!
//! Read the modules in the order data flows through them:
//!
//! 1. A change comes in through [`http`] (`POST /v1/sync/dirty`,
//!    `/v1/sync/immediate`) or the library ([`engine::Engine`]), both through
//!    a [`strategy`]: the batch path writes the profile to Redis and flags the
//!    user; a Lua script ([`clients::redis`], `scripts/mark.lua`) allocates a
//!    **version** from the user's shard clock ([`shard`]) and stores it as the
//!    flag's score. The seed's legacy `SADD` set is drained into the same flags.
//! 2. [`actors::scanner::ShardScanner`] walks the flags of each shard this
//!    instance holds a [`lease`] on, oldest first, in pages.
//! 3. [`actors::loader::ProfileLoader`] reads the page's profiles in one MGET
//!    (pipelined GETs on a Redis Cluster).
//! 4. [`actors::resolver::VersionResolver`] looks up what is already applied,
//!    through [`cache`] (Moka L1 → Redis L2, and with `cache.mongo_fallback`
//!    one MongoDB `$in` query).
//! 5. [`actors::publisher::KafkaPublisher`] encodes [`proto`] events and publishes
//!    them with the idempotent producer; once the broker acknowledged, the scanner
//!    clears the flags with a fenced compare-and-delete
//!    (`scripts/clear_flags.lua`), so a re-flag in between survives.
//!    Immediate changes take [`actors::static_path`] instead: staged in Redis,
//!    published at once, acknowledged.
//! 6. [`actors::applier`] consumes windows, collapses them to the newest version
//!    per user and section, and hands them to a [`sinks::Sink`] — MongoDB
//!    ([`clients::mongo`], newer-wins upserts), PostgreSQL, an HTTP endpoint
//!    or one of the host's — before committing offsets. Each sink has its own
//!    consumer groups, so one that is slow or down holds back no other.
//! 7. What fails for good becomes a dead letter ([`actors::dlq`]), with its
//!    flag kept; an operator lists and redrives it.
//!
//! Deletes take the same road: `POST /v1/sync/delete` records a versioned
//! delete beside the flag (`scripts/delete.lua`), the scanner publishes a
//! delete event, and the applier keeps a tombstone. [`jobs`] heals: a full
//! resync flags users again, the consistency check compares Redis with
//! MongoDB and repairs drift, and the tombstone purge ends tombstones after
//! their retention; all of them re-enter the pipeline through the same
//! scripts and version rules.
//!
//! Around them: [`model`] (the domain words every layer shares: sections,
//! changes, dead letters, the clock), [`error`], [`config`] (the typed, layered
//! configuration), [`retry`] (the retry policy), [`health`] (backends and
//! tasks up or down, behind readiness), [`tasks`] (the supervised long-running
//! tasks), [`telemetry`] (logs, metrics, counters), [`profiles`] (composed
//! profile reads), [`faults`] (fault injection for tests and drills) and
//! [`run`], which the `datasync` binary calls.
//!
//! Imports point down: the clients and the model import no actor, no engine
//! and no API; strategies see only the [`strategy::SyncContext`] the engine
//! builds.

pub mod actors;
pub mod backends;
pub mod backlog;
pub mod cache;
pub mod clients;
pub mod config;
pub mod durability;
pub mod engine;
pub mod error;
pub mod faults;
pub mod health;
pub mod http;
pub mod jobs;
pub mod lease;
pub mod model;
pub mod offsets;
pub mod operations;
pub mod profiles;
pub mod proto;
pub mod retry;
pub mod shard;
pub mod sinks;
pub mod strategy;
pub mod tasks;
pub mod telemetry;
pub mod tls;
pub mod whitelist;

pub use config::Config;
pub use engine::{Engine, EngineError, Marked, ProfileWrite};

/// Runs the service: the engine and, when enabled, the HTTP API, until
/// `shutdown` resolves; then stops gracefully within `shutdown.timeout`.
pub async fn run(
    config: Config,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let timeout = config.shutdown.timeout;
    if config.http.enabled {
        config.http.check_exposure().map_err(anyhow::Error::msg)?;
    }
    let engine = Engine::start(config).await?;
    let server = if engine.config().http.enabled {
        Some(http::serve(engine.clone())?)
    } else {
        None
    };
    let handle = server.as_ref().map(|s| s.handle());
    let server_task = server.map(actix_web::rt::spawn);

    shutdown.await;
    tracing::info!("shutdown requested");
    if let Some(h) = handle {
        h.stop(true).await;
    }
    if let Some(t) = server_task {
        let _ = t.await;
    }
    engine.shutdown(timeout).await;
    Ok(())
}
