//! # datasync
//!
//! Keeps user profiles in sync from Redis, through Kafka, into MongoDB — no change
//! lost, none applied twice in effect, none overwriting a newer one.
//!
//! Read the modules in the order data flows through them:
//!
//! 1. [`engine::Engine::mark_dirty`] / `POST /v1/sync/dirty` ([`http`]): the
//!    upstream writes a profile to Redis and flags the user. A Lua script
//!    ([`clients::redis`]) allocates a **version** from the user's shard clock
//!    ([`shard`]) and stores it as the flag's score.
//! 2. [`actors::scanner::ShardScanner`] walks each owned shard's flags, oldest
//!    first, in pages (and drains the seed's legacy `SADD` set into them).
//! 3. [`actors::loader::ProfileLoader`] reads the page's profiles, pipelined.
//! 4. [`actors::resolver::VersionResolver`] looks up what is already applied,
//!    through [`cache`] (Moka L1 → Redis L2 → one MongoDB `$in` query).
//! 5. [`actors::publisher::KafkaPublisher`] encodes [`proto`] events and publishes
//!    them with the idempotent producer; once the broker acknowledged, the scanner
//!    clears the flags with compare-and-delete, so a re-flag in between survives.
//! 6. [`actors::applier`] consumes windows, collapses them to the newest version
//!    per user and section, and writes them to MongoDB ([`clients::mongo`]) as
//!    newer-wins upserts before committing offsets.
//!
//! Around them: [`config`] (the typed, layered configuration), [`telemetry`]
//! (logs, metrics, counters) and [`run`], which the `datasync` binary calls.

pub mod actors;
pub mod cache;
pub mod clients;
pub mod config;
pub mod engine;
pub mod faults;
pub mod health;
pub mod http;
pub mod lease;
pub mod profiles;
pub mod proto;
pub mod retry;
pub mod shard;
pub mod strategy;
pub mod telemetry;

pub use config::Config;
pub use engine::{Engine, EngineError, Marked, ProfileWrite};

/// Runs the service: the engine and, when enabled, the HTTP API, until
/// `shutdown` resolves; then stops gracefully within `shutdown.timeout`.
pub async fn run(
    config: Config,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let timeout = config.shutdown.timeout;
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
