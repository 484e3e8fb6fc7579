//! The run's report: a console summary, a JSON file, SVG charts and one
//! self-contained HTML page.

use crate::{baseline::Baseline, ceilings::Ceilings, scenario::Scenario, servers::ByServer};
use datasync::telemetry::LatencySummary;
use plotters::{coord::types::RangedCoordf64, prelude::*};
use serde::Serialize;
use std::{fmt::Write as _, path::Path};

/// Rates in the throughput chart are taken over this many seconds.
const RATE_WINDOW_S: f64 = 2.0;

/// One sample of the engines' counters.
#[derive(Debug, Default, Clone, Serialize)]
pub struct Sample {
    pub t_s: f64,
    pub marked: u64,
    pub scanned: u64,
    pub published: u64,
    pub applied: u64,
    pub rss_mb: f64,
    pub cpu_percent: f64,
}

#[derive(Debug, Default, Clone, Serialize)]
pub struct PublishOnly {
    pub users: usize,
    pub seconds: f64,
    pub flags_per_s: f64,
    /// RSS with every flag pending, before the scan started.
    pub rss_before_mb: f64,
    /// Peak RSS while the flags drained.
    pub peak_rss_mb: f64,
    /// CPU time of the process (engines and the harness's polling) per flag
    /// drained: steadier than the rate when the backends share the cores.
    pub cpu_us_per_flag: f64,
    /// CPU time per flag of each server running on this machine (`redis`,
    /// `kafka`, `mongodb`) over the same drain.
    pub servers_cpu_us_per_flag: ByServer,
}

#[derive(Debug, Default, Clone, Serialize)]
pub struct Run {
    pub changes: u64,
    pub seconds: f64,
    /// Upstream changes synced per second, flag → applied.
    pub changes_per_s: f64,
    /// How long the load generator took to flag every change, and what was
    /// applied by then: on a machine the generator shares, the applier runs
    /// slower while it marks.
    pub marking: Option<Marking>,
    pub events_published: u64,
    pub events_applied: u64,
    pub stale_or_superseded: u64,
    pub already_applied_skips: u64,
    pub failures: Vec<String>,
    pub latency: LatencySummary,
    /// (upper bound ms, count) of the latency distribution.
    pub latency_buckets: Vec<(u64, u64)>,
    pub peak_rss_mb: f64,
    pub mean_cpu_percent: f64,
    /// The engines' CPU time per change, in microseconds (embedded: this
    /// whole process, driver included; external: the services').
    pub cpu_us_per_change: f64,
    /// CPU time per change of each server running on this machine
    /// (`redis`, `kafka`, `mongodb`) over the same run; empty when they run
    /// elsewhere.
    pub servers_cpu_us_per_change: ByServer,
    pub documents: u64,
    pub verified: bool,
    pub samples: Vec<Sample>,
    /// Immediate changes sent alongside the run (`immediate_rate`).
    pub immediate: Option<ImmediateRun>,
}

/// The run split at the moment the last change was flagged.
#[derive(Debug, Default, Clone, Serialize)]
pub struct Marking {
    /// From the start to the last change flagged.
    pub seconds: f64,
    /// Events applied by then.
    pub applied: u64,
}

impl Run {
    /// Events applied per second while the generator was marking, and after
    /// it was done; `None` for a phase shorter than a second.
    pub fn applied_per_s_while_and_after_marking(&self) -> Option<(f64, f64)> {
        let m = self.marking.as_ref()?;
        let after_s = self.seconds - m.seconds;
        (m.seconds >= 1.0 && after_s >= 1.0).then(|| {
            (
                m.applied as f64 / m.seconds,
                self.events_applied.saturating_sub(m.applied) as f64 / after_s,
            )
        })
    }
}

/// The immediate path measured during the run.
#[derive(Debug, Default, Clone, Serialize)]
pub struct ImmediateRun {
    pub requests: u64,
    pub failed: u64,
    /// Request → answer (after the broker's ack), measured by the harness.
    pub to_ack: LatencySummary,
    /// Request → applied in MongoDB (the engines' histograms; external mode:
    /// the worst service's quantiles).
    pub to_applied: LatencySummary,
}

