//! The soak's steady workload and the history of what was acknowledged.
//!
//! Four kinds of change, each on users of its own so each user's changes go
//! one at a time: dynamic marks (`POST /v1/sync/dirty`, users `d…`), legacy
//! `SADD`s straight into Redis as the old upstream does (users `l…`),
//! immediate changes (`POST /v1/sync/immediate`, users `s…`) and deletes of
//! dynamic users written before (`POST /v1/sync/delete`; a deleted user is
//! not written again). Each change carries the user's next sequence number
//! (`seq` in the dynamic section, `level` in the static one). A change is
//! *acknowledged* when its request succeeded; one that failed in a way that
//! may have happened (a timeout, a 5xx) is *indeterminate*, so a user's final
//! number must lie between its last acknowledged and its last attempted one.

use datasync::clients::redis::RedisStore;
use rand::{Rng, SeedableRng, rngs::StdRng};
use serde::Serialize;
use std::{
    collections::HashSet,
    sync::{Arc, Mutex},
    time::Duration,
};
use tokio_util::sync::CancellationToken;

/// What one user's changes reached: the last acknowledged number and the
/// last one attempted.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Track {
    pub acked: u64,
    pub attempted: u64,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DeleteState {
    #[default]
    None,
    Attempted,
    Acked,
}

/// The users of each kind of change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    Dynamic,
    Legacy,
    Immediate,
}

impl Kind {
    pub fn user(self, i: usize) -> String {
        match self {
            Kind::Dynamic => format!("d{i}"),
            Kind::Legacy => format!("l{i}"),
            Kind::Immediate => format!("s{i}"),
        }
    }
}

/// Requests sent, by outcome.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Counts {
    pub acked: u64,
    pub indeterminate: u64,
    pub deletes_acked: u64,
    pub deletes_indeterminate: u64,
}

/// Everything the checker compares the documents with.
#[derive(Debug, Default, Clone)]
pub struct History {
    pub dynamic: Vec<Track>,
    pub legacy: Vec<Track>,
    pub immediate: Vec<Track>,
    pub deleted: Vec<DeleteState>,
    pub counts: Counts,
    busy: HashSet<(Kind, usize)>,
}

impl History {
    pub fn new(users: usize) -> Self {
        let side = (users / 10).max(1);
        History {
            dynamic: vec![Track::default(); users],
            legacy: vec![Track::default(); side],
            immediate: vec![Track::default(); side],
            deleted: vec![DeleteState::None; users],
            ..Default::default()
        }
    }

    pub fn tracks(&self, kind: Kind) -> &[Track] {
        match kind {
            Kind::Dynamic => &self.dynamic,
            Kind::Legacy => &self.legacy,
            Kind::Immediate => &self.immediate,
        }
    }

    fn tracks_mut(&mut self, kind: Kind) -> &mut Vec<Track> {
        match kind {
            Kind::Dynamic => &mut self.dynamic,
            Kind::Legacy => &mut self.legacy,
            Kind::Immediate => &mut self.immediate,
        }
    }

    /// Picks up to `n` idle users of `kind` (not deleted) and gives each its
    /// next number; they stay busy until [`History::settle`].
    fn begin(&mut self, kind: Kind, n: usize, rng: &mut StdRng) -> Vec<(usize, u64)> {
        let len = self.tracks(kind).len();
        let mut picked = Vec::new();
        for _ in 0..n * 4 {
            if picked.len() == n {
                break;
            }
            let i = rng.random_range(0..len);
            let gone = kind == Kind::Dynamic && self.deleted[i] != DeleteState::None;
            if gone || !self.busy.insert((kind, i)) {
                continue;
            }
            let t = &mut self.tracks_mut(kind)[i];
            t.attempted += 1;
            picked.push((i, t.attempted));
        }
        picked
    }

    fn settle(&mut self, kind: Kind, changes: &[(usize, u64)], acked: bool) {
        for &(i, seq) in changes {
            self.busy.remove(&(kind, i));
            if acked {
                let t = &mut self.tracks_mut(kind)[i];
                t.acked = t.acked.max(seq);
                self.counts.acked += 1;
            } else {
                self.counts.indeterminate += 1;
            }
        }
    }

    /// A dynamic user written and acknowledged before, idle, to delete.
    fn begin_delete(&mut self, rng: &mut StdRng) -> Option<usize> {
        for _ in 0..16 {
            let i = rng.random_range(0..self.dynamic.len());
            if self.deleted[i] == DeleteState::None
                && self.dynamic[i].acked > 0
                && self.busy.insert((Kind::Dynamic, i))
            {
                self.deleted[i] = DeleteState::Attempted;
                return Some(i);
            }
        }
        None
    }

    fn settle_delete(&mut self, i: usize, acked: bool) {
        self.busy.remove(&(Kind::Dynamic, i));
        if acked {
            self.deleted[i] = DeleteState::Acked;
            self.counts.deletes_acked += 1;
        } else {
            self.counts.deletes_indeterminate += 1;
        }
    }
}

