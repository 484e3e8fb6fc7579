//! The MongoDB sink: a collection of `userProfiles` documents written with
//! newer-wins `update` statements ([`crate::clients::mongo`]). The
//! reference sink: the version resolver, profile reads, the consistency
//! check and replay read `[mongo]`.

use super::{Change, Outcome, Sink, SinkError};
use crate::{
    clients::mongo::{self, MongoError, MongoStore},
    config::MongoConfig,
};
use futures::future::BoxFuture;

pub struct MongoSink {
    store: MongoStore,
}

impl MongoSink {
    /// Builds the client (which connects lazily).
    pub async fn connect(c: &MongoConfig) -> Result<Self, SinkError> {
        let store = MongoStore::connect_without_index(c, "datasync-sink")
            .await
            .map_err(|e| SinkError::new(e.to_string()))?;
        Ok(Self { store })
    }

    /// A sink on a store the engine already has.
    pub fn new(store: MongoStore) -> Self {
        Self { store }
    }

    pub fn store(&self) -> &MongoStore {
        &self.store
    }
}

fn sink_error(e: MongoError) -> SinkError {
    SinkError::new(format!("mongodb: {e}"))
}

impl Sink for MongoSink {
    fn kind(&self) -> &str {
        "mongodb"
    }

    fn prepare(&self) -> BoxFuture<'_, Result<(), SinkError>> {
        Box::pin(async move { self.store.ensure_index().await.map_err(sink_error) })
    }

    fn apply<'a>(&'a self, window: &'a [Change]) -> BoxFuture<'a, Result<Vec<Outcome>, SinkError>> {
        Box::pin(async move {
            let outcomes = self.store.apply(window).await.map_err(sink_error)?;
            Ok(outcomes
                .into_iter()
                .map(|o| match o {
                    mongo::Outcome::Applied => Outcome::Applied,
                    mongo::Outcome::Stale => Outcome::Stale,
                    mongo::Outcome::Rejected(e) => Outcome::rejected(e),
                })
                .collect())
        })
    }
}
