//! The consumer side of the applier: each loop gathers a window from its
//! topic (the next one while the previous is written), hands it to its
//! MongoApplier, sends again what its sink refused with a retryable error
//! (per the retry policy), records the outcomes (counters, dead letters and,
//! for the primary sink, the caches, settled immediate changes and the
//! offset-range index, [`crate::offsets`]) and commits the window's offsets,
//! strictly in order. Every sink has its own pair of loops (static and
//! dynamic) in consumer groups of its own. Within a sink the static loop
//! goes first: while a static window is in flight the dynamic loop waits at
//! the [`PriorityGate`].

use super::gate::{GateTicket, PriorityGate};
use super::{ApplyWindow, MongoApplier, Record, collapse};
use crate::{
    actors::{
        Shared, StageError, ask,
        dlq::{DlqActor, Record as DlqRecord},
    },
    cache::AppliedCache,
    config::ApplierConfig,
    faults::{HoldPoint, Stage},
    health::Backend,
    model::{Change, DeadLetter, DlqStage, Op, Section, now_ms},
    offsets::{ApplierContext, RangeRecorder},
    sinks::{Outcome, SinkStatus},
};
use actix::prelude::*;
use rdkafka::{
    Message as _, Offset, TopicPartitionList,
    consumer::{CommitMode, Consumer, StreamConsumer},
};
use std::{
    collections::{BTreeMap, HashMap},
    sync::Arc,
};

/// The consumer side of the applier: reads windows and feeds the actor.
pub struct ConsumerLoop {
    pub consumer: StreamConsumer<ApplierContext>,
    /// Where committed windows' offsets are recorded (the offset-range
    /// index); the primary sink's loops only.
    pub ranges: Option<Arc<RangeRecorder>>,
    pub applier: Addr<MongoApplier>,
    pub dlq: Addr<DlqActor>,
    pub cache: AppliedCache,
    pub profiles: Arc<crate::profiles::ProfileReader>,
    pub redis: crate::clients::redis::RedisStore,
    pub config: ApplierConfig,
    pub shared: Shared,
    /// The section whose topic this loop serves.
    pub role: Section,
    pub gate: Arc<PriorityGate>,
    /// The sink this loop applies to.
    pub sink: Arc<SinkStatus>,
    /// Its sink writes `[mongo]` itself: a window it cannot write marks
    /// MongoDB down (which pauses the scanner) and one it writes marks it up.
    pub writes_mongo: bool,
}

/// A window whose write is under way in the MongoApplier.
struct InFlight {
    window: Vec<Record>,
    changes: Arc<Vec<Change>>,
    origins: Vec<usize>,
    poison: Vec<(usize, String, String)>,
    request: std::pin::Pin<Box<actix::dev::Request<MongoApplier, ApplyWindow>>>,
    /// Static windows hold the priority gate until they are finished.
    _gate: Option<GateTicket>,
}

type WriteResult = Result<Result<Vec<Outcome>, StageError>, actix::MailboxError>;

impl ConsumerLoop {
    /// Gathers the next window while the previous one is being written (two
    /// windows at most), and finishes windows strictly in order, so offsets are
    /// committed in order and never past an unwritten window.
    pub async fn run(self) {
        self.consume().await;
        tracing::info!(section = self.role.label(), "consumer loop stopped");
    }

    async fn consume(&self) {
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
                        _ = self.shared.cancel.cancelled() => {}
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
            if self.role == Section::Dynamic {
                self.gate.wait_idle(&self.shared.stats).await;
            }
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
    }