#[derive(Debug, Default, Clone, Serialize)]
pub struct Report {
    pub scenario: Scenario,
    pub namespace: String,
    pub ceilings: Option<Ceilings>,
    pub baseline: Option<Baseline>,
    pub publish_only: Option<PublishOnly>,
    /// With `rate = "half_peak"`: the run at full speed that measured the
    /// peak, before the run at half of it.
    pub peak: Option<Run>,
    pub run: Run,
    pub ratios: serde_json::Map<String, serde_json::Value>,
}

impl Report {
    pub fn compute_ratios(&mut self) {
        let mut r = serde_json::Map::new();
        let mut put = |k: &str, num: f64, den: f64| {
            if den > 0.0 {
                r.insert(
                    k.into(),
                    serde_json::json!((num / den * 100.0).round() / 100.0),
                );
            }
        };
        if let Some(c) = &self.ceilings {
            put(
                "end_to_end_vs_mongo_ceiling",
                self.run.changes_per_s,
                c.mongo_bulk_upserts_per_s,
            );
            if let Some((_, after)) = self.run.applied_per_s_while_and_after_marking() {
                put(
                    "applied_after_marking_vs_mongo_ceiling",
                    after,
                    c.mongo_bulk_upserts_per_s,
                );
            }
            for (sink, ceiling) in &c.postgres_upserts_per_s {
                put(
                    &format!("end_to_end_vs_postgres_ceiling ({sink})"),
                    self.run.changes_per_s,
                    *ceiling,
                );
            }
            if let Some(p) = &self.publish_only {
                put(
                    "publish_only_vs_broker_ceiling",
                    p.flags_per_s,
                    c.kafka_produce_per_s,
                );
            }
        }
        if let Some(b) = &self.baseline {
            put(
                "end_to_end_vs_seed_loop",
                self.run.changes_per_s,
                b.end_to_end_users_per_s,
            );
            if let Some(p) = &self.publish_only {
                put(
                    "publish_only_vs_seed_producer_side",
                    p.flags_per_s,
                    b.producer_side_users_per_s,
                );
            }
        }
        self.ratios = r;
    }

