//! Shard leases: which virtual shards this instance may scan.
//!
//! Each shard has a lease in Redis (`<prefix>:lease:{shard}` = `token|epoch`,
//! with a TTL) and a fencing epoch counter raised by every acquisition. The
//! [`LeaseKeeper`] heartbeats this instance into `<prefix>:members` and works out
//! its quota from the live members: `shards / members`, plus one for the first
//! `shards % members` members by rank, so the quotas add up to every shard and
//! differ by at most one. Every third of the TTL it renews what it holds,
//! releases what is above its quota once no page of those shards is in flight,
//! and takes free shards up to its quota. Holdings are sticky: a member change
//! moves only the shards it must. A dead instance's leases expire and the
//! survivors take its shards at their next round: within the TTL plus one
//! renewal interval.
//!
//! The scanner only starts a page while the lease has more than half its TTL
//! left, carries the epoch in every event, and clears flags with a script that
//! checks the lease is still its own (fencing): an instance that stalled past its
//! lease cannot clear a flag the new owner is responsible for, and MongoDB's
//! version rule stops anything it publishes late from regressing a document.
//!
//! Modes (`instance.mode`): `lease` (the default; any number of instances),
//! `fixed` (the seed's static split, `shard % total == index`, each shard still
//! guarded by its lease like the seed's `sync_lock_<id>`), and `all` (every shard,
//! no leases: one instance only).

use crate::{
    clients::redis::RedisStore,
    config::{Config, ShardMode},
    telemetry::{LeaseChange, LeaseChanged, LeasesHeld},
};
use dashmap::DashMap;
use serde::Serialize;
use std::{
    sync::{
        Arc,
        atomic::{AtomicU32, Ordering},
    },
    time::{Duration, Instant},
};
use tokio_util::sync::CancellationToken;

/// A lease this instance holds.
#[derive(Debug, Clone)]
pub struct Lease {
    pub epoch: i64,
    /// The value stored in Redis: `token|epoch`.
    pub value: String,
    /// When it runs out, by this process's clock (measured from before the
    /// call that set it, so it errs early).
    pub expires: Instant,
    /// Above this instance's quota: no new page starts; released once idle.
    pub draining: bool,
}

/// Permission to work on one shard now.
#[derive(Debug, Clone)]
pub struct Ticket {
    pub shard: u32,
    pub epoch: i64,
    /// The lease value flag clears are fenced with (`None` without leases).
    pub fence: Option<String>,
}

/// What this instance owns, shared by the keeper and the scanner.
pub struct Ownership {
    mode: ShardMode,
    shards: u32,
    fixed: Vec<u32>,
    held: DashMap<u32, Lease>,
    busy: Box<[AtomicU32]>,
    margin: Duration,
}

