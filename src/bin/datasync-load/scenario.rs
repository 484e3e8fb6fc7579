//! Load scenarios: TOML files under `config/load/`.

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};
use std::path::Path;

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    /// Name used in resource names and report files.
    pub name: String,
    /// Seed of every random choice, so a run can be repeated.
    pub seed: u64,
    /// Distinct users.
    pub users: usize,
    /// Each round changes every user once, in a seeded random order.
    #[serde(default = "one")]
    pub rounds: usize,
    /// With `rate`: run for about this long instead of a fixed number of rounds
    /// (rounds = rate × duration / users, at least one).
    #[serde(default)]
    pub duration_secs: Option<u64>,
    /// Target changes per second; 0 = as fast as the engine takes them;
    /// `"half_peak"` = measure the peak first in the same run (one round as
    /// fast as possible), then run at half of it.
    #[serde(default)]
    pub rate: Rate,
    /// Approximate size of each profile's JSON.
    #[serde(default = "default_profile_bytes")]
    pub profile_bytes: usize,
    /// Share of changes flagged through the seed's legacy `SADD` set.
    #[serde(default)]
    pub legacy_share: f64,
    /// Immediate (static) changes per second sent alongside the dynamic run,
    /// through the immediate path; 0 sends none.
    #[serde(default)]
    pub immediate_rate: u64,
    /// Engine instances (embedded: in this process, shards split with the fixed mode).
    #[serde(default = "one")]
    pub instances: u32,
    /// `embedded` (engines in this process) or `external`.
    #[serde(default = "default_mode")]
    pub mode: String,
    /// Users of the publish-only phase (flags → Kafka ack → flags cleared, no
    /// applier); 0 skips the phase.
    #[serde(default)]
    pub publish_only_users: usize,
    /// Users the seed baseline loop processes (it is slow); 0 skips it.
    #[serde(default = "default_baseline")]
    pub baseline_users: usize,
    /// Operations of each raw ceiling measurement; 0 skips them.
    #[serde(default = "default_ceiling")]
    pub ceiling_ops: usize,
    /// Give up waiting for the run to drain after this many seconds.
    #[serde(default = "default_timeout")]
    pub timeout_secs: u64,
    /// Engine config overrides, as in a `--config` file. In external mode they
    /// must describe the running processes' keys, topics and collection.
    #[serde(default)]
    pub engine: toml::Table,
    /// With `mode = "external"`: the running services to drive.
    #[serde(default)]
    pub external: Option<External>,
    /// The chaos soak's settings (mode "chaos").
    #[serde(default)]
    pub chaos: Option<Chaos>,
    /// The scale sweep's settings (mode "sweep").
    #[serde(default)]
    pub sweep: Option<Sweep>,
}

/// The scale sweep (mode "sweep"): for each step, that many users flagged,
/// then drained by one `datasync run` service whose memory and CPU time are
/// sampled.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Sweep {
    /// Users of each step, e.g. `[10000, 100000, 1000000]`.
    pub steps: Vec<usize>,
    /// End to end (true) or the publish stage alone (false).
    #[serde(default = "yes")]
    pub applier: bool,
}

fn yes() -> bool {
    true
}

/// The chaos soak (mode "chaos"): `instances` services of the harness's own,
/// on servers of its own, under a steady workload of `rate` changes per
/// second for `duration_secs`, while a nemesis injects faults on a schedule
/// drawn from `seed`. `timeout_secs` bounds the drain after the soak.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Chaos {
    /// Faults of each kind in the soak.
    #[serde(default = "default_faults_per_kind")]
    pub faults_per_kind: usize,
    /// Which kinds: kill, zombie, redis_restart, mongo_restart, broker_pause.
    #[serde(default = "default_kinds")]
    pub kinds: Vec<String>,
    /// Seconds without faults at the start and at the end of the soak.
    #[serde(default = "default_quiet")]
    pub quiet_secs: f64,
    /// How long a fault lasts, drawn between these (a zombie always outlives
    /// its lease).
    #[serde(default = "default_min_fault")]
    pub min_fault_secs: f64,
    #[serde(default = "default_max_fault")]
    pub max_fault_secs: f64,
    /// Deletes per second, of users written before.
    #[serde(default = "default_delete_rate")]
    pub delete_rate: f64,
    /// The services' lease TTL.
    #[serde(default = "default_lease_ttl")]
    pub lease_ttl_secs: f64,
}

fn default_faults_per_kind() -> usize {
    20
}
fn default_kinds() -> Vec<String> {
    [
        "kill",
        "zombie",
        "redis_restart",
        "mongo_restart",
        "broker_pause",
    ]
    .map(String::from)
    .to_vec()
}
fn default_quiet() -> f64 {
    10.0
}
fn default_min_fault() -> f64 {
    1.0
}
fn default_max_fault() -> f64 {
    5.0
}
fn default_delete_rate() -> f64 {
    0.5
}
fn default_lease_ttl() -> f64 {
    3.0
}