    pub fn console(&self) -> String {
        let mut s = String::new();
        let r = &self.run;
        let _ = writeln!(
            s,
            "== datasync-load: {} ({})",
            self.scenario.name, self.namespace
        );
        if let Some(c) = &self.ceilings {
            let _ = writeln!(
                s,
                "ceilings      redis GET {:.0}/s | kafka produce {:.0}/s | mongo bulk upserts {:.0}/s{}",
                c.redis_get_per_s,
                c.kafka_produce_per_s,
                c.mongo_bulk_upserts_per_s,
                c.postgres_upserts_per_s
                    .iter()
                    .map(|(sink, r)| format!(" | postgres ({sink}) upserts {r:.0}/s"))
                    .collect::<String>()
            );
        }
        if let Some(b) = &self.baseline {
            let _ = writeln!(
                s,
                "seed loop     end-to-end {:.0} users/s (producer and consumer as two services; {:.0} users/s in one sequential loop) | producer side {:.0} users/s",
                b.end_to_end_users_per_s,
                b.end_to_end_sequential_users_per_s,
                b.producer_side_users_per_s
            );
        }
        if let Some(p) = &self.publish_only {
            let _ = writeln!(
                s,
                "publish only  {} flags in {:.2}s = {:.0} flags/s | {:.1} CPU-µs per flag | RSS {:.0} MB pending, peak {:.0} MB",
                p.users,
                p.seconds,
                p.flags_per_s,
                p.cpu_us_per_flag,
                p.rss_before_mb,
                p.peak_rss_mb
            );
            let _ = writeln!(
                s,
                "  servers     CPU-µs per flag: {}",
                crate::servers::summary(&p.servers_cpu_us_per_flag)
            );
        }
        if let Some(p) = &self.peak {
            let _ = writeln!(
                s,
                "peak          {} changes in {:.2}s = {:.0} changes/s (as fast as possible) | p99 {} ms; the run below is at half of it",
                p.changes, p.seconds, p.changes_per_s, p.latency.p99_ms
            );
        }
        let _ = writeln!(
            s,
            "end-to-end    {} changes in {:.2}s = {:.0} changes/s | published {} applied {} stale/superseded {}",
            r.changes,
            r.seconds,
            r.changes_per_s,
            r.events_published,
            r.events_applied,
            r.stale_or_superseded
        );
        if let (Some(m), Some((while_marking, after))) =
            (&r.marking, r.applied_per_s_while_and_after_marking())
        {
            let _ = writeln!(
                s,
                "  phases      all flagged after {:.1}s, {} applied by then ({:.0}/s) | the rest in {:.1}s ({:.0}/s)",
                m.seconds,
                m.applied,
                while_marking,
                r.seconds - m.seconds,
                after
            );
        }
        let _ = writeln!(
            s,
            "latency       flag→applied p50 {} ms | p95 {} ms | p99 {} ms | max {} ms ({} samples)",
            r.latency.p50_ms, r.latency.p95_ms, r.latency.p99_ms, r.latency.max_ms, r.latency.count
        );
        if let Some(i) = &r.immediate {
            let _ = writeln!(
                s,
                "immediate     {} requests ({} failed) | to broker ack p50 {} ms, p99 {} ms, max {} ms | to applied p50 {} ms, p99 {} ms",
                i.requests,
                i.failed,
                i.to_ack.p50_ms,
                i.to_ack.p99_ms,
                i.to_ack.max_ms,
                i.to_applied.p50_ms,
                i.to_applied.p99_ms
            );
        }
        let _ = writeln!(
            s,
            "process       peak RSS {:.0} MB | mean CPU {:.0}% | {:.0} CPU-µs per change",
            r.peak_rss_mb, r.mean_cpu_percent, r.cpu_us_per_change
        );
        let _ = writeln!(
            s,
            "servers       CPU-µs per change: {}",
            crate::servers::summary(&r.servers_cpu_us_per_change)
        );
        let _ = writeln!(
            s,
            "verified      {} documents, every user at its last change: {}",
            r.documents,
            if r.verified { "yes" } else { "NO" }
        );
        for (k, v) in &self.ratios {
            let _ = writeln!(s, "ratio         {k} = {v}");
        }
        if !r.failures.is_empty() {
            let _ = writeln!(s, "failures      {}", r.failures.join("; "));
        }
        s
    }

    pub fn write(&self, dir: &Path) -> anyhow::Result<()> {
        std::fs::create_dir_all(dir)?;
        std::fs::write(dir.join("report.json"), serde_json::to_string_pretty(self)?)?;
        let throughput = self.throughput_svg()?;
        let latency = self.latency_svg()?;
        std::fs::write(dir.join("throughput.svg"), &throughput)?;
        std::fs::write(dir.join("latency.svg"), &latency)?;
        let html = html_page(
            &format!("datasync-load: {}", self.scenario.name),
            &self.console(),
            &format!(
                "<h2>Throughput over time</h2>{throughput}<h2>Flag → applied latency</h2>{latency}"
            ),
            &self.scenario,
        );
        std::fs::write(dir.join("report.html"), html)?;
        Ok(())
    }

