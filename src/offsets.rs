//! The offset-range index (seed 004 §5): which offsets of each topic
//! partition the applier applied, and when their records were written.
//!
//! The applier records every window it committed into a [`RangeRecorder`]:
//! contiguous offsets of a partition merge into one open range with the
//! oldest and newest record times. The flusher writes the ranges to a Redis
//! sorted set per partition (score = start offset) every
//! `replay.flush_interval`, when partitions are revoked and on shutdown; each
//! flush closes the open ranges, so a range covers at most one interval and
//! the index keeps that time resolution. A crash loses at most the ranges of
//! the last interval, never data: the index only says where to replay from.
//!
//! The cleanup deletes ranges whose newest record is older than
//! `replay.retention`, inside Redis by a Lua script, `replay.cleanup_batch`
//! ranges per call.

use crate::{
    clients::redis::{RedisError, RedisStore},
    model::{now_ms, rfc3339_ms},
    telemetry::Stats,
};
use rdkafka::{
    ClientContext,
    consumer::{BaseConsumer, ConsumerContext, Rebalance},
};
use serde::Serialize;
use std::{
    collections::{HashMap, hash_map::Entry},
    sync::{Arc, Mutex},
    time::Duration,
};
use tokio_util::sync::CancellationToken;

/// Ranges kept in memory while Redis cannot take them; beyond this the
/// oldest are dropped (with a warning): the index is an aid, not the data.
const MAX_PENDING: usize = 100_000;

/// Contiguous applied offsets of one topic partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OffsetRange {
    pub topic: String,
    pub partition: i32,
    /// First and last offset, inclusive.
    pub start: i64,
    pub end: i64,
    /// The oldest and newest record time in the range (Unix ms).
    pub first_ms: i64,
    pub last_ms: i64,
}

/// A range as the API answers it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RangeView {
    pub topic: String,
    pub partition: i32,
    pub start_offset: i64,
    pub end_offset: i64,
    pub count: i64,
    pub first_time: String,
    pub last_time: String,
}

impl OffsetRange {
    /// Reads a stored member, `"<start>:<end>:<first ms>:<last ms>"`.
    pub fn parse(topic: &str, partition: i32, member: &str) -> Option<Self> {
        let mut it = member.split(':').map(|p| p.parse::<i64>());
        let (start, end, first_ms, last_ms) = (
            it.next()?.ok()?,
            it.next()?.ok()?,
            it.next()?.ok()?,
            it.next()?.ok()?,
        );
        it.next().is_none().then(|| Self {
            topic: topic.to_string(),
            partition,
            start,
            end,
            first_ms,
            last_ms,
        })
    }

    pub fn view(&self) -> RangeView {
        RangeView {
            topic: self.topic.clone(),
            partition: self.partition,
            start_offset: self.start,
            end_offset: self.end,
            count: self.end - self.start + 1,
            first_time: rfc3339_ms(self.first_ms),
            last_time: rfc3339_ms(self.last_ms),
        }
    }

    /// Whether any of its records may lie in `[from, to]` (Unix ms).
    pub fn overlaps(&self, from: Option<i64>, to: Option<i64>) -> bool {
        from.is_none_or(|f| self.last_ms >= f) && to.is_none_or(|t| self.first_ms <= t)
    }
}

#[derive(Debug, Default)]
struct State {
    /// Open ranges by topic, then partition (looked up by `&str`: the hot
    /// path builds no key).
    open: HashMap<String, HashMap<i32, OffsetRange>>,
    closed: Vec<OffsetRange>,
}

/// The applier's ranges not yet in Redis.
#[derive(Debug, Default)]
pub struct RangeRecorder {
    state: Mutex<State>,
    flush_now: tokio::sync::Notify,
}