/// Marks a shard busy while a scan of it is under way.
pub struct Busy<'a>(&'a AtomicU32);

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Ownership {
    pub fn new(config: &Config) -> Self {
        let shards = config.sync.shards;
        let fixed = match config.instance.mode {
            ShardMode::Fixed => (0..shards)
                .filter(|s| s % config.instance.total == config.instance.index)
                .collect(),
            _ => (0..shards).collect(),
        };
        Self {
            mode: config.instance.mode,
            shards,
            fixed,
            held: DashMap::new(),
            busy: (0..shards).map(|_| AtomicU32::new(0)).collect(),
            margin: config.lease.ttl / 2,
        }
    }

    pub fn uses_leases(&self) -> bool {
        self.mode != ShardMode::All
    }

    /// Shards this instance may ever scan: all of them, or its fixed split.
    pub fn candidates(&self) -> &[u32] {
        &self.fixed
    }

    /// Shards to scan this cycle, sorted.
    pub fn scannable(&self) -> Vec<u32> {
        if !self.uses_leases() {
            return self.fixed.clone();
        }
        let mut v: Vec<u32> = self
            .held
            .iter()
            .filter(|e| {
                !e.draining && e.expires.saturating_duration_since(Instant::now()) > self.margin
            })
            .map(|e| *e.key())
            .collect();
        v.sort_unstable();
        v
    }

    /// Shards whose lease this instance holds (whatever time is left), sorted.
    pub fn held(&self) -> Vec<HeldShard> {
        let now = Instant::now();
        let mut v: Vec<HeldShard> = self
            .held
            .iter()
            .map(|e| {
                let left = e.expires.saturating_duration_since(now);
                HeldShard {
                    shard: *e.key(),
                    epoch: e.epoch,
                    left_ms: left.as_millis() as u64,
                    scannable: left > self.margin,
                }
            })
            .collect();
        v.sort_unstable_by_key(|h| h.shard);
        v
    }

    /// Permission to start a page of `shard`: only while the lease has more
    /// than half its TTL left.
    pub fn ticket(&self, shard: u32) -> Option<Ticket> {
        if !self.uses_leases() {
            return Some(Ticket {
                shard,
                epoch: 0,
                fence: None,
            });
        }
        let l = self.held.get(&shard)?;
        (!l.draining && l.expires.saturating_duration_since(Instant::now()) > self.margin).then(
            || Ticket {
                shard,
                epoch: l.epoch,
                fence: Some(l.value.clone()),
            },
        )
    }

    pub fn enter(&self, shard: u32) -> Busy<'_> {
        let b = &self.busy[shard as usize];
        b.fetch_add(1, Ordering::SeqCst);
        Busy(b)
    }

    /// A copy of the leases held, with their shards.
    fn leases(&self) -> Vec<(u32, Lease)> {
        self.held
            .iter()
            .map(|e| (*e.key(), e.value().clone()))
            .collect()
    }

    fn is_busy(&self, shard: u32) -> bool {
        self.busy[shard as usize].load(Ordering::SeqCst) > 0
    }

    /// How many shards this instance should hold in `lease` mode, given the
    /// live members (sorted).
    pub fn quota(&self, me: &str, members: &[String]) -> usize {
        let n = members.len().max(1) as u32;
        let rank = members.iter().position(|m| m == me).unwrap_or(0) as u32;
        (self.shards / n + u32::from(rank < self.shards % n)) as usize
    }
}

/// Keeps this instance's leases: heartbeat, renew, release, acquire.
#[derive(Clone)]
pub struct LeaseKeeper {
    /// Its own connections (set once connected).
    pub redis: Option<RedisStore>,
    pub ownership: Arc<Ownership>,
    pub instance_id: String,
    pub token: String,
    pub ttl: Duration,
    pub cancel: CancellationToken,
    pub faults: Arc<crate::faults::Faults>,
    pub members: Arc<std::sync::Mutex<Vec<String>>>,
}

impl LeaseKeeper {
    /// A process-unique lease token for this instance.
    pub fn token_for(instance_id: &str) -> String {
        format!(
            "{instance_id}#{}",
            &uuid::Uuid::new_v4().simple().to_string()[..8]
        )
    }

    fn redis(&self) -> &RedisStore {
        self.redis.as_ref().expect("the keeper runs once connected")
    }

    /// Runs until the engine stops, then releases every lease and leaves.
    pub async fn run(self) {
        if !self.ownership.uses_leases() {
            // Nothing to keep; stay up until the engine stops.
            self.cancel.cancelled().await;
            return;
        }
        let every = self.ttl / 3;
        loop {
            if !self.faults.leases_paused()
                && let Err(e) = self.tick().await
            {
                tracing::warn!(error = %e, "lease round failed; retried next round");
            }
            tokio::select! {
                _ = self.cancel.cancelled() => break,
                _ = tokio::time::sleep(every) => {}
            }
        }
        self.release_all().await;
    }