    /// Waits for a first record, then gathers a window. `None` once the engine
    /// stops.
    async fn next_window(&self) -> Option<Vec<Record>> {
        let first = tokio::select! {
            _ = self.shared.cancel.cancelled() => return None,
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
                timestamp_ms: m.timestamp().to_millis().unwrap_or_else(now_ms),
                payload: m.payload().unwrap_or_default().to_vec(),
            }),
            Err(e) => tracing::warn!(error = %e, "kafka consumer error"),
        }
    }

    /// Collapses a window and hands it to the MongoApplier.
    fn submit(&self, window: Vec<Record>) -> InFlight {
        self.shared.faults.check(Stage::ConsumerLoop);
        let collapsed = collapse(&window);
        if self.sink.primary {
            for (i, _, err) in &collapsed.poison {
                let r = &window[*i];
                self.shared
                    .stats
                    .poison(&format!("{}[{}]@{}: {err}", r.topic, r.partition, r.offset));
            }
        }
        for (label, n) in &collapsed.superseded {
            self.sink.stale(label, *n);
            if self.sink.primary {
                self.shared.stats.stale(*n);
            }
        }
        let changes = Arc::new(collapsed.changes);
        let gate = (self.role == Section::Static).then(|| self.gate.enter());
        let request = Box::pin(self.applier.send(ApplyWindow(changes.clone())));
        InFlight {
            window,
            changes,
            origins: collapsed.origins,
            poison: collapsed.poison,
            request,
            _gate: gate,
        }
    }

    /// A dead letter for the record at `i` of a window.
    fn dead_letter(
        &self,
        r: &Record,
        user_id: String,
        version: i64,
        stage: DlqStage,
        error: String,
    ) -> DeadLetter {
        let kept = match self.role {
            Section::Static if stage == DlqStage::Apply && self.sink.primary => {
                "; the change stays pending in Redis: redrive it to publish it again with a new version"
            }
            Section::Static if stage == DlqStage::Apply => {
                "; a redrive publishes it again only while the primary sink has not settled it; else make the change anew"
            }
            _ => "",
        };
        DeadLetter {
            detail: format!(
                "stage {}{}: consumed from {} partition {} offset {}; the offset is committed after this record is stored{kept}",
                stage.label(),
                if stage == DlqStage::Apply {
                    format!(" (sink {})", self.sink.name)
                } else {
                    String::new()
                },
                r.topic,
                r.partition,
                r.offset
            ),
            user_id,
            version,
            stage,
            section: self.role,
            delete: false,
            original_event: r.payload.clone(),
            error,
            retry_count: 0,
            topic: r.topic.clone(),
            partition: Some(r.partition),
            offset: Some(r.offset),
            sink: None,
        }
    }

    /// Records dead letters, retrying until they are stored: a window's offsets
    /// are not committed past a record that is neither applied nor recorded.
    async fn record_dead(&self, letters: Vec<DeadLetter>) -> bool {
        if letters.is_empty() {
            return true;
        }
        let mut attempt = 0;
        loop {
            match ask(DlqActor::NAME, &self.dlq, DlqRecord(letters.clone())).await {
                Ok(_) => return true,
                Err(e) => {
                    let wait = self.shared.retry.delay(attempt);
                    tracing::warn!(error = %e, retry_in = ?wait, "cannot record dead letters; retrying");
                    tokio::select! {
                        _ = self.shared.cancel.cancelled() => return false,
                        _ = tokio::time::sleep(wait) => {}
                    }
                    attempt += 1;
                }
            }
        }
    }

    /// Waits for a window's write (retrying it until it succeeds), records the
    /// outcomes and commits its offsets. Returns false when the engine stopped
    /// before the window was written (its offsets stay uncommitted, so the next
    /// start applies it).
    async fn finish(&self, f: InFlight, first: WriteResult) -> bool {
        let go_on =
            self.role != Section::Static || self.shared.faults.pass(HoldPoint::StaticWindow).await;
        // The window (and with it a static window's gate ticket) is dropped
        // once its outcomes are recorded.
        go_on && self.write_outcomes(f, first).await
    }

    /// Waits for a window's write, retrying it until the sink takes it;
    /// `None` once the engine stops first.
    async fn taken(&self, changes: &Arc<Vec<Change>>, first: WriteResult) -> Option<Vec<Outcome>> {
        let health = &self.shared.health;
        let mut result = first;
        let mut attempt = 0;
        // A window the sink cannot take is retried without limit: consumption
        // pauses (nothing is committed) until the sink takes it.
        loop {
            let mut wait = self.shared.retry.delay(attempt);
            match result {
                Ok(Ok(o)) => {
                    self.sink.up();
                    if self.writes_mongo {
                        health.set_up(Backend::Mongo);
                    }
                    return Some(o);
                }
                Ok(Err(e)) => {
                    if let StageError::Sink(s) = &e
                        && let Some(after) = s.retry_after
                    {
                        wait = wait.max(after);
                    }
                    self.sink.failed(&e.to_string());
                    if self.writes_mongo && matches!(e, StageError::Sink(_) | StageError::Mongo(_))
                    {
                        health.set_down(Backend::Mongo, &e);
                    }
                    tracing::warn!(sink = %self.sink.name, error = %e, retry_in = ?wait, "window not written; retrying")
                }
                Err(e) => {
                    tracing::warn!(sink = %self.sink.name, error = %e, retry_in = ?wait, "applier unavailable; retrying")
                }
            }
            tokio::select! {
                _ = self.shared.cancel.cancelled() => return None,
                _ = tokio::time::sleep(wait) => {}
            }
            attempt += 1;
            result = self.applier.send(ApplyWindow(changes.clone())).await;
        }
    }

    /// Sends again, per the retry policy, the changes the sink refused with
    /// a retryable error; what still fails after `retry.max_retries` is
    /// left failed (a dead letter). Returns how many times each change was
    /// sent again, or `None` once the engine stops first.
    async fn retry_refused(
        &self,
        changes: &[Change],
        outcomes: &mut [Outcome],
    ) -> Option<Vec<u32>> {
        let retry = &self.shared.retry;
        let mut attempt = 0;
        let mut sent_again = vec![0u32; changes.len()];
        loop {
            let again: Vec<usize> = outcomes
                .iter()
                .enumerate()
                .filter(|(_, o)| matches!(o, Outcome::Failed(f) if f.retryable))
                .map(|(i, _)| i)
                .collect();
            if again.is_empty() || attempt >= retry.max_retries {
                return Some(sent_again);
            }
            let asked = again
                .iter()
                .filter_map(|&i| match &outcomes[i] {
                    Outcome::Failed(f) => f.retry_after,
                    _ => None,
                })
                .max()
                .unwrap_or_default();
            let wait = retry.delay(attempt).max(asked);
            tracing::debug!(sink = %self.sink.name, changes = again.len(), retry_in = ?wait, "sending refused changes again");
            tokio::select! {
                _ = self.shared.cancel.cancelled() => return None,
                _ = tokio::time::sleep(wait) => {}
            }
            self.sink.retried(again.len() as u64);
            let subset = Arc::new(
                again
                    .iter()
                    .map(|&i| changes[i].clone())
                    .collect::<Vec<_>>(),
            );
            let first = self.applier.send(ApplyWindow(subset.clone())).await;
            let answered = self.taken(&subset, first).await?;
            for (i, o) in again.into_iter().zip(answered) {
                outcomes[i] = o;
                sent_again[i] += 1;
            }
            attempt += 1;
        }
    }

    async fn write_outcomes(&self, f: InFlight, first: WriteResult) -> bool {
        let InFlight {
            window,
            changes,
            origins,
            poison,
            ..
        } = f;
        let Some(mut outcomes) = self.taken(&changes, first).await else {
            return false;
        };
        let Some(retries) = self.retry_refused(&changes, &mut outcomes).await else {
            return false;
        };
        let stats = &self.shared.stats;
        let primary = self.sink.primary;

        let now_ms = now_ms();
        let mut counts: HashMap<(&'static str, bool), u64> = HashMap::new();
        // An undecodable record is the same for every sink: the primary's
        // loop records it.
        let mut dead: Vec<DeadLetter> = if primary {
            poison
                .into_iter()
                .map(|(i, user, err)| self.dead_letter(&window[i], user, 0, DlqStage::Decode, err))
                .collect()
        } else {
            Vec::new()
        };
        for (((c, o), &i), &retried) in changes.iter().zip(&outcomes).zip(&origins).zip(&retries) {
            match o {
                Outcome::Applied => {
                    *counts.entry((c.label(), true)).or_default() += 1;
                    if primary {
                        stats.flag_to_applied(
                            c.label(),
                            (now_ms - c.marked_at_ms).max(0) as f64 / 1000.0,
                        );
                    }
                }
                Outcome::Stale => {
                    *counts.entry((c.label(), false)).or_default() += 1;
                }
                Outcome::Failed(failure) => {
                    let err = format!("user `{}`: {}", c.user_id, failure.error);
                    if primary {
                        stats.apply_failed(&self.sink.name, &err);
                    }
                    self.sink.note_error(&err);
                    let mut letter = self.dead_letter(
                        &window[i],
                        c.user_id.clone(),
                        c.version,
                        DlqStage::Apply,
                        err,
                    );
                    letter.delete = c.op == Op::Delete;
                    // The primary sink's letters keep the shape they had
                    // before sinks existed (no sink named); the detail
                    // names it either way.
                    letter.sink = (!primary).then(|| self.sink.name.clone());
                    letter.retry_count = retried;
                    dead.push(letter);
                }
            }
        }
        for ((label, applied), n) in counts {
            if applied {
                self.sink.applied(label, n);
                if primary {
                    stats.applied(label, n);
                }
            } else {
                self.sink.stale(label, n);
                if primary {
                    stats.stale(n);
                }
            }
        }
        let refused = dead.iter().filter(|l| l.stage == DlqStage::Apply).count() as u64;
        if !self.record_dead(dead).await {
            return false;
        }
        self.sink.dead_lettered(refused);
        if primary {
            self.primary_effects(&changes, &outcomes).await;
        }
        self.commit(&window);
        if let Some(ranges) = &self.ranges {
            ranges.record(
                window
                    .iter()
                    .map(|r| (r.topic.as_str(), r.partition, r.offset, r.timestamp_ms)),
            );
        }
        true
    }

    /// What the primary sink's outcomes tell the rest of the engine: the
    /// applied-version caches rise, settled immediate changes leave the
    /// pending set, and cached profiles of applied users go. Best effort:
    /// each is a cache, or is done again by a later window.
    async fn primary_effects(&self, changes: &[Change], outcomes: &[Outcome]) {
        let known: Vec<(&str, Section, i64)> = changes
            .iter()
            .zip(outcomes)
            .filter(|(_, o)| matches!(o, Outcome::Applied | Outcome::Stale))
            .flat_map(|(c, _)| applied_versions(c))
            .collect();
        if let Err(e) = self.cache.record_applied(&known).await {
            tracing::warn!(error = %e, "cannot update the applied-version cache");
        }
        if self.role == Section::Static {
            // Settled in the primary sink (applied, or superseded by a newer
            // version): profile reads no longer need the pending copy. A
            // refused change stays pending, so a DLQ redrive can publish it
            // again.
            let settled: Vec<(&str, i64)> = changes
                .iter()
                .zip(outcomes)
                .filter(|(_, o)| !matches!(o, Outcome::Failed(_)))
                .map(|(c, _)| (c.user_id.as_str(), c.version))
                .collect();
            if let Err(e) = self.redis.static_settled(&settled).await {
                tracing::warn!(error = %e, "cannot drop settled immediate changes");
            }
        }
        let applied: Vec<&str> = changes
            .iter()
            .zip(outcomes)
            .filter(|(_, o)| **o == Outcome::Applied)
            .map(|(c, _)| c.user_id.as_str())
            .collect();
        if let Err(e) = self.profiles.invalidate(&applied).await {
            // The L2 entries still expire after cache.profile_l2_ttl.
            tracing::warn!(error = %e, "cannot invalidate cached profiles");
        }
    }

    fn commit(&self, window: &[Record]) {
        if window.is_empty() {
            return;
        }
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
        // Asynchronous: the commit is sent in the background, so no thread
        // blocks on the broker (closing the consumer completes the ones in
        // flight). A commit that fails or is lost is not fatal: the window is
        // applied, and its replay after a restart is a no-op by the version
        // rules.
        if let Err(e) = self.consumer.commit(&tpl, CommitMode::Async) {
            tracing::warn!(error = %e, "offset commit failed");
        }
    }
}

/// The applied versions MongoDB holds at least, once a change is applied or
/// found stale: its section's, or both sections' for a delete.
fn applied_versions(c: &Change) -> Vec<(&str, Section, i64)> {
    match c.op {
        Op::Set(_) => vec![(c.user_id.as_str(), c.section, c.version)],
        Op::Delete => [Section::Static, Section::Dynamic]
            .map(|s| (c.user_id.as_str(), s, c.version))
            .to_vec(),
    }
}