    fn throughput_svg(&self) -> anyhow::Result<String> {
        let mut out = String::new();
        {
            let root = SVGBackend::with_string(&mut out, (900, 400)).into_drawing_area();
            root.fill(&WHITE)?;
            let s = &self.run.samples;
            // Counters move in steps (a page, a window), so a rate between two
            // samples half a second apart aliases into a sawtooth: each point
            // is the rate over the last RATE_WINDOW_S seconds instead.
            let rates = |f: fn(&Sample) -> u64| {
                let points: Vec<(f64, u64)> = s.iter().map(|x| (x.t_s, f(x))).collect();
                windowed_rates(&points, RATE_WINDOW_S)
            };
            let series = [
                ("marked/s", rates(|x| x.marked), BLUE),
                ("published/s", rates(|x| x.published), GREEN),
                ("applied/s", rates(|x| x.applied), RED),
            ];
            let max_t = s.last().map(|x| x.t_s).unwrap_or(1.0).max(1.0);
            let max_y = series
                .iter()
                .flat_map(|(_, v, _)| v.iter().map(|p| p.1))
                .fold(1.0, f64::max)
                * 1.1;
            let mut chart = rate_chart(
                &root,
                format!(
                    "Throughput over time ({}; rates over {RATE_WINDOW_S:.0} s)",
                    self.scenario.name
                ),
                max_t,
                max_y,
            )?;
            draw_lines(&mut chart, series)?;
            draw_legend(&mut chart)?;
            root.present()?;
        }
        Ok(out)
    }

    fn latency_svg(&self) -> anyhow::Result<String> {
        let mut out = String::new();
        {
            let root = SVGBackend::with_string(&mut out, (900, 400)).into_drawing_area();
            root.fill(&WHITE)?;
            let b = &self.run.latency_buckets;
            let max_x = b.last().map(|x| x.0).unwrap_or(1).max(1) as f64;
            let max_y = b.iter().map(|x| x.1).max().unwrap_or(1).max(1) as f64 * 1.1;
            let l = &self.run.latency;
            let mut chart = ChartBuilder::on(&root)
                .caption(
                    format!(
                        "Flag → applied latency ({}; {} changes)",
                        self.scenario.name, l.count
                    ),
                    ("sans-serif", 18),
                )
                .margin(10)
                .x_label_area_size(35)
                .y_label_area_size(70)
                .build_cartesian_2d(0.0..max_x, 0.0..max_y)?;
            chart
                .configure_mesh()
                .x_desc("flag → applied (ms)")
                .y_desc("changes")
                .draw()?;
            chart.draw_series(LineSeries::new(
                b.iter().map(|&(x, y)| (x as f64, y as f64)),
                RED.stroke_width(2),
            ))?;
            // The percentiles, as vertical markers with their values.
            for (name, ms, color) in [
                ("p50", l.p50_ms, BLUE),
                ("p95", l.p95_ms, GREEN),
                ("p99", l.p99_ms, BLACK),
            ] {
                let x = (ms as f64).min(max_x);
                chart
                    .draw_series(LineSeries::new(
                        [(x, 0.0), (x, max_y * 0.9)],
                        color.stroke_width(1),
                    ))?
                    .label(format!("{name} {ms} ms"))
                    .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
            }
            draw_legend(&mut chart)?;
            root.present()?;
        }
        Ok(out)
    }
}

/// Rates per second of a counter sampled as `(seconds, value)`. Counters move
/// in steps (a page, a window), so a rate between two close samples aliases
/// into a sawtooth: each point is the rate over the last `window_s` instead.
pub fn windowed_rates(points: &[(f64, u64)], window_s: f64) -> Vec<(f64, f64)> {
    let mut from = 0;
    (1..points.len())
        .map(|i| {
            let (t, v) = points[i];
            while from + 1 < i && t - points[from + 1].0 >= window_s {
                from += 1;
            }
            let dt = (t - points[from].0).max(1e-3);
            (t, v.saturating_sub(points[from].1) as f64 / dt)
        })
        .collect()
}