    async fn tick(&self) -> Result<(), crate::clients::redis::RedisError> {
        let members = self.redis().heartbeat(&self.instance_id, self.ttl).await?;
        LeasesHeld {
            shards: self.ownership.held.len(),
            members: Some(members.len()),
        }
        .emit();
        self.members
            .lock()
            .expect("not poisoned")
            .clone_from(&members);
        let quota = self.ownership.quota(&self.instance_id, &members);
        // Renew what is held; whatever cannot be renewed is lost.
        let held = self.ownership.leases();
        for (shard, lease) in held {
            let started = Instant::now();
            match self
                .redis()
                .lease_renew(shard, &lease.value, self.ttl)
                .await
            {
                Ok(true) => {
                    if let Some(mut l) = self.ownership.held.get_mut(&shard) {
                        l.expires = started + self.ttl;
                    }
                }
                Ok(false) => {
                    self.ownership.held.remove(&shard);
                    LeaseChanged {
                        shard,
                        epoch: lease.epoch,
                        change: LeaseChange::Lost,
                    }
                    .emit();
                }
                Err(e) => tracing::warn!(shard, error = %e, "cannot renew lease"),
            }
        }

        // What to give back, and what to take.
        let mut held: Vec<u32> = self.ownership.held.iter().map(|e| *e.key()).collect();
        held.sort_unstable();
        let (surplus, wanted): (Vec<u32>, Vec<u32>) = match self.ownership.mode {
            ShardMode::Lease => {
                let surplus = held
                    .iter()
                    .rev()
                    .take(held.len().saturating_sub(quota))
                    .copied()
                    .collect();
                (surplus, Vec::new())
            }
            _ => {
                let fixed = &self.ownership.fixed;
                let surplus = held
                    .iter()
                    .filter(|s| !fixed.contains(s))
                    .copied()
                    .collect();
                let wanted = fixed
                    .iter()
                    .filter(|s| !held.contains(s))
                    .copied()
                    .collect();
                (surplus, wanted)
            }
        };

        // Surplus shards start no new page; they are released once idle.
        for mut l in self.ownership.held.iter_mut() {
            l.draining = surplus.contains(l.key());
        }
        for shard in surplus {
            if self.ownership.is_busy(shard) {
                continue; // next round; the scanner starts no new page meanwhile
            }
            let Some((_, lease)) = self.ownership.held.remove(&shard) else {
                continue;
            };
            if self.ownership.is_busy(shard) {
                // A page started in between: keep the lease for now.
                self.ownership.held.insert(shard, lease);
                continue;
            }
            if let Ok(true) = self.redis().lease_release(shard, &lease.value).await {
                LeaseChanged {
                    shard,
                    epoch: lease.epoch,
                    change: LeaseChange::Released,
                }
                .emit();
            }
        }

        // Take free shards: the fixed ones still missing, or up to the quota.
        let missing = match self.ownership.mode {
            ShardMode::Lease => quota.saturating_sub(self.ownership.held.len()),
            _ => wanted.len(),
        };
        if missing > 0 {
            let leases = self.redis().leases().await?;
            let free: Vec<u32> = match self.ownership.mode {
                ShardMode::Lease => {
                    // Start at an offset of our own so instances do not all race
                    // for the same free shards.
                    let n = self.ownership.shards;
                    let offset = crc32fast::hash(self.token.as_bytes()) % n;
                    (0..n).map(|i| (i + offset) % n).collect()
                }
                _ => wanted,
            }
            .into_iter()
            .filter(|&s| leases[s as usize].0.is_none() && !self.ownership.held.contains_key(&s))
            .collect();
            let mut taken = 0;
            for shard in free {
                if taken == missing {
                    break;
                }
                let started = Instant::now();
                if let Some(epoch) = self
                    .redis()
                    .lease_acquire(shard, &self.token, self.ttl)
                    .await?
                {
                    taken += 1;
                    LeaseChanged {
                        shard,
                        epoch,
                        change: LeaseChange::Acquired,
                    }
                    .emit();
                    self.ownership.held.insert(
                        shard,
                        Lease {
                            epoch,
                            value: format!("{}|{epoch}", self.token),
                            expires: started + self.ttl,
                            draining: false,
                        },
                    );
                }
            }
        }
        LeasesHeld {
            shards: self.ownership.held.len(),
            members: None,
        }
        .emit();
        Ok(())
    }

