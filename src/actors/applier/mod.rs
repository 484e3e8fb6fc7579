//! MongoApplier: consumes the sync topics in windows (by count or time),
//! collapses each window to the newest version per user and section, writes it
//! to MongoDB sorted by userId as one unordered newer-wins bulk, then commits the
//! window's offsets. Offsets are never committed past an unapplied event: when a
//! write fails the same window is retried until it succeeds or the engine stops.
//!
//! Here: the window collapse and the MongoApplier actor that writes a window.
//! [`consumer`]: the consumer loops that gather windows, the priority gate
//! between them, and the outcome handling and commits.

mod consumer;

pub use consumer::{ConsumerLoop, PriorityGate};

use super::{Shared, StageError, guard, restart_pause};
use crate::{
    clients::mongo::{Change, MongoStore, Outcome},
    faults::Stage,
    model::Section,
    proto::{self, UserProfileSyncEvent},
};
use actix::prelude::*;
use std::{
    collections::{BTreeMap, HashMap},
    sync::Arc,
};

/// One consumed record, copied out of the consumer.
#[derive(Debug, Clone)]
pub struct Record {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub payload: Vec<u8>,
}

/// A window reduced to what must be written.
#[derive(Debug, Default)]
pub struct Collapsed {
    /// Newest change per (user, section), sorted by user id then section.
    pub changes: Vec<Change>,
    /// For each change, the index of its record in the window.
    pub origins: Vec<usize>,
    /// Events superseded inside the window by a newer one of the same section.
    pub superseded: Vec<(Section, u64)>,
    /// Records that did not decode: index in the window, user (if known), error.
    pub poison: Vec<(usize, String, String)>,
}

/// Decodes a window and keeps the newest version per user and section.
pub fn collapse(records: &[Record]) -> Collapsed {
    let mut out = Collapsed::default();
    let mut newest: BTreeMap<(String, Section), (Change, usize)> = BTreeMap::new();
    let mut superseded: HashMap<Section, u64> = HashMap::new();
    for (i, r) in records.iter().enumerate() {
        let event = match UserProfileSyncEvent::decode_bytes(&r.payload) {
            Ok(e) => e,
            Err(e) => {
                out.poison.push((i, String::new(), e.to_string()));
                continue;
            }
        };
        let profile = match proto::unpack_profile(&event.profile_data) {
            Ok(p) => p,
            Err(e) => {
                out.poison.push((
                    i,
                    event.user_id.clone(),
                    format!("user `{}`: {e}", event.user_id),
                ));
                continue;
            }
        };
        let section = Section::of_sync_type(event.sync_type);
        let change = Change {
            user_id: event.user_id,
            section,
            version: event.version,
            profile,
            event_id: event.event_id,
            marked_at_ms: event.marked_at_ms,
        };
        match newest.entry((change.user_id.clone(), section)) {
            std::collections::btree_map::Entry::Vacant(v) => {
                v.insert((change, i));
            }
            std::collections::btree_map::Entry::Occupied(mut o) => {
                *superseded.entry(section).or_default() += 1;
                if change.version > o.get().0.version {
                    o.insert((change, i));
                }
            }
        }
    }
    (out.changes, out.origins) = newest.into_values().unzip();
    out.superseded = superseded.into_iter().collect();
    out
}

pub struct MongoApplier {
    mongo: MongoStore,
    shared: Shared,
    restarts: u32,
}

impl MongoApplier {
    pub const NAME: &'static str = "MongoApplier";

    pub fn new(mongo: MongoStore, shared: Shared) -> Self {
        Self {
            mongo,
            shared,
            restarts: 0,
        }
    }
}

impl Actor for MongoApplier {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        restart_pause(self.restarts, ctx);
    }
}

impl Supervised for MongoApplier {
    fn restarting(&mut self, _: &mut Context<Self>) {
        self.restarts += 1;
    }
}

/// Writes one collapsed window.
#[derive(Message)]
#[rtype(result = "Result<Vec<Outcome>, StageError>")]
pub struct ApplyWindow(pub Arc<Vec<Change>>);

impl Handler<ApplyWindow> for MongoApplier {
    type Result = ResponseActFuture<Self, Result<Vec<Outcome>, StageError>>;

    fn handle(&mut self, ApplyWindow(changes): ApplyWindow, _: &mut Context<Self>) -> Self::Result {
        let mongo = self.mongo.clone();
        let shared = self.shared.clone();
        guard(Self::NAME, shared.stats.clone(), async move {
            shared.faults.check(Stage::Applier);
            Ok(mongo.apply(&changes).await?)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::actors::publisher::{Outgoing, build_event};
    use crate::proto::SyncType;
    use mongodb::bson::doc;
    use prost::Message;

    fn record(user: &str, version: i64, t: SyncType) -> Record {
        let item = Outgoing {
            user_id: user.into(),
            version,
            profile: doc! { "v": version },
            base_version: 0,
            lease_epoch: 0,
        };
        Record {
            topic: "t".into(),
            partition: 0,
            offset: version,
            payload: build_event(t, &item, "test").unwrap().encode_to_vec(),
        }
    }

    #[test]
    fn collapse_keeps_newest_per_user_and_section_sorted() {
        let d = SyncType::DynamicBatch;
        let s = SyncType::StaticImmediate;
        let records = vec![
            record("b", 5, d),
            record("a", 3, d),
            record("b", 9, d),
            record("b", 7, d),
            record("a", 4, s),
            Record {
                topic: "t".into(),
                partition: 1,
                offset: 0,
                payload: vec![0xff, 0x01],
            },
        ];
        let c = collapse(&records);
        let got: Vec<_> = c
            .changes
            .iter()
            .map(|c| (c.user_id.as_str(), c.section, c.version))
            .collect();
        assert_eq!(
            got,
            vec![
                ("a", Section::Static, 4),
                ("a", Section::Dynamic, 3),
                ("b", Section::Dynamic, 9)
            ]
        );
        assert_eq!(c.superseded, vec![(Section::Dynamic, 2)]);
        assert_eq!(c.poison.len(), 1);
    }
}
