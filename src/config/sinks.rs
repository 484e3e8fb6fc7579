//! Where applied changes go (DESIGN §9): `[[sinks]]` entries, each with its
//! own consumer group over the sync topics. Without any entry, `[mongo]` is
//! the one sink, as before sinks existed.

use super::{MongoConfig, Secret, mask_url};
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// The kinds of sink datasync builds from configuration. A sink of another
/// kind is given to [`crate::Engine::start_with_sinks`] in code.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum SinkKind {
    /// A MongoDB collection, newer-wins per section (the reference sink).
    Mongodb,
    /// A PostgreSQL table, newer-wins per section.
    Postgres,
    /// An HTTP endpoint taking JSON batches (seed 003's CRM adapter).
    Http,
}

impl SinkKind {
    pub fn label(self) -> &'static str {
        match self {
            SinkKind::Mongodb => "mongodb",
            SinkKind::Postgres => "postgres",
            SinkKind::Http => "http",
        }
    }
}

/// One `[[sinks]]` entry. The settings of one kind are refused on another.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SinkConfig {
    /// The sink's name: its metrics label, its dead letters, its readiness
    /// reason and (by default) its consumer group. Letters, digits, `-`
    /// and `_`.
    pub name: String,
    pub kind: SinkKind,
    /// The sink whose applied versions feed the version resolver's caches,
    /// settle immediate changes and invalidate cached profiles. At most one;
    /// without any, the first sink is.
    #[serde(default)]
    pub primary: bool,
    /// Its consumer group on the dynamic topic (the static topic's is this
    /// plus `-static`). Empty: `kafka.consumer_group` for the primary sink
    /// (so the single sink of earlier releases keeps its offsets), else
    /// `<kafka.consumer_group>-<name>`.
    #[serde(default)]
    pub consumer_group: String,
    /// mongodb: a connection string (empty = `mongo.url`); postgres:
    /// `postgres://user:password@host:port/database`; http: the endpoint
    /// batches are POSTed to.
    #[serde(default)]
    pub url: Secret,
    /// mongodb: the database (empty = `mongo.database`).
    #[serde(default)]
    pub database: String,
    /// mongodb: the collection (empty = `mongo.collection`).
    #[serde(default)]
    pub collection: String,
    /// postgres: the table, created if missing (default `user_profiles`;
    /// `schema.table` is accepted).
    #[serde(default)]
    pub table: String,
    /// postgres: connections in the pool (default 4).
    #[serde(default)]
    pub pool_size: Option<usize>,
    /// http: the bearer token sent with every batch.
    #[serde(default)]
    pub token: Secret,
    /// http: items per request at most (default 500); a window is sent in
    /// requests of this size.
    #[serde(default)]
    pub max_batch: Option<usize>,
    /// postgres and http: how long one statement or request may take
    /// (default 30s).
    #[serde(default, with = "humantime_serde")]
    pub timeout: Option<Duration>,
    /// Events that close this sink's windows (default
    /// `applier.window_max_events`).
    #[serde(default)]
    pub window_max_events: Option<usize>,
}

/// The PostgreSQL table when a sink names none.
pub const DEFAULT_TABLE: &str = "user_profiles";
/// Items per HTTP request when a sink says nothing.
pub const DEFAULT_MAX_BATCH: usize = 500;
/// Statement and request timeout when a sink says nothing.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

impl SinkConfig {
    /// The sink `[mongo]` stands for when no `[[sinks]]` are configured.
    pub fn default_mongo() -> Self {
        Self {
            name: "mongodb".into(),
            kind: SinkKind::Mongodb,
            primary: true,
            consumer_group: String::new(),
            url: Secret::default(),
            database: String::new(),
            collection: String::new(),
            table: String::new(),
            pool_size: None,
            token: Secret::default(),
            max_batch: None,
            timeout: None,
            window_max_events: None,
        }
    }

    /// A mongodb sink's `[mongo]`, with its own url, database and collection
    /// where it sets them.
    pub fn mongo(&self, base: &MongoConfig) -> MongoConfig {
        let or = |own: &str, base: &str| {
            if own.is_empty() {
                base.to_string()
            } else {
                own.to_string()
            }
        };
        MongoConfig {
            url: if self.url.is_empty() {
                base.url.clone()
            } else {
                self.url.clone()
            },
            database: or(&self.database, &base.database),
            collection: or(&self.collection, &base.collection),
        }
    }

    pub fn table(&self) -> &str {
        if self.table.is_empty() {
            DEFAULT_TABLE
        } else {
            &self.table
        }
    }

    pub fn timeout(&self) -> Duration {
        self.timeout.unwrap_or(DEFAULT_TIMEOUT)
    }

