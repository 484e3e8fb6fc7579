//! MongoApplier: consumes the sync topics in windows (by count or time),
//! collapses each window to the newest version per user and section, hands
//! it sorted by userId to its sink ([`crate::sinks`]: MongoDB, the
//! reference sink, as one unordered newer-wins bulk; PostgreSQL; an HTTP
//! endpoint; or one of the host application's), then commits the window's
//! offsets. Offsets are never committed past an unapplied event: when a
//! write fails the same window is retried until it succeeds or the engine
//! stops. The actor keeps the name the design gives the apply stage; each
//! sink has one per consumer loop.
//!
//! Here: the window collapse and the MongoApplier actor that writes a window.
//! [`consumer`]: the consumer loops that gather windows, the priority gate
//! between them, and the outcome handling, retries and commits.

mod consumer;
mod gate;

pub use consumer::ConsumerLoop;
pub use gate::PriorityGate;

use super::{Shared, StageError, guard, restart_pause};
use crate::{
    faults::Stage,
    model::{Change, Op, Section},
    proto::{self, SyncType, UserProfileSyncEvent},
    sinks::{Outcome, Sink},
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
    /// The record's time (Unix ms; its create time as the producer set it).
    pub timestamp_ms: i64,
    pub payload: Vec<u8>,
}

/// A window reduced to what must be written.
#[derive(Debug, Default)]
pub struct Collapsed {
    /// Newest change per (user, section), sorted by user id then section.
    pub changes: Vec<Change>,
    /// For each change, the index of its record in the window.
    pub origins: Vec<usize>,
    /// Events superseded inside the window by a newer one of the same kind,
    /// by [`Change::label`].
    pub superseded: Vec<(&'static str, u64)>,
    /// Records that did not decode: index in the window, user (if known), error.
    pub poison: Vec<(usize, String, String)>,
}

/// The section and operation an event carries; an unknown sync type or a
/// profile that does not unpack is an error naming it.
fn kind_of(event: &UserProfileSyncEvent) -> Result<(Section, Op), String> {
    let profile = || proto::unpack_profile(&event.profile_data).map_err(|e| e.to_string());
    match SyncType::try_from(event.sync_type) {
        Ok(SyncType::StaticImmediate) => Ok((Section::Static, Op::Set(profile()?))),
        Ok(SyncType::DynamicBatch) => Ok((Section::Dynamic, Op::Set(profile()?))),
        Ok(SyncType::UserDelete) => Ok((Section::Dynamic, Op::Delete)),
        Err(_) => Err(format!("unknown sync_type {}", event.sync_type)),
    }
}

/// Decodes a window and keeps the newest version per user and kind (static,
/// dynamic, delete): the three commute under the version rules, so their
/// order in the bulk write does not matter.
pub fn collapse(records: &[Record]) -> Collapsed {
    let mut out = Collapsed::default();
    let mut newest: BTreeMap<(String, &'static str), (Change, usize)> = BTreeMap::new();
    let mut superseded: HashMap<&'static str, u64> = HashMap::new();
    for (i, r) in records.iter().enumerate() {
        let event = match UserProfileSyncEvent::decode_bytes(&r.payload) {
            Ok(e) => e,
            Err(e) => {
                out.poison.push((i, String::new(), e.to_string()));
                continue;
            }
        };
        let (section, op) = match kind_of(&event) {
            Ok(k) => k,
            Err(e) => {
                out.poison.push((
                    i,
                    event.user_id.clone(),
                    format!("user `{}`: {e}", event.user_id),
                ));
                continue;
            }
        };
        let change = Change {
            user_id: event.user_id,
            section,
            version: event.version,
            op,
            event_id: event.event_id,
            marked_at_ms: event.marked_at_ms,
        };
        let label = change.label();
        match newest.entry((change.user_id.clone(), label)) {
            std::collections::btree_map::Entry::Vacant(v) => {
                v.insert((change, i));
            }
            std::collections::btree_map::Entry::Occupied(mut o) => {
                *superseded.entry(label).or_default() += 1;
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
    sink: Arc<dyn Sink>,
    shared: Shared,
    restarts: u32,
}

impl MongoApplier {
    pub const NAME: &'static str = "MongoApplier";

    pub fn new(sink: Arc<dyn Sink>, shared: Shared) -> Self {
        Self {
            sink,
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

/// Writes one collapsed window (or the changes of one the sink asked to
/// have again).
#[derive(Message)]
#[rtype(result = "Result<Vec<Outcome>, StageError>")]
pub struct ApplyWindow(pub Arc<Vec<Change>>);

impl Handler<ApplyWindow> for MongoApplier {
    type Result = ResponseActFuture<Self, Result<Vec<Outcome>, StageError>>;

    fn handle(&mut self, ApplyWindow(changes): ApplyWindow, _: &mut Context<Self>) -> Self::Result {
        let sink = self.sink.clone();
        let shared = self.shared.clone();
        guard(Self::NAME, shared.stats.clone(), async move {
            shared.faults.check(Stage::Applier);
            let outcomes = sink.apply(&changes).await?;
            if outcomes.len() != changes.len() {
                return Err(StageError::Sink(crate::sinks::SinkError::new(format!(
                    "the {} sink answered {} outcomes for {} changes",
                    sink.kind(),
                    outcomes.len(),
                    changes.len()
                ))));
            }
            Ok(outcomes)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::actors::publisher::{Outgoing, build_event};
    use prost::Message;

    fn record(user: &str, version: i64, t: SyncType) -> Record {
        let item = Outgoing {
            user_id: user.into(),
            version,
            profile: serde_json::json!({ "v": version })
                .as_object()
                .cloned()
                .unwrap(),
            base_version: 0,
            lease_epoch: 0,
        };
        Record {
            topic: "t".into(),
            partition: 0,
            offset: version,
            timestamp_ms: 0,
            payload: build_event(t, &item, "test").encode_to_vec(),
        }
    }

    #[test]
    fn collapse_keeps_newest_per_user_and_kind_sorted() {
        let d = SyncType::DynamicBatch;
        let s = SyncType::StaticImmediate;
        let del = SyncType::UserDelete;
        let mut unknown = record("c", 1, d);
        let mut event = UserProfileSyncEvent::decode_bytes(&unknown.payload).unwrap();
        event.sync_type = 7;
        unknown.payload = event.encode_to_vec();
        let records = vec![
            record("b", 5, d),
            record("a", 3, d),
            record("b", 9, d),
            record("b", 7, d),
            record("a", 4, s),
            record("a", 6, del),
            record("a", 2, del),
            Record {
                topic: "t".into(),
                partition: 1,
                offset: 0,
                timestamp_ms: 0,
                payload: vec![0xff, 0x01],
            },
            unknown,
        ];
        let c = collapse(&records);
        let got: Vec<_> = c
            .changes
            .iter()
            .map(|c| (c.user_id.as_str(), c.label(), c.version))
            .collect();
        assert_eq!(
            got,
            vec![
                ("a", "delete", 6),
                ("a", "dynamic", 3),
                ("a", "static", 4),
                ("b", "dynamic", 9)
            ]
        );
        assert_eq!(c.changes[0].op, Op::Delete);
        let mut superseded = c.superseded.clone();
        superseded.sort();
        assert_eq!(superseded, vec![("delete", 1), ("dynamic", 2)]);
        assert_eq!(c.poison.len(), 2);
        assert!(
            c.poison[1].2.contains("unknown sync_type 7"),
            "{:?}",
            c.poison
        );
    }
}