impl RangeRecorder {
    /// Records applied records `(topic, partition, offset, time ms)`, in the
    /// order they were consumed.
    pub fn record<'a>(&self, records: impl IntoIterator<Item = (&'a str, i32, i64, i64)>) {
        let mut state = self.state.lock().expect("not poisoned");
        let State { open, closed } = &mut *state;
        for (topic, partition, offset, ms) in records {
            if !open.contains_key(topic) {
                open.insert(topic.to_string(), HashMap::new());
            }
            let fresh = || OffsetRange {
                topic: topic.to_string(),
                partition,
                start: offset,
                end: offset,
                first_ms: ms,
                last_ms: ms,
            };
            match open.get_mut(topic).expect("just made").entry(partition) {
                Entry::Occupied(mut o) if offset == o.get().end + 1 => {
                    let r = o.get_mut();
                    r.end = offset;
                    r.first_ms = r.first_ms.min(ms);
                    r.last_ms = r.last_ms.max(ms);
                }
                Entry::Occupied(mut o) => closed.push(std::mem::replace(o.get_mut(), fresh())),
                Entry::Vacant(v) => {
                    v.insert(fresh());
                }
            }
        }
    }

    /// Closes the open ranges of partitions this consumer lost and asks for
    /// a flush now.
    pub fn revoked(&self, partitions: &[(String, i32)]) {
        {
            let mut state = self.state.lock().expect("not poisoned");
            let State { open, closed } = &mut *state;
            for (topic, partition) in partitions {
                if let Some(r) = open.get_mut(topic).and_then(|t| t.remove(partition)) {
                    closed.push(r);
                }
            }
        }
        self.flush_now.notify_one();
    }

    /// Ranges not yet written.
    pub fn pending(&self) -> usize {
        let state = self.state.lock().expect("not poisoned");
        state.open.values().map(HashMap::len).sum::<usize>() + state.closed.len()
    }

    /// Takes every range, closing the open ones.
    fn take(&self) -> Vec<OffsetRange> {
        let mut state = self.state.lock().expect("not poisoned");
        let mut out = std::mem::take(&mut state.closed);
        out.extend(state.open.drain().flat_map(|(_, t)| t.into_values()));
        out
    }

    /// Puts back ranges a flush could not write, ahead of newer ones.
    fn restore(&self, mut ranges: Vec<OffsetRange>) {
        let mut state = self.state.lock().expect("not poisoned");
        ranges.append(&mut state.closed);
        if ranges.len() > MAX_PENDING {
            let dropped = ranges.len() - MAX_PENDING;
            tracing::warn!(
                dropped,
                "offset ranges dropped: Redis has not taken them for long"
            );
            ranges.drain(..dropped);
        }
        state.closed = ranges;
    }

    /// Writes every range to Redis; answers how many. On failure they stay
    /// in memory for the next flush.
    pub async fn flush(&self, redis: &RedisStore) -> Result<usize, RedisError> {
        let ranges = self.take();
        if ranges.is_empty() {
            return Ok(0);
        }
        match redis.offsets_add(&ranges).await {
            Ok(()) => Ok(ranges.len()),
            Err(e) => {
                self.restore(ranges);
                Err(e)
            }
        }
    }
}

/// Flushes every `every`, and at once when partitions are revoked, until
/// the engine stops (the last flush is the shutdown's, after the appliers'
/// last windows).
pub async fn run_flusher(
    recorder: Arc<RangeRecorder>,
    redis: RedisStore,
    stats: Arc<Stats>,
    every: Duration,
    cancel: CancellationToken,
) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => {}
            _ = recorder.flush_now.notified() => {}
        }
        match recorder.flush(&redis).await {
            Ok(n) => stats.offset_ranges_flushed(n as u64),
            Err(e) => {
                tracing::warn!(error = %e, "cannot write offset ranges; kept for the next flush")
            }
        }
    }
}

/// Deletes every range whose newest record is older than `retention`, in
/// calls of at most `batch` ranges; answers how many went.
pub async fn cleanup(
    redis: &RedisStore,
    retention: Duration,
    batch: usize,
) -> Result<u64, RedisError> {
    let cutoff = now_ms() - retention.as_millis() as i64;
    let mut deleted = 0;
    for (topic, partition) in redis.offset_partitions().await? {
        loop {
            let (n, more) = redis.offsets_trim(&topic, partition, cutoff, batch).await?;
            deleted += n;
            if !more {
                break;
            }
        }
    }
    Ok(deleted)
}