/// The services' APIs, tried in turn: a refused connection (nothing was
/// sent) moves on to the next; any other failure is indeterminate.
#[derive(Clone)]
pub struct Apis {
    http: reqwest::Client,
    urls: Arc<Vec<String>>,
    next: Arc<std::sync::atomic::AtomicUsize>,
}

impl Apis {
    pub fn new(urls: Vec<String>) -> anyhow::Result<Self> {
        Ok(Apis {
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(3))
                .build()?,
            urls: Arc::new(urls),
            next: Default::default(),
        })
    }

    /// POSTs `body` to `path`; whether it was acknowledged.
    pub async fn post(&self, path: &str, body: &serde_json::Value) -> bool {
        let first = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        for k in 0..self.urls.len() {
            let url = format!("{}{path}", self.urls[(first + k) % self.urls.len()]);
            match self.http.post(&url).json(body).send().await {
                Ok(r) => return r.status().is_success(),
                Err(e) if e.is_connect() => continue,
                Err(_) => return false,
            }
        }
        false
    }
}

/// How much of each kind to send per second.
#[derive(Debug, Clone, Copy)]
pub struct Rates {
    pub changes: f64,
    pub legacy_share: f64,
    pub immediate: f64,
    pub deletes: f64,
}

/// Sends changes at `rates` until `stop`, twenty ticks a second; each tick's
/// requests run in their own tasks, so a paused service delays only its own.
pub async fn drive(
    history: Arc<Mutex<History>>,
    apis: Apis,
    redis: RedisStore,
    rates: Rates,
    seed: u64,
    stop: CancellationToken,
) {
    const TICKS: f64 = 20.0;
    let mut rng = StdRng::seed_from_u64(seed ^ 0x5eed);
    let mut budget = [0.0f64; 4];
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / TICKS));
    let pad = "x".repeat(64);
    let mut tasks = tokio::task::JoinSet::new();
    while !stop.is_cancelled() {
        tick.tick().await;
        while tasks.try_join_next().is_some() {}
        let per_tick = [
            rates.changes * (1.0 - rates.legacy_share),
            rates.changes * rates.legacy_share,
            rates.immediate,
            rates.deletes,
        ];
        let mut n = [0usize; 4];
        for k in 0..4 {
            budget[k] += per_tick[k] / TICKS;
            n[k] = budget[k] as usize;
            budget[k] -= n[k] as f64;
        }
        let (dynamic, legacy, immediate, delete) = {
            let mut h = history.lock().expect("history");
            (
                h.begin(Kind::Dynamic, n[0], &mut rng),
                h.begin(Kind::Legacy, n[1], &mut rng),
                h.begin(Kind::Immediate, n[2], &mut rng),
                (0..n[3])
                    .filter_map(|_| h.begin_delete(&mut rng))
                    .collect::<Vec<_>>(),
            )
        };
        if !dynamic.is_empty() {
            let (h, apis, pad) = (history.clone(), apis.clone(), pad.clone());
            tasks.spawn(async move {
                let users: Vec<_> = dynamic
                    .iter()
                    .map(|&(i, seq)| {
                        serde_json::json!({
                            "user_id": Kind::Dynamic.user(i),
                            "profile": { "seq": seq, "pad": pad },
                        })
                    })
                    .collect();
                let ok = apis
                    .post("/v1/sync/dirty", &serde_json::json!({ "users": users }))
                    .await;
                h.lock()
                    .expect("history")
                    .settle(Kind::Dynamic, &dynamic, ok);
            });
        }
        if !legacy.is_empty() {
            let (h, redis) = (history.clone(), redis.clone());
            tasks.spawn(async move {
                let writes: Vec<(String, String)> = legacy
                    .iter()
                    .map(|&(i, seq)| {
                        (
                            Kind::Legacy.user(i),
                            serde_json::json!({ "seq": seq }).to_string(),
                        )
                    })
                    .collect();
                let ids: Vec<String> = writes.iter().map(|(u, _)| u.clone()).collect();
                let ok = tokio::time::timeout(Duration::from_secs(3), async {
                    redis.write_profiles(&writes).await?;
                    redis.legacy_add(&ids).await
                })
                .await
                .is_ok_and(|r| r.is_ok());
                h.lock().expect("history").settle(Kind::Legacy, &legacy, ok);
            });
        }
        for change in immediate {
            let (h, apis) = (history.clone(), apis.clone());
            tasks.spawn(async move {
                let (i, seq) = change;
                let body = serde_json::json!({
                    "user_id": Kind::Immediate.user(i),
                    "profile": { "level": seq, "vip": seq % 2 == 0 },
                });
                let ok = apis.post("/v1/sync/immediate", &body).await;
                h.lock()
                    .expect("history")
                    .settle(Kind::Immediate, &[change], ok);
            });
        }
        for i in delete {
            let (h, apis) = (history.clone(), apis.clone());
            tasks.spawn(async move {
                let body = serde_json::json!({ "user_ids": [Kind::Dynamic.user(i)] });
                let ok = apis.post("/v1/sync/delete", &body).await;
                h.lock().expect("history").settle_delete(i, ok);
            });
        }
    }
    while tasks.join_next().await.is_some() {}
}