/// A captioned chart of changes per second against seconds, mesh drawn.
pub fn rate_chart<'a, 'b>(
    root: &'b DrawingArea<SVGBackend<'a>, plotters::coord::Shift>,
    caption: String,
    max_t: f64,
    max_y: f64,
) -> anyhow::Result<ChartContext<'a, SVGBackend<'a>, Cartesian2d<RangedCoordf64, RangedCoordf64>>> {
    let mut chart = ChartBuilder::on(root)
        .caption(caption, ("sans-serif", 18))
        .margin(10)
        .x_label_area_size(35)
        .y_label_area_size(70)
        .build_cartesian_2d(0.0..max_t, 0.0..max_y)?;
    chart
        .configure_mesh()
        .x_desc("seconds")
        .y_desc("changes per second")
        .draw()?;
    Ok(chart)
}

/// Labelled lines of `(seconds, rate)` points, as every rate chart draws them.
pub fn draw_lines<'a, const N: usize>(
    chart: &mut ChartContext<'a, SVGBackend<'a>, Cartesian2d<RangedCoordf64, RangedCoordf64>>,
    series: [(&'static str, Vec<(f64, f64)>, RGBColor); N],
) -> anyhow::Result<()> {
    for (name, points, color) in series {
        chart
            .draw_series(LineSeries::new(points, color.stroke_width(2)))?
            .label(name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
    }
    Ok(())
}

/// The legend box of a chart, the same on every chart of the report.
pub fn draw_legend<'a, DB: DrawingBackend + 'a>(
    chart: &mut ChartContext<'a, DB, Cartesian2d<RangedCoordf64, RangedCoordf64>>,
) -> anyhow::Result<()>
where
    DB::ErrorType: 'static,
{
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|e| anyhow::anyhow!("chart legend: {e}"))?;
    Ok(())
}

/// A self-contained report page: the console summary, the sections (HTML),
/// then the scenario.
pub fn html_page(title: &str, summary: &str, sections: &str, scenario: &Scenario) -> String {
    format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>{title}</title>\
         <style>body{{font-family:sans-serif;margin:2em}}pre{{background:#f4f4f4;padding:1em}}\
         td,th{{padding:2px 8px;text-align:right}}</style></head>\
         <body><h1>{title}</h1><pre>{summary}</pre>{sections}\
         <h2>Scenario</h2><pre>{scenario}</pre></body></html>",
        title = html_escape(title),
        summary = html_escape(summary),
        scenario = html_escape(&toml::to_string_pretty(scenario).unwrap_or_default()),
    )
}

pub fn html_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(seconds: f64, applied: u64, marking: Option<(f64, u64)>) -> Run {
        Run {
            seconds,
            events_applied: applied,
            marking: marking.map(|(seconds, applied)| Marking { seconds, applied }),
            ..Run::default()
        }
    }

    #[test]
    fn a_run_splits_at_its_last_flag_into_the_rates_while_and_after_marking() {
        let r = run(30.0, 200_000, Some((10.0, 20_000)));
        assert_eq!(
            r.applied_per_s_while_and_after_marking(),
            Some((2_000.0, 9_000.0))
        );
    }

    #[test]
    fn a_phase_shorter_than_a_second_gives_no_split_and_no_ratio() {
        let ceilings = Ceilings {
            mongo_bulk_upserts_per_s: 10_000.0,
            ..Ceilings::default()
        };
        for r in [
            run(30.0, 200_000, Some((29.5, 190_000))),
            run(30.0, 200_000, Some((0.5, 0))),
            run(30.0, 200_000, None),
        ] {
            assert_eq!(r.applied_per_s_while_and_after_marking(), None);
            let mut report = Report {
                ceilings: Some(ceilings.clone()),
                run: r,
                ..Report::default()
            };
            report.compute_ratios();
            assert!(report.ratios.contains_key("end_to_end_vs_mongo_ceiling"));
            assert!(
                !report
                    .ratios
                    .contains_key("applied_after_marking_vs_mongo_ceiling")
            );
        }
        let mut report = Report {
            ceilings: Some(ceilings),
            run: run(30.0, 200_000, Some((10.0, 20_000))),
            ..Report::default()
        };
        report.compute_ratios();
        assert_eq!(
            report.ratios["applied_after_marking_vs_mongo_ceiling"],
            serde_json::json!(0.9)
        );
    }
}
