//! The whitelist (seed 004 §1): user ids an operator is investigating. It
//! narrows replays and resyncs to them; it never drops live changes. Empty
//! means no restriction.
//!
//! It lives in a Redis set with a version counter raised by every change;
//! each instance loads it at start and polls the version every
//! `whitelist.refresh_interval`, reloading the set when it moved, so a
//! change made through any instance is seen by all without a restart.

use crate::clients::redis::{RedisError, RedisStore};
use std::{
    collections::HashSet,
    sync::{
        Arc, RwLock,
        atomic::{AtomicI64, Ordering},
    },
    time::Duration,
};
use tokio_util::sync::CancellationToken;

/// This instance's copy of the whitelist.
pub struct Whitelist {
    redis: RedisStore,
    ids: RwLock<Arc<HashSet<String>>>,
    /// The version the copy was loaded at; -1 before the first load.
    version: AtomicI64,
}

impl Whitelist {
    /// Loads the whitelist; if Redis does not answer, starts empty and the
    /// refresher loads it once it does.
    pub async fn load(redis: RedisStore) -> Arc<Self> {
        let w = Arc::new(Self {
            redis,
            ids: RwLock::new(Arc::default()),
            version: AtomicI64::new(-1),
        });
        if let Err(e) = w.refresh().await {
            tracing::warn!(error = %e, "cannot load the whitelist yet; retrying in the background");
        }
        w
    }

    /// The ids as last loaded (empty = no restriction).
    pub fn snapshot(&self) -> Arc<HashSet<String>> {
        self.ids.read().expect("not poisoned").clone()
    }

    /// The version the copy was loaded at.
    pub fn version(&self) -> i64 {
        self.version.load(Ordering::SeqCst)
    }

    /// Whether `user` passes: listed, or the whitelist is empty.
    pub fn allows(&self, user: &str) -> bool {
        let ids = self.ids.read().expect("not poisoned");
        ids.is_empty() || ids.contains(user)
    }

    /// Reloads the set if its version moved; true when it did. The version
    /// is read before the set: a change between the two reads is seen again
    /// at the next poll.
    pub async fn refresh(&self) -> Result<bool, RedisError> {
        let version = self.redis.whitelist_version().await?;
        if version == self.version() {
            return Ok(false);
        }
        let ids = self.redis.whitelist_ids().await?;
        *self.ids.write().expect("not poisoned") = Arc::new(ids.into_iter().collect());
        self.version.store(version, Ordering::SeqCst);
        Ok(true)
    }

    /// Polls for changes every `every` until the engine stops.
    pub async fn run(self: Arc<Self>, every: Duration, cancel: CancellationToken) {
        while crate::jobs::pause(&cancel, every).await {
            match self.refresh().await {
                Ok(true) => tracing::info!(
                    version = self.version(),
                    size = self.snapshot().len(),
                    "whitelist changed"
                ),
                Ok(false) => {}
                Err(e) => tracing::debug!(error = %e, "cannot poll the whitelist"),
            }
        }
    }
}

/// Which users a replay or resync touches.
#[derive(Clone)]
pub enum UserFilter {
    /// Every user.
    All,
    /// The ids a request named.
    Only(Arc<HashSet<String>>),
    /// The whitelist, as it is when each user is seen (empty = every user).
    Whitelist(Arc<Whitelist>),
}

impl UserFilter {
    pub fn allows(&self, user: &str) -> bool {
        match self {
            Self::All => true,
            Self::Only(ids) => ids.contains(user),
            Self::Whitelist(w) => w.allows(user),
        }
    }

    /// `all`, `user_ids` or `whitelist`, for job records.
    pub fn label(&self) -> &'static str {
        match self {
            Self::All => "all",
            Self::Only(_) => "user_ids",
            Self::Whitelist(_) => "whitelist",
        }
    }
}
