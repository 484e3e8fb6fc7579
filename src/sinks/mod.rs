//! Sinks: where applied changes go (DESIGN §9).
//!
//! A [`Sink`] takes a collapsed window (at most one change per user and
//! kind, sorted by user id) and answers per change: applied, stale (what it
//! holds is at least as new), or failed, retryable or not. Everything around
//! it — consuming, windows, collapse, retries, dead letters, commits — is the
//! applier's ([`crate::actors::applier`]) and the same for every sink. Each
//! sink has its own consumer group over the sync topics, so a slow or broken
//! sink never holds another back, and its own counters, metrics label
//! (`sink`), dead letters and readiness reason ([`SinkStatus`]).
//!
//! Built in: [`mongodb`] (the reference sink), [`postgres`] and [`http`]
//! (seed 003's CRM adapter). A sink of another kind implements the trait
//! outside this crate and is handed to [`crate::Engine::start_with_sinks`].
//!
//! The rule every sink keeps is the version invariant: a change of a section
//! at version v is applied only where the stored version of that section is
//! older, and a delete at v removes only what is older than v. Retries,
//! duplicates and replays are then no-ops ([`Outcome::Stale`]).

pub mod http;
pub mod mongodb;
pub mod postgres;
mod status;

pub use crate::model::{Change, Op};
pub use status::{SinkReport, SinkState, SinkStatus};

use crate::{
    clients::mongo::MongoStore,
    config::{Config, SinkConfig, SinkKind},
};
use futures::future::BoxFuture;
use std::{sync::Arc, time::Duration};

/// What became of one change of a window.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Applied,
    /// The sink already holds this version or a newer one.
    Stale,
    /// The sink refused this change. A retryable failure is sent again
    /// (with the retry policy, at least `retry_after` later); one that is
    /// not, or that keeps failing, becomes a dead letter.
    Failed(ItemFailure),
}

impl Outcome {
    /// A failure that retrying will not cure.
    pub fn rejected(error: impl Into<String>) -> Self {
        Outcome::Failed(ItemFailure {
            error: error.into(),
            retryable: false,
            retry_after: None,
        })
    }

    /// A failure that may pass.
    pub fn retry(error: impl Into<String>, retry_after: Option<Duration>) -> Self {
        Outcome::Failed(ItemFailure {
            error: error.into(),
            retryable: true,
            retry_after,
        })
    }
}

/// Why a sink refused one change.
#[derive(Debug, Clone, PartialEq)]
pub struct ItemFailure {
    pub error: String,
    pub retryable: bool,
    /// The sink asked not to be sent it again before this long.
    pub retry_after: Option<Duration>,
}

/// A window the sink could not take at all: nothing of it counts as
/// applied, and the whole window is written again (after the retry
/// policy's delay, or `retry_after` if the sink asked for more) until it is
/// taken; its offsets wait. The sink is reported down meanwhile.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct SinkError {
    pub message: String,
    pub retry_after: Option<Duration>,
}

impl SinkError {
    pub fn new(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            retry_after: None,
        }
    }

    pub fn retry_after(mut self, after: Option<Duration>) -> Self {
        self.retry_after = after;
        self
    }
}

/// A target for applied changes.
///
/// `apply` gets a window collapsed to the newest change per user and kind
/// (static, dynamic, delete), sorted by user id, and answers one
/// [`Outcome`] per change, in order. The three kinds of one user commute
/// under the version rules, so their order does not matter. Writes must be
/// idempotent under those rules: the same window may come again after a
/// crash or a failed commit.
pub trait Sink: Send + Sync + 'static {
    /// What it writes to: `mongodb`, `postgres`, `http`, or the
    /// implementer's own word (the `kind` of `GET /v1/sinks`).
    fn kind(&self) -> &str;

    /// Makes the target ready (indexes, tables) and checks that it answers.
    /// Called before the sink's consumers start, again after each failure
    /// until it succeeds.
    fn prepare(&self) -> BoxFuture<'_, Result<(), SinkError>>;

    /// Applies one window.
    fn apply<'a>(&'a self, window: &'a [Change]) -> BoxFuture<'a, Result<Vec<Outcome>, SinkError>>;
}

/// A sink with what the engine needs to run it.
#[derive(Clone)]
pub struct SinkSpec {
    pub name: String,
    pub sink: Arc<dyn Sink>,
    /// Feeds the applied-version caches, settles immediate changes and
    /// invalidates cached profiles (one sink does). A sink given in code
    /// that says so takes the place of the configured primary, whose
    /// consumer group then becomes `<group>-<name>`: a new group, which
    /// starts from the topics' beginning.
    pub primary: bool,
    /// Its consumer group on the dynamic topic; empty = the default (see
    /// [`SinkConfig::consumer_group`]).
    pub consumer_group: String,
    /// Events that close its windows; `None` = `applier.window_max_events`.
    pub window_max_events: Option<usize>,
    /// Where it writes, for `GET /v1/sinks` (no secrets).
    pub target: String,
    /// It writes `[mongo]` itself (the engine's own store).
    pub(crate) writes_mongo: bool,
}