    pub fn max_batch(&self) -> usize {
        self.max_batch.unwrap_or(DEFAULT_MAX_BATCH)
    }

    /// Where it writes, for logs and `GET /v1/sinks` (no password).
    pub fn target(&self, base: &MongoConfig) -> String {
        match self.kind {
            SinkKind::Mongodb => {
                let m = self.mongo(base);
                format!(
                    "{} {}.{}",
                    mask_url(m.url.expose()),
                    m.database,
                    m.collection
                )
            }
            SinkKind::Postgres => format!("{} table {}", mask_url(self.url.expose()), self.table()),
            SinkKind::Http => mask_url(self.url.expose()),
        }
    }

    /// Checks one entry; `at` is its place, `sinks[i]`, for the messages.
    pub(super) fn validate(&self, at: &str, p: &mut Vec<String>) {
        let valid_name = !self.name.is_empty()
            && self.name.len() <= 64
            && self
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
        if !valid_name {
            p.push(format!(
                "{at}.name: `{}` must be 1 to 64 letters, digits, `-` or `_`",
                self.name
            ));
        }
        let kind = self.kind.label();
        let mut only = |set: bool, key: &str, kinds: &[SinkKind]| {
            if set && !kinds.contains(&self.kind) {
                let names: Vec<&str> = kinds.iter().map(|k| k.label()).collect();
                p.push(format!(
                    "{at}.{key}: only for kind {} (this sink is {kind})",
                    names.join(" or ")
                ));
            }
        };
        only(!self.database.is_empty(), "database", &[SinkKind::Mongodb]);
        only(
            !self.collection.is_empty(),
            "collection",
            &[SinkKind::Mongodb],
        );
        only(!self.table.is_empty(), "table", &[SinkKind::Postgres]);
        only(self.pool_size.is_some(), "pool_size", &[SinkKind::Postgres]);
        only(!self.token.is_empty(), "token", &[SinkKind::Http]);
        only(self.max_batch.is_some(), "max_batch", &[SinkKind::Http]);
        only(
            self.timeout.is_some(),
            "timeout",
            &[SinkKind::Postgres, SinkKind::Http],
        );
        let url = self.url.expose();
        match self.kind {
            SinkKind::Mongodb => {
                let scheme_ok = url.starts_with("mongodb://") || url.starts_with("mongodb+srv://");
                if !url.is_empty() && !scheme_ok {
                    p.push(format!(
                        "{at}.url: must start with mongodb:// or mongodb+srv://"
                    ));
                }
            }
            SinkKind::Postgres => {
                if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
                    p.push(format!(
                        "{at}.url: a postgres sink needs postgres://user:password@host:port/database"
                    ));
                } else if let Err(e) = url.parse::<tokio_postgres::Config>() {
                    p.push(format!("{at}.url: {e}"));
                }
                let table_ok = self.table().split('.').count() <= 2
                    && self.table().split('.').all(|part| {
                        !part.is_empty()
                            && part.len() <= 63
                            && part.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                            && !part.starts_with(|c: char| c.is_ascii_digit())
                    });
                if !table_ok {
                    p.push(format!(
                        "{at}.table: `{}` must be a plain name or schema.name (letters, digits, `_`)",
                        self.table()
                    ));
                }
                if self.pool_size == Some(0) {
                    p.push(format!("{at}.pool_size: must be at least 1"));
                }
            }
            SinkKind::Http => {
                if !(url.starts_with("http://") || url.starts_with("https://")) {
                    p.push(format!(
                        "{at}.url: an http sink needs an http:// or https:// URL"
                    ));
                } else if reqwest::Url::parse(url).is_err() {
                    p.push(format!("{at}.url: not a valid URL"));
                }
                if !(1..=100_000).contains(&self.max_batch()) {
                    p.push(format!("{at}.max_batch: must be between 1 and 100000"));
                }
            }
        }
        if self.timeout.is_some_and(|t| t.is_zero()) {
            p.push(format!("{at}.timeout: must be more than zero"));
        }
        if self.window_max_events == Some(0) {
            p.push(format!("{at}.window_max_events: must be at least 1"));
        }
    }
}

/// Checks the list as a whole, then each entry.
pub(super) fn validate(sinks: &[SinkConfig], p: &mut Vec<String>) {
    for (i, s) in sinks.iter().enumerate() {
        s.validate(&format!("sinks[{i}]"), p);
        if sinks[..i].iter().any(|o| o.name == s.name) {
            p.push(format!("sinks[{i}].name: `{}` is used twice", s.name));
        }
    }
    if sinks.iter().filter(|s| s.primary).count() > 1 {
        p.push("sinks: more than one sink says primary = true".into());
    }
}
