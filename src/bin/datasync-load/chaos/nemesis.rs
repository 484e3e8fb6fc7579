//! The nemesis: a fault schedule drawn from the scenario's seed, and the
//! faults themselves. One fault at a time, so each recovery is its own.

use super::processes::{Proc, Servers, wait_port};
use crate::scenario::Chaos;
use rand::{Rng, SeedableRng, rngs::StdRng, seq::SliceRandom};
use serde::Serialize;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FaultKind {
    /// SIGKILL a service, start it again at the fault's end.
    Kill,
    /// SIGSTOP a service past its lease TTL, then SIGCONT: it wakes up
    /// believing it still owns its shards.
    Zombie,
    /// SIGKILL Redis (append-only file, fsync always), start it again.
    RedisRestart,
    /// Stop the MongoDB-wire server (SIGTERM), start it again on its data.
    MongoRestart,
    /// SIGSTOP the broker, then SIGCONT: the local broker keeps its log in
    /// memory only, so it cannot restart with its data; a paused broker is
    /// what clients see of a broker that is away (connections hang).
    BrokerPause,
}

impl FaultKind {
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "kill" => FaultKind::Kill,
            "zombie" => FaultKind::Zombie,
            "redis_restart" => FaultKind::RedisRestart,
            "mongo_restart" => FaultKind::MongoRestart,
            "broker_pause" => FaultKind::BrokerPause,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            FaultKind::Kill => "kill",
            FaultKind::Zombie => "zombie",
            FaultKind::RedisRestart => "redis_restart",
            FaultKind::MongoRestart => "mongo_restart",
            FaultKind::BrokerPause => "broker_pause",
        }
    }
}

/// One fault: planned from the seed, then what happened.
#[derive(Debug, Clone, Serialize)]
pub struct Fault {
    pub kind: FaultKind,
    /// The service it hits (kill, zombie).
    pub instance: Option<usize>,
    pub planned_at_s: f64,
    pub planned_secs: f64,
    /// When it began and when it was over (the process back, or resumed),
    /// seconds from the soak's start.
    pub start_s: Option<f64>,
    pub end_s: Option<f64>,
    /// From its end until every change acknowledged before its end was
    /// applied; `None` if that never happened.
    pub recovery_s: Option<f64>,
    pub error: Option<String>,
}

/// The schedule: `faults_per_kind` of each kind in a shuffled order, spread
/// over the soak between its quiet start and end. The same seed gives the
/// same schedule.
pub fn schedule(c: &Chaos, seed: u64, soak_secs: f64, instances: usize) -> Vec<Fault> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut kinds: Vec<FaultKind> = c
        .kinds
        .iter()
        .filter_map(|k| FaultKind::parse(k))
        .flat_map(|k| std::iter::repeat_n(k, c.faults_per_kind))
        .collect();
    kinds.shuffle(&mut rng);
    let window = (soak_secs - 2.0 * c.quiet_secs).max(1.0);
    let slot = window / kinds.len().max(1) as f64;
    kinds
        .into_iter()
        .enumerate()
        .map(|(i, kind)| {
            let secs = match kind {
                FaultKind::Zombie => c.lease_ttl_secs * 1.5 + rng.random_range(0.0..1.0),
                _ => rng.random_range(c.min_fault_secs..=c.max_fault_secs),
            }
            .min(slot * 0.8)
            .max(0.2);
            Fault {
                kind,
                instance: matches!(kind, FaultKind::Kill | FaultKind::Zombie)
                    .then(|| rng.random_range(0..instances)),
                planned_at_s: c.quiet_secs + i as f64 * slot + rng.random_range(0.0..slot * 0.1),
                planned_secs: secs,
                start_s: None,
                end_s: None,
                recovery_s: None,
                error: None,
            }
        })
        .collect()
}

/// Injects one fault, holds it, and heals it.
pub async fn inject(
    f: &mut Fault,
    servers: &mut Servers,
    services: &mut [Proc],
    t0: Instant,
) -> anyhow::Result<()> {
    let hold = Duration::from_secs_f64(f.planned_secs);
    f.start_s = Some(t0.elapsed().as_secs_f64());
    match f.kind {
        FaultKind::Kill => {
            let p = &mut services[f.instance.unwrap_or(0)];
            p.kill();
            tokio::time::sleep(hold).await;
            p.start()?;
        }
        FaultKind::Zombie => {
            let p = &services[f.instance.unwrap_or(0)];
            p.signal("STOP")?;
            tokio::time::sleep(hold).await;
            p.signal("CONT")?;
        }
        FaultKind::RedisRestart => {
            servers.redis.kill();
            tokio::time::sleep(hold).await;
            servers.redis.start()?;
            wait_port(servers.redis_port, "redis", Duration::from_secs(30)).await?;
        }
        FaultKind::MongoRestart => {
            servers.mongo.terminate(Duration::from_secs(10)).await;
            tokio::time::sleep(hold).await;
            servers.mongo.start()?;
            wait_port(
                servers.mongo_port,
                "the MongoDB-wire server",
                Duration::from_secs(90),
            )
            .await?;
        }
        FaultKind::BrokerPause => {
            servers.broker.signal("STOP")?;
            tokio::time::sleep(hold).await;
            servers.broker.signal("CONT")?;
        }
    }
    f.end_s = Some(t0.elapsed().as_secs_f64());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chaos() -> Chaos {
        toml::from_str("faults_per_kind = 4").unwrap()
    }

    fn plan(seed: u64) -> Vec<(FaultKind, Option<usize>, u64, u64)> {
        schedule(&chaos(), seed, 300.0, 3)
            .into_iter()
            .map(|f| {
                let ms = |s: f64| (s * 1000.0) as u64;
                (f.kind, f.instance, ms(f.planned_at_s), ms(f.planned_secs))
            })
            .collect()
    }

    #[test]
    fn the_same_seed_gives_the_same_schedule() {
        assert_eq!(plan(7), plan(7));
        assert_ne!(plan(7), plan(8));
    }

    #[test]
    fn the_schedule_has_every_kind_in_order_inside_the_quiet_edges() {
        let c = chaos();
        let faults = schedule(&c, 1, 300.0, 3);
        assert_eq!(faults.len(), 20);
        for kind in c.kinds.iter().map(|k| FaultKind::parse(k).unwrap()) {
            assert_eq!(faults.iter().filter(|f| f.kind == kind).count(), 4);
        }
        for w in faults.windows(2) {
            // One at a time: each ends before the next begins.
            assert!(w[0].planned_at_s + w[0].planned_secs < w[1].planned_at_s);
        }
        assert!(faults[0].planned_at_s >= c.quiet_secs);
        let last = faults.last().unwrap();
        assert!(last.planned_at_s + last.planned_secs <= 300.0 - c.quiet_secs);
        // A zombie outlives its lease.
        for z in faults.iter().filter(|f| f.kind == FaultKind::Zombie) {
            assert!(z.planned_secs > c.lease_ttl_secs);
        }
    }
}