impl SinkSpec {
    /// A sink implemented outside the configuration's kinds.
    pub fn new(name: impl Into<String>, sink: Arc<dyn Sink>) -> Self {
        let name = name.into();
        Self {
            target: name.clone(),
            name,
            sink,
            primary: false,
            consumer_group: String::new(),
            window_max_events: None,
            writes_mongo: false,
        }
    }

    pub fn primary(mut self, primary: bool) -> Self {
        self.primary = primary;
        self
    }
}

/// The sinks a configuration asks for: its `[[sinks]]`, or `[mongo]` alone;
/// one of them primary: the one that says so, else the first that writes
/// `[mongo]` itself (profile reads compose MongoDB with what is pending, so
/// the sink that settles pending changes should be the one they read),
/// else the first.
pub fn configured(config: &Config) -> Vec<SinkConfig> {
    let mut sinks = if config.sinks.is_empty() {
        vec![SinkConfig::default_mongo()]
    } else {
        config.sinks.clone()
    };
    if !sinks.iter().any(|s| s.primary) {
        let i = sinks
            .iter()
            .position(|s| writes_engine_mongo(s, config))
            .unwrap_or(0);
        sinks[i].primary = true;
    }
    sinks
}

/// A mongodb sink on `[mongo]` itself (same URL, database and collection).
fn writes_engine_mongo(s: &SinkConfig, config: &Config) -> bool {
    if s.kind != SinkKind::Mongodb {
        return false;
    }
    let m = s.mongo(&config.mongo);
    m.url == config.mongo.url
        && m.database == config.mongo.database
        && m.collection == config.mongo.collection
}

/// A configured sink's consumer group on the dynamic topic (see
/// [`consumer_group`]).
pub fn configured_group(c: &SinkConfig, base: &str) -> String {
    group_of(&c.consumer_group, c.primary, &c.name, base)
}

/// Builds the configured sinks (clients connect lazily; `prepare` reaches
/// them) and adds `extra`. The primary sink is the configured one, unless an
/// extra one says it is primary and no configured one does. A mongodb sink
/// on `[mongo]` itself shares the engine's store.
pub async fn build(
    config: &Config,
    engine_mongo: &MongoStore,
    extra: Vec<SinkSpec>,
) -> Result<Vec<SinkSpec>, SinkError> {
    let explicit = config.sinks.iter().any(|s| s.primary);
    let extra_primary = extra.iter().any(|s| s.primary);
    if explicit && extra_primary {
        return Err(SinkError::new(
            "a configured sink and a sink given in code both say they are primary",
        ));
    }
    let mut out = Vec::new();
    for mut c in configured(config) {
        if extra_primary {
            c.primary = false;
        }
        let writes_mongo = writes_engine_mongo(&c, config);
        let sink: Arc<dyn Sink> = match c.kind {
            SinkKind::Mongodb if writes_mongo => {
                Arc::new(mongodb::MongoSink::new(engine_mongo.clone()))
            }
            SinkKind::Mongodb => {
                Arc::new(mongodb::MongoSink::connect(&c.mongo(&config.mongo)).await?)
            }
            SinkKind::Postgres => Arc::new(postgres::PostgresSink::new(&c)?),
            SinkKind::Http => Arc::new(http::HttpSink::new(&c)?),
        };
        out.push(SinkSpec {
            name: c.name.clone(),
            sink,
            primary: c.primary,
            consumer_group: c.consumer_group.clone(),
            window_max_events: c.window_max_events,
            target: c.target(&config.mongo),
            writes_mongo,
        });
    }
    out.extend(extra);
    let mut seen = std::collections::HashSet::new();
    for s in &out {
        if !seen.insert(s.name.as_str()) {
            return Err(SinkError::new(format!(
                "sink name `{}` is used twice",
                s.name
            )));
        }
    }
    if out.iter().filter(|s| s.primary).count() > 1 {
        return Err(SinkError::new("more than one sink is primary"));
    }
    let mut groups = std::collections::HashSet::new();
    for s in &out {
        let g = consumer_group(s, &config.kafka.consumer_group);
        for g in [static_group(&g), g] {
            if !groups.insert(g.clone()) {
                return Err(SinkError::new(format!(
                    "sink `{}`: consumer group `{g}` is another sink's too; each sink needs its own",
                    s.name
                )));
            }
        }
    }
    Ok(out)
}

/// A sink's consumer group on the dynamic topic: its own, else the
/// applier's group for the primary sink (the single sink of earlier
/// releases keeps its offsets), else `<group>-<name>`. The static topic's
/// group is this plus `-static`.
pub fn consumer_group(spec: &SinkSpec, base: &str) -> String {
    group_of(&spec.consumer_group, spec.primary, &spec.name, base)
}

fn group_of(own: &str, primary: bool, name: &str, base: &str) -> String {
    if !own.is_empty() {
        own.to_string()
    } else if primary {
        base.to_string()
    } else {
        format!("{base}-{name}")
    }
}

/// The consumer group of a sink's static loop.
pub fn static_group(group: &str) -> String {
    format!("{group}-static")
}
