//! MongoApplier: consumes the sync topics in windows (by count or time),
//! collapses each window to the newest version per user and section, writes it
//! to MongoDB sorted by userId as one unordered newer-wins bulk, then commits the
//! window's offsets. Offsets are never committed past an unapplied event: when a
//! write fails the same window is retried until it succeeds or the engine stops.

use crate::{
    cache::AppliedCache,
    clients::{
        mongo::{Change, MongoError, MongoStore, Outcome},
        redis::Section,
    },
    config::ApplierConfig,
    proto::{self, SyncType, UserProfileSyncEvent},
    telemetry::Stats,
};
use actix::prelude::*;
use rdkafka::{
    Message as _, Offset, TopicPartitionList,
    consumer::{CommitMode, Consumer, StreamConsumer},
};
use std::{
    collections::{BTreeMap, HashMap},
    sync::Arc,
    time::Duration,
};
use tokio_util::sync::CancellationToken;

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
    /// Events superseded inside the window by a newer one of the same section.
    pub superseded: Vec<(Section, u64)>,
    /// Records that did not decode.
    pub poison: Vec<(Record, String)>,
}

fn section_of(t: i32) -> Section {
    if t == SyncType::StaticImmediate as i32 {
        Section::Static
    } else {
        Section::Dynamic
    }
}

pub fn section_label(s: Section) -> &'static str {
    match s {
        Section::Static => "static",
        Section::Dynamic => "dynamic",
    }
}

/// Decodes a window and keeps the newest version per user and section.
pub fn collapse(records: &[Record]) -> Collapsed {
    let mut out = Collapsed::default();
    let mut newest: BTreeMap<(String, Section), Change> = BTreeMap::new();
    let mut superseded: HashMap<Section, u64> = HashMap::new();
    for r in records {
        let event = match UserProfileSyncEvent::decode_bytes(&r.payload) {
            Ok(e) => e,
            Err(e) => {
                out.poison.push((r.clone(), e.to_string()));
                continue;
            }
        };
        let profile = match proto::unpack_profile(&event.profile_data) {
            Ok(p) => p,
            Err(e) => {
                out.poison
                    .push((r.clone(), format!("user `{}`: {e}", event.user_id)));
                continue;
            }
        };
        let section = section_of(event.sync_type);
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
                v.insert(change);
            }
            std::collections::btree_map::Entry::Occupied(mut o) => {
                *superseded.entry(section).or_default() += 1;
                if change.version > o.get().version {
                    o.insert(change);
                }
            }
        }
    }
    out.changes = newest.into_values().collect();
    out.superseded = superseded.into_iter().collect();
    out
}

pub struct MongoApplier {
    mongo: MongoStore,
}

impl MongoApplier {
    pub fn new(mongo: MongoStore) -> Self {
        Self { mongo }
    }
}

impl Actor for MongoApplier {
    type Context = Context<Self>;
}

impl Supervised for MongoApplier {}

/// Writes one collapsed window.
#[derive(Message)]
#[rtype(result = "Result<Vec<Outcome>, MongoError>")]
pub struct ApplyWindow(pub Arc<Vec<Change>>);

impl Handler<ApplyWindow> for MongoApplier {
    type Result = ResponseFuture<Result<Vec<Outcome>, MongoError>>;

    fn handle(&mut self, ApplyWindow(changes): ApplyWindow, _: &mut Context<Self>) -> Self::Result {
        let mongo = self.mongo.clone();
        Box::pin(async move { mongo.apply(&changes).await })
    }
}

/// The consumer side of the applier: reads windows and feeds the actor.
pub struct ConsumerLoop {
    pub consumer: StreamConsumer,
    pub applier: Addr<MongoApplier>,
    pub cache: AppliedCache,
    pub config: ApplierConfig,
    pub stats: Arc<Stats>,
    pub cancel: CancellationToken,
}

/// A window whose write is under way in the MongoApplier.
struct InFlight {
    window: Vec<Record>,
    changes: Arc<Vec<Change>>,
    request: std::pin::Pin<Box<actix::dev::Request<MongoApplier, ApplyWindow>>>,
}

type WriteResult = Result<Result<Vec<Outcome>, MongoError>, actix::MailboxError>;

impl ConsumerLoop {
    /// Gathers the next window while the previous one is being written (two
    /// windows at most), and finishes windows strictly in order, so offsets are
    /// committed in order and never past an unwritten window.
    pub async fn run(self) {
        let mut in_flight: Option<InFlight> = None;
        loop {
            let window = match in_flight.as_mut() {
                None => match self.next_window().await {
                    Some(w) => w,
                    None => break,
                },
                Some(f) => {
                    let mut done: Option<WriteResult> = None;
                    let mut first = None;
                    tokio::select! {
                        biased;
                        r = &mut f.request => done = Some(r),
                        _ = self.cancel.cancelled() => {}
                        m = self.consumer.recv() => first = Some(m),
                    }
                    if let Some(r) = done {
                        let f = in_flight.take().expect("in flight");
                        if !self.finish(f, r).await {
                            return;
                        }
                        continue;
                    }
                    match first {
                        Some(m) => self.gather(m).await,
                        None => break, // stopping: finish what is in flight below
                    }
                }
            };
            let next = self.submit(window);
            if let Some(mut f) = in_flight.take() {
                let r = (&mut f.request).await;
                if !self.finish(f, r).await {
                    return;
                }
            }
            in_flight = Some(next);
        }
        if let Some(mut f) = in_flight.take() {
            let r = (&mut f.request).await;
            self.finish(f, r).await;
        }
        tracing::info!("mongo applier stopped");
    }