/// Runs [`cleanup`] every `every` until the engine stops.
pub async fn run_cleanup(
    redis: RedisStore,
    stats: Arc<Stats>,
    config: crate::config::ReplayConfig,
    cancel: CancellationToken,
) {
    while crate::jobs::pause(&cancel, config.cleanup_interval).await {
        match cleanup(&redis, config.retention, config.cleanup_batch).await {
            Ok(n) => {
                stats.offset_ranges_deleted(n);
                if n > 0 {
                    tracing::info!(deleted = n, retention = ?config.retention, "old offset ranges deleted");
                }
            }
            Err(e) => tracing::warn!(error = %e, "offset range cleanup failed"),
        }
    }
}

/// The stored ranges of `topic` (every topic when `None`) and `partition`
/// (every one when `None`) that may hold records of `[from, to]` (Unix
/// ms), in topic, partition and offset order; at most `limit`, and whether
/// more were left out.
pub async fn list(
    redis: &RedisStore,
    topic: Option<&str>,
    partition: Option<i32>,
    from: Option<i64>,
    to: Option<i64>,
    limit: usize,
) -> Result<(Vec<OffsetRange>, bool), RedisError> {
    let mut out = Vec::new();
    for (t, p) in redis.offset_partitions().await? {
        if topic.is_some_and(|x| x != t) || partition.is_some_and(|x| x != p) {
            continue;
        }
        for r in redis.offset_ranges(&t, p).await? {
            if r.overlaps(from, to) {
                if out.len() == limit {
                    return Ok((out, true));
                }
                out.push(r);
            }
        }
    }
    Ok((out, false))
}

/// The applier consumer's context: revoked partitions close their ranges
/// and flush them at once (the primary sink's consumers; the others record
/// no ranges).
pub struct ApplierContext {
    pub recorder: Option<Arc<RangeRecorder>>,
}

impl ClientContext for ApplierContext {}

impl ConsumerContext for ApplierContext {
    fn pre_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let (Rebalance::Revoke(tpl), Some(recorder)) = (rebalance, &self.recorder) {
            let parts: Vec<(String, i32)> = tpl
                .elements()
                .iter()
                .map(|e| (e.topic().to_string(), e.partition()))
                .collect();
            recorder.revoked(&parts);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contiguous_offsets_merge_and_gaps_split() {
        let r = RangeRecorder::default();
        r.record([("t", 0, 5, 100), ("t", 0, 6, 90), ("t", 1, 0, 50)]);
        r.record([("t", 0, 7, 120), ("t", 0, 9, 130), ("t", 1, 1, 60)]);
        let mut got = r.take();
        got.sort_by_key(|x| (x.partition, x.start));
        let spans: Vec<_> = got
            .iter()
            .map(|x| (x.partition, x.start, x.end, x.first_ms, x.last_ms))
            .collect();
        assert_eq!(
            spans,
            vec![(0, 5, 7, 90, 120), (0, 9, 9, 130, 130), (1, 0, 1, 50, 60)]
        );
        // A flush closes them: the next record starts a new range.
        r.record([("t", 0, 10, 140)]);
        assert_eq!(r.take()[0].start, 10);
    }

    #[test]
    fn revoked_partitions_close_their_ranges() {
        let r = RangeRecorder::default();
        r.record([("t", 0, 1, 1), ("t", 1, 1, 1)]);
        r.revoked(&[("t".into(), 0)]);
        r.record([("t", 0, 2, 2)]);
        assert_eq!(r.pending(), 3);
    }

    #[test]
    fn members_round_trip_and_times_overlap() {
        let m = OffsetRange::parse("t", 3, "10:19:1000:2000").unwrap();
        assert_eq!(
            (m.start, m.end, m.first_ms, m.last_ms),
            (10, 19, 1000, 2000)
        );
        assert!(OffsetRange::parse("t", 3, "10:19:1000").is_none());
        assert!(OffsetRange::parse("t", 3, "10:19:1000:2000:1").is_none());
        assert_eq!(m.view().count, 10);
        assert!(m.overlaps(Some(2000), None) && m.overlaps(None, Some(1000)));
        assert!(!m.overlaps(Some(2001), None) && !m.overlaps(None, Some(999)));
    }
}
