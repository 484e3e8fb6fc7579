//! The checker. During the soak it reads every document once a second and
//! records any version going down (a regression: `staticVersion`,
//! `dynamicVersion`, `dataVersion`, `deletedVersion`, or a document that
//! disappears); it also times each fault's recovery. At the end it compares
//! every user's document with the history of acknowledged changes.

use super::workload::{DeleteState, History, Kind};
use futures::TryStreamExt;
use mongodb::{
    Collection,
    bson::{Bson, Document, doc},
};
use serde::Serialize;
use std::collections::HashMap;

const VERSIONS: [&str; 4] = [
    "staticVersion",
    "dynamicVersion",
    "dataVersion",
    "deletedVersion",
];

/// What one sample saw of one document.
#[derive(Debug, Clone, Copy, Default)]
struct Seen {
    versions: [Option<i64>; 4],
    /// `dynamicProfile.seq` (dynamic and legacy users) or
    /// `staticProfile.level` (immediate users).
    number: u64,
    deleted: bool,
}

fn int(v: Option<&Bson>) -> Option<i64> {
    match v? {
        Bson::Int32(n) => Some(*n as i64),
        Bson::Int64(n) => Some(*n),
        Bson::Double(n) => Some(*n as i64),
        _ => None,
    }
}

fn seen(d: &Document) -> Seen {
    let number = |section: &str, field: &str| {
        d.get_document(section)
            .ok()
            .and_then(|p| int(p.get(field)))
            .unwrap_or(0)
            .max(0) as u64
    };
    Seen {
        versions: VERSIONS.map(|f| int(d.get(f))),
        number: number("dynamicProfile", "seq").max(number("staticProfile", "level")),
        deleted: d.get_bool("deleted").unwrap_or(false),
    }
}

/// One point of the throughput chart.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Point {
    pub t_s: f64,
    /// Changes acknowledged to the workload so far.
    pub acked: u64,
    /// Changes seen applied so far (the sum of each user's number's rises).
    pub applied: u64,
}

/// A fault waiting for its recovery: the changes acknowledged at its end.
struct Waiting {
    fault: usize,
    end_s: f64,
    acked: Vec<(Kind, usize, u64)>,
}

/// Final verdict on one kind of invariant.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Violations {
    pub count: u64,
    /// The first few, for a person to look at.
    pub examples: Vec<String>,
}

impl Violations {
    pub fn add(&mut self, what: String) {
        self.count += 1;
        if self.examples.len() < 20 {
            self.examples.push(what);
        }
    }
}

/// The end state compared with the history.
#[derive(Debug, Clone, Default, Serialize)]
pub struct EndState {
    /// An acknowledged change (or delete) not in its user's document.
    pub lost: Violations,
    /// Of those, immediate changes.
    pub lost_immediate: u64,
    /// A number above anything the workload sent.
    pub phantom: Violations,
    pub users_checked: u64,
}

impl EndState {
    pub fn ok(&self) -> bool {
        self.lost.count == 0 && self.phantom.count == 0
    }
}

pub struct Checker {
    coll: Collection<Document>,
    last: HashMap<String, Seen>,
    pub regressions: Violations,
    pub points: Vec<Point>,
    pub failed_samples: u64,
    applied: u64,
    waiting: Vec<Waiting>,
    /// (fault index, recovery seconds)
    pub recovered: Vec<(usize, f64)>,
}

impl Checker {
    pub fn new(coll: Collection<Document>) -> Self {
        Checker {
            coll,
            last: HashMap::new(),
            regressions: Violations::default(),
            points: Vec::new(),
            failed_samples: 0,
            applied: 0,
            waiting: Vec::new(),
            recovered: Vec::new(),
        }
    }

    /// Every document's userId, versions and numbers.
    async fn read(&self) -> anyhow::Result<HashMap<String, Seen>> {
        let projection = doc! {
            "userId": 1, "staticVersion": 1, "dynamicVersion": 1, "dataVersion": 1,
            "deletedVersion": 1, "deleted": 1, "dynamicProfile.seq": 1, "staticProfile.level": 1,
        };
        let docs: Vec<Document> = self
            .coll
            .find(doc! {})
            .projection(projection)
            .await?
            .try_collect()
            .await?;
        Ok(docs
            .iter()
            .filter_map(|d| Some((d.get_str("userId").ok()?.to_string(), seen(d))))
            .collect())
    }