/// A scenario's target rate.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum Rate {
    /// As fast as the engine takes changes.
    #[default]
    Max,
    /// Changes per second.
    Fixed(u64),
    /// Half of the peak measured first in the same run.
    HalfPeak,
}

impl Rate {
    /// Changes per second, 0 for as fast as possible (a `HalfPeak` is
    /// resolved to a fixed rate before the run).
    pub fn per_s(self) -> u64 {
        match self {
            Rate::Fixed(r) => r,
            Rate::Max | Rate::HalfPeak => 0,
        }
    }
}

impl<'de> Deserialize<'de> for Rate {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Number(u64),
            Name(String),
        }
        match Raw::deserialize(d)? {
            Raw::Number(0) => Ok(Rate::Max),
            Raw::Number(n) => Ok(Rate::Fixed(n)),
            Raw::Name(s) if s == "half_peak" => Ok(Rate::HalfPeak),
            Raw::Name(s) => Err(serde::de::Error::custom(format!(
                "rate: `{s}` is neither a number of changes per second nor \"half_peak\""
            ))),
        }
    }
}

impl Serialize for Rate {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Rate::Max => s.serialize_u64(0),
            Rate::Fixed(n) => s.serialize_u64(*n),
            Rate::HalfPeak => s.serialize_str("half_peak"),
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct External {
    /// Base URLs of the running `datasync` services' HTTP APIs; changes are
    /// spread over them round-robin and their `/v1/stats` are summed.
    pub apis: Vec<String>,
}

fn one<T: From<u8>>() -> T {
    T::from(1)
}
fn default_profile_bytes() -> usize {
    256
}
fn default_mode() -> String {
    "embedded".into()
}
fn default_baseline() -> usize {
    1000
}
fn default_ceiling() -> usize {
    20_000
}
fn default_timeout() -> u64 {
    1800
}

impl Scenario {
    pub fn load(path: &Path) -> anyhow::Result<Scenario> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let mut s: Scenario =
            toml::from_str(&text).with_context(|| format!("scenario {}", path.display()))?;
        s.validate()?;
        s.resolve_rounds();
        Ok(s)
    }

    /// With a fixed rate and a duration, the rounds that last about that long.
    pub fn resolve_rounds(&mut self) {
        if let (Some(d), Rate::Fixed(r)) = (self.duration_secs, self.rate) {
            self.rounds = ((r * d) as usize / self.users).max(1);
        }
    }

    fn validate(&self) -> anyhow::Result<()> {
        let mut problems = Vec::new();
        if self.users == 0 {
            problems.push("users: must be at least 1");
        }
        if self.duration_secs.is_some() && self.rate == Rate::Max {
            problems.push(
                "duration_secs: needs a rate above 0 (as fast as possible has no fixed duration)",
            );
        }
        if self.rounds == 0 {
            problems.push("rounds: must be at least 1");
        }
        if !(0.0..=1.0).contains(&self.legacy_share) {
            problems.push("legacy_share: must be between 0 and 1");
        }
        if self.instances == 0 {
            problems.push("instances: must be at least 1");
        }
        match self.mode.as_str() {
            "embedded" => {}
            "external" => {
                if self.external.as_ref().is_none_or(|e| e.apis.is_empty()) {
                    problems.push("external.apis: external mode needs at least one API URL");
                }
                if self.publish_only_users > 0 {
                    problems.push(
                        "publish_only_users: the publish-only phase starts its own engines; use 0 in external mode",
                    );
                }
            }
            "chaos" => {
                match &self.chaos {
                    None => problems.push("chaos: chaos mode needs a [chaos] table"),
                    Some(c) => {
                        if self.duration_secs.is_none() || self.rate.per_s() == 0 {
                            problems.push("duration_secs, rate: chaos mode needs a soak length and a fixed rate");
                        }
                        if let Some(k) = c.kinds.iter().find(|k| !default_kinds().contains(k)) {
                            problems.push(if k.is_empty() { "chaos.kinds: an empty kind" } else {
                            "chaos.kinds: each must be kill, zombie, redis_restart, mongo_restart or broker_pause"
                        });
                        }
                        if !(0.0 < c.min_fault_secs && c.min_fault_secs <= c.max_fault_secs) {
                            problems.push(
                                "chaos.min_fault_secs: must be above 0 and at most max_fault_secs",
                            );
                        }
                        if c.lease_ttl_secs < 1.0 {
                            problems.push("chaos.lease_ttl_secs: must be at least 1");
                        }
                    }
                }
            }
            "sweep" => {
                if self
                    .sweep
                    .as_ref()
                    .is_none_or(|s| s.steps.is_empty() || s.steps.contains(&0))
                {
                    problems.push("sweep.steps: sweep mode needs a [sweep] table with steps of at least 1 user");
                }
            }
            _ => problems.push("mode: must be \"embedded\", \"external\", \"chaos\" or \"sweep\""),
        }
        if !problems.is_empty() {
            bail!(
                "invalid scenario `{}`:\n  - {}",
                self.name,
                problems.join("\n  - ")
            );
        }
        Ok(())
    }
}