    /// Hands every lease back and leaves the members (a graceful stop), after
    /// the pages in flight finish (or half the TTL passes), so their flag clears
    /// are not fenced.
    async fn release_all(&self) {
        let deadline = Instant::now() + self.ttl / 2;
        while (0..self.ownership.shards).any(|s| self.ownership.is_busy(s))
            && Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let held = self.ownership.leases();
        self.ownership.held.clear();
        for (shard, lease) in held {
            let _ = self.redis().lease_release(shard, &lease.value).await;
        }
        let _ = self.redis().leave(&self.instance_id).await;
        LeasesHeld {
            shards: 0,
            members: None,
        }
        .emit();
        tracing::info!("leases released");
    }
}

/// One shard's lease as `GET /v1/shards` shows it.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
pub struct ShardInfo {
    pub shard: u32,
    /// The owning instance, `None` when the shard is free.
    pub owner: Option<String>,
    pub epoch: Option<i64>,
    pub expires_in_ms: Option<i64>,
}

/// A lease as this instance sees it.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
pub struct HeldShard {
    pub shard: u32,
    pub epoch: i64,
    /// Time left by this process's clock.
    pub left_ms: u64,
    /// Whether a new page may start (more than half the TTL left).
    pub scannable: bool,
}

/// The cluster's shard ownership, read from Redis.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct ShardsReport {
    pub instance: String,
    pub mode: String,
    pub members: Vec<String>,
    /// Shards this instance holds, with their epochs.
    pub held: Vec<HeldShard>,
    pub shards: Vec<ShardInfo>,
}

/// Parses a lease value `instance#nonce|epoch`.
pub fn parse_lease(value: &str) -> Option<(String, i64)> {
    let (token, epoch) = value.rsplit_once('|')?;
    let owner = token.rsplit_once('#').map_or(token, |(o, _)| o);
    Some((owner.to_string(), epoch.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lease_values_parse() {
        assert_eq!(
            parse_lease("node-a#1a2b3c4d|17"),
            Some(("node-a".into(), 17))
        );
        assert_eq!(parse_lease("we#ird#abc|2"), Some(("we#ird".into(), 2)));
        assert_eq!(parse_lease("garbage"), None);
    }

    /// A page starts only while the lease has more than half its TTL left, so
    /// a page (bounded well below that) ends before the lease can run out.
    #[test]
    fn a_page_starts_only_with_more_than_half_the_ttl_left() {
        let config = Config::default_config();
        let ttl = config.lease.ttl;
        let o = Ownership::new(&config);
        let hold = |left: Duration| {
            o.held.insert(
                3,
                Lease {
                    epoch: 9,
                    value: "me#1|9".into(),
                    expires: Instant::now() + left,
                    draining: false,
                },
            );
        };
        hold(ttl.mul_f64(0.6));
        let t = o.ticket(3).expect("60% of the TTL left: a page may start");
        assert_eq!((t.epoch, t.fence.as_deref()), (9, Some("me#1|9")));
        assert_eq!(o.scannable(), vec![3]);
        hold(ttl.mul_f64(0.4));
        assert!(o.ticket(3).is_none(), "40% left: no new page");
        assert!(o.scannable().is_empty());
        assert!(o.ticket(4).is_none(), "a shard not held");
    }

    #[test]
    fn quotas_add_up_and_differ_by_one_at_most() {
        let o = Ownership::new(&Config::default_config());
        for n in 1..=10 {
            let members: Vec<String> = (0..n).map(|i| format!("m{i}")).collect();
            let q: Vec<usize> = members.iter().map(|m| o.quota(m, &members)).collect();
            assert_eq!(q.iter().sum::<usize>(), 64, "{n} members");
            assert!(
                q.iter().max().unwrap() - q.iter().min().unwrap() <= 1,
                "{q:?}"
            );
        }
    }
}
