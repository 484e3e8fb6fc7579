//! What a run drives: engines in this process (embedded), or running
//! `datasync` services over HTTP (external), behind one interface.

use anyhow::{Context, bail};
use datasync::{
    Engine, ProfileWrite,
    telemetry::{Latency, LatencySummary, ProcessUsage, StatsSnapshot},
};
use std::time::{Duration, Instant};

/// What the run drives: engines in this process, or running services over HTTP.
pub enum Target {
    Embedded(Vec<Engine>),
    External {
        http: reqwest::Client,
        apis: Vec<String>,
    },
}

/// What a target reports at one moment.
pub struct Observed {
    pub stats: StatsSnapshot,
    pub rss_mb: f64,
    pub cpu_seconds: f64,
    /// Events the slowest sink has consumed (applied, stale or
    /// dead-lettered), summed over the engines; `None` in external mode,
    /// where the primary sink's counters stand for all.
    pub slowest_sink: Option<u64>,
}

impl Target {
    pub async fn mark(&self, batch_no: usize, users: Vec<ProfileWrite>) -> anyhow::Result<()> {
        match self {
            Target::Embedded(engines) => {
                engines[0].write_and_mark(&users).await?;
            }
            Target::External { http, apis } => {
                let body = serde_json::json!({ "users": users.iter().map(|u| serde_json::json!({
                    "user_id": u.user_id, "profile": u.profile })).collect::<Vec<_>>() });
                let api = &apis[batch_no % apis.len()];
                let resp = http
                    .post(format!("{api}/v1/sync/dirty"))
                    .json(&body)
                    .send()
                    .await?;
                if !resp.status().is_success() {
                    bail!(
                        "{api}: {} {}",
                        resp.status(),
                        resp.text().await.unwrap_or_default()
                    );
                }
            }
        }
        Ok(())
    }

    /// Sends one immediate change; the time to the answer (broker ack).
    pub async fn immediate(
        &self,
        n: usize,
        user_id: String,
        profile: serde_json::Value,
    ) -> anyhow::Result<Duration> {
        let t = Instant::now();
        match self {
            Target::Embedded(engines) => {
                engines[n % engines.len()]
                    .sync_immediate(&user_id, profile)
                    .await?;
            }
            Target::External { http, apis } => {
                let api = &apis[n % apis.len()];
                http.post(format!("{api}/v1/sync/immediate"))
                    .json(&serde_json::json!({ "user_id": user_id, "profile": profile }))
                    .send()
                    .await?
                    .error_for_status()?;
            }
        }
        Ok(t.elapsed())
    }

    /// Request → applied latency of immediate changes.
    pub async fn immediate_applied(&self) -> anyhow::Result<LatencySummary> {
        match self {
            Target::Embedded(engines) => {
                let mut h = hdrhistogram::Histogram::<u64>::new_with_bounds(1, 3_600_000, 3)?;
                for e in engines {
                    h.add(e.immediate_latency_histograms().1)?;
                }
                Ok(Latency::summarize(&h))
            }
            Target::External { http, apis } => Ok(Latency::summarize(
                &merged_histogram(http, apis, "immediate_to_applied").await?,
            )),
        }
    }

    pub async fn observe(&self) -> anyhow::Result<Observed> {
        let mut o = Observed {
            stats: StatsSnapshot::default(),
            rss_mb: 0.0,
            cpu_seconds: 0.0,
            slowest_sink: None,
        };
        match self {
            Target::Embedded(engines) => {
                let mut per_sink: std::collections::BTreeMap<String, u64> = Default::default();
                for e in engines {
                    o.stats += e.stats();
                    for s in e.sinks() {
                        *per_sink.entry(s.name).or_default() +=
                            s.applied + s.stale + s.dead_lettered;
                    }
                }
                o.slowest_sink = per_sink.into_values().min();
                let p = datasync::telemetry::process_usage();
                (o.rss_mb, o.cpu_seconds) = (p.rss_mb, p.cpu_seconds);
            }
            Target::External { http, apis } => {
                for api in apis {
                    let v = service_stats(http, api).await?;
                    o.stats += serde_json::from_value::<StatsSnapshot>(v["engine"].clone())?;
                    let p: ProcessUsage = serde_json::from_value(v["process"].clone())?;
                    o.rss_mb += p.rss_mb;
                    o.cpu_seconds += p.cpu_seconds;
                }
            }
        }
        Ok(o)
    }

    /// The flag → applied latency histogram, merged over the engines or the
    /// services (which give theirs encoded in `/v1/stats`).
    pub async fn latency(
        &self,
    ) -> anyhow::Result<(Option<hdrhistogram::Histogram<u64>>, LatencySummary)> {
        match self {
            Target::Embedded(engines) => {
                let mut h = hdrhistogram::Histogram::<u64>::new_with_bounds(1, 3_600_000, 3)?;
                for e in engines {
                    h.add(e.latency_histogram())?;
                }
                let s = Latency::summarize(&h);
                Ok((Some(h), s))
            }
            Target::External { http, apis } => {
                let h = merged_histogram(http, apis, "latency").await?;
                let s = Latency::summarize(&h);
                Ok((Some(h), s))
            }
        }
    }

    pub async fn stop(&self) {
        if let Target::Embedded(engines) = self {
            for e in engines {
                e.shutdown(Duration::from_secs(30)).await;
            }
        }
    }
}

/// The services' histograms under `histograms.<name>` in `/v1/stats`,
/// merged, so the quantiles are those of every change together.
async fn merged_histogram(
    http: &reqwest::Client,
    apis: &[String],
    name: &str,
) -> anyhow::Result<hdrhistogram::Histogram<u64>> {
    let mut h = hdrhistogram::Histogram::<u64>::new_with_bounds(1, 3_600_000, 3)?;
    for api in apis {
        let v = service_stats(http, api).await?;
        let encoded = v["histograms"][name]
            .as_str()
            .with_context(|| format!("{api}/v1/stats has no histograms.{name}"))?;
        h.add(Latency::decode(encoded)?)?;
    }
    Ok(h)
}

/// A running service's `GET /v1/stats`.
async fn service_stats(http: &reqwest::Client, api: &str) -> anyhow::Result<serde_json::Value> {
    Ok(http
        .get(format!("{api}/v1/stats"))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?)
}

/// Waits up to two minutes for a service's `/health/ready`.
pub async fn wait_ready(http: &reqwest::Client, api: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        match http.get(format!("{api}/health/ready")).send().await {
            Ok(r) if r.status().is_success() => return Ok(()),
            _ if Instant::now() > deadline => bail!("{api} did not become ready within 120s"),
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}