    /// One sample at `t_s`: regressions, progress and recoveries. A sample
    /// the server does not answer (it may be the fault) is skipped.
    pub async fn sample(&mut self, t_s: f64, history: &std::sync::Mutex<History>) {
        let now = match tokio::time::timeout(std::time::Duration::from_secs(5), self.read()).await {
            Ok(Ok(now)) => now,
            _ => {
                self.failed_samples += 1;
                return;
            }
        };
        for (user, before) in &self.last {
            let Some(after) = now.get(user) else {
                self.regressions
                    .add(format!("{t_s:.1}s {user}: document disappeared"));
                continue;
            };
            for (k, field) in VERSIONS.iter().enumerate() {
                if let Some(b) = before.versions[k]
                    && after.versions[k].is_none_or(|a| a < b)
                {
                    self.regressions.add(format!(
                        "{t_s:.1}s {user}: {field} went from {b} to {:?}",
                        after.versions[k]
                    ));
                }
            }
        }
        for (user, after) in &now {
            let before = self.last.get(user).map_or(0, |b| b.number);
            self.applied += after.number.saturating_sub(before);
        }
        self.last = now;
        let h = history.lock().expect("history");
        self.points.push(Point {
            t_s,
            acked: h.counts.acked,
            applied: self.applied,
        });
        let last = &self.last;
        let caught_up = |w: &Waiting| {
            w.acked.iter().all(|&(kind, i, acked)| {
                (kind == Kind::Dynamic && h.deleted[i] != DeleteState::None)
                    || last.get(&kind.user(i)).is_some_and(|s| s.number >= acked)
            })
        };
        let (done, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut self.waiting)
            .into_iter()
            .partition(caught_up);
        self.waiting = waiting;
        self.recovered
            .extend(done.into_iter().map(|w| (w.fault, t_s - w.end_s)));
    }

    /// Starts timing the recovery of fault `fault`, over at `end_s`.
    pub fn await_recovery(&mut self, fault: usize, end_s: f64, history: &History) {
        let mut acked = Vec::new();
        for kind in [Kind::Dynamic, Kind::Legacy, Kind::Immediate] {
            for (i, t) in history.tracks(kind).iter().enumerate() {
                if t.acked > 0 {
                    acked.push((kind, i, t.acked));
                }
            }
        }
        self.waiting.push(Waiting {
            fault,
            end_s,
            acked,
        });
    }

    /// Every user's document against its history.
    pub async fn end_state(&self, history: &History) -> anyhow::Result<EndState> {
        let docs = self.read().await?;
        let mut end = EndState::default();
        for kind in [Kind::Dynamic, Kind::Legacy, Kind::Immediate] {
            for (i, t) in history.tracks(kind).iter().enumerate() {
                if t.attempted == 0 {
                    continue;
                }
                end.users_checked += 1;
                let user = kind.user(i);
                let d = docs.get(&user).copied().unwrap_or_default();
                let deleted = match kind {
                    Kind::Dynamic => history.deleted[i],
                    _ => DeleteState::None,
                };
                let in_range = (t.acked..=t.attempted).contains(&d.number);
                // A write that timed out before the delete was sent may still
                // take effect after it (its service was paused, say): the user
                // then comes back with that write's number.
                let late_write = t.attempted > t.acked && d.number > t.acked && in_range;
                match deleted {
                    DeleteState::Acked if !d.deleted && !late_write => end.lost.add(format!(
                        "{user}: delete acknowledged, document not deleted (it has {}; \
                         writes acknowledged up to {}, sent up to {})",
                        d.number, t.acked, t.attempted
                    )),
                    DeleteState::Acked => {}
                    DeleteState::Attempted if d.deleted || in_range => {}
                    _ if d.number < t.acked => {
                        if kind == Kind::Immediate {
                            end.lost_immediate += 1;
                        }
                        end.lost.add(format!(
                            "{user}: acknowledged {} but the document has {}",
                            t.acked, d.number
                        ));
                    }
                    _ if d.number > t.attempted => end.phantom.add(format!(
                        "{user}: {} in the document, {} the last sent",
                        d.number, t.attempted
                    )),
                    _ => {}
                }
            }
        }
        Ok(end)
    }
}