    /// Waits for a first record, then gathers a window. `None` once the engine
    /// stops.
    async fn next_window(&self) -> Option<Vec<Record>> {
        let first = tokio::select! {
            _ = self.cancel.cancelled() => return None,
            m = self.consumer.recv() => m,
        };
        Some(self.gather(first).await)
    }

    /// Gathers from `first` until the window is full or its time is up.
    async fn gather(
        &self,
        first: Result<rdkafka::message::BorrowedMessage<'_>, rdkafka::error::KafkaError>,
    ) -> Vec<Record> {
        let mut window = Vec::new();
        self.push(&mut window, first);
        let deadline = tokio::time::Instant::now() + self.config.window_max_wait;
        while window.len() < self.config.window_max_events {
            tokio::select! {
                _ = tokio::time::sleep_until(deadline) => break,
                m = self.consumer.recv() => self.push(&mut window, m),
            }
        }
        window
    }

    fn push(
        &self,
        window: &mut Vec<Record>,
        m: Result<rdkafka::message::BorrowedMessage<'_>, rdkafka::error::KafkaError>,
    ) {
        match m {
            Ok(m) => window.push(Record {
                topic: m.topic().to_string(),
                partition: m.partition(),
                offset: m.offset(),
                payload: m.payload().unwrap_or_default().to_vec(),
            }),
            Err(e) => tracing::warn!(error = %e, "kafka consumer error"),
        }
    }

    /// Collapses a window and hands it to the MongoApplier.
    fn submit(&self, window: Vec<Record>) -> InFlight {
        let collapsed = collapse(&window);
        for (record, err) in &collapsed.poison {
            self.stats.poison(&format!(
                "{}[{}]@{}: {err}",
                record.topic, record.partition, record.offset
            ));
        }
        for (section, n) in &collapsed.superseded {
            self.stats.stale(section_label(*section), *n);
        }
        let changes = Arc::new(collapsed.changes);
        let request = Box::pin(self.applier.send(ApplyWindow(changes.clone())));
        InFlight {
            window,
            changes,
            request,
        }
    }

    /// Waits for a window's write (retrying it until it succeeds), records the
    /// outcomes and commits its offsets. Returns false when the engine stopped
    /// before the window was written (its offsets stay uncommitted, so the next
    /// start applies it).
    async fn finish(&self, f: InFlight, first: WriteResult) -> bool {
        let InFlight {
            window, changes, ..
        } = f;
        let mut result = first;
        let mut delay = Duration::from_millis(100);
        let outcomes = loop {
            match result {
                Ok(Ok(o)) => break o,
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, retry_in = ?delay, "window not written; retrying")
                }
                Err(e) => {
                    tracing::warn!(error = %e, retry_in = ?delay, "applier unavailable; retrying")
                }
            }
            tokio::select! {
                _ = self.cancel.cancelled() => return false,
                _ = tokio::time::sleep(delay) => {}
            }
            delay = (delay * 2).min(Duration::from_secs(10));
            result = self.applier.send(ApplyWindow(changes.clone())).await;
        };

        let now_ms = crate::actors::publisher::now_ms();
        let mut known = Vec::with_capacity(changes.len());
        let mut counts: HashMap<(Section, bool), u64> = HashMap::new();
        for (c, o) in changes.iter().zip(&outcomes) {
            match o {
                Outcome::Applied => {
                    *counts.entry((c.section, true)).or_default() += 1;
                    self.stats
                        .flag_to_applied((now_ms - c.marked_at_ms).max(0) as f64 / 1000.0);
                    known.push((c.user_id.as_str(), c.section, c.version));
                }
                Outcome::Stale => {
                    *counts.entry((c.section, false)).or_default() += 1;
                    known.push((c.user_id.as_str(), c.section, c.version));
                }
                Outcome::Rejected(e) => self
                    .stats
                    .apply_failed(&format!("user `{}`: {e}", c.user_id)),
            }
        }
        for ((section, applied), n) in counts {
            if applied {
                self.stats.applied(section_label(section), n);
            } else {
                self.stats.stale(section_label(section), n);
            }
        }
        if let Err(e) = self.cache.record_applied(&known).await {
            tracing::warn!(error = %e, "cannot update the applied-version cache");
        }
        self.commit(&window);
        true
    }

    fn commit(&self, window: &[Record]) {
        let mut next: BTreeMap<(&str, i32), i64> = BTreeMap::new();
        for r in window {
            let e = next.entry((r.topic.as_str(), r.partition)).or_insert(0);
            *e = (*e).max(r.offset + 1);
        }
        let mut tpl = TopicPartitionList::new();
        for ((topic, partition), offset) in next {
            if let Err(e) = tpl.add_partition_offset(topic, partition, Offset::Offset(offset)) {
                tracing::error!(error = %e, "cannot build offset list");
                return;
            }
        }
        if let Err(e) = self.consumer.commit(&tpl, CommitMode::Sync) {
            // Not fatal: the window is applied; a replay after a restart is a
            // no-op by the version rules.
            tracing::warn!(error = %e, "offset commit failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::actors::publisher::{Outgoing, build_event};
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
