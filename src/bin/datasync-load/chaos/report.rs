//! The chaos soak's report: console, `report.json`, and `report.html` with
//! the throughput chart (faults shaded) and the fault log.

use super::{
    Leftovers,
    checker::{EndState, Point, Violations},
    nemesis::{Fault, FaultKind},
    workload::Counts,
};
use crate::{
    report::{draw_legend, draw_lines, html_page, rate_chart, windowed_rates},
    scenario::Scenario,
};
use plotters::prelude::*;
use serde::Serialize;
use std::{fmt::Write, path::Path};

#[derive(Debug, Serialize)]
pub struct ChaosReport {
    pub scenario: Scenario,
    pub namespace: String,
    pub soak_secs: f64,
    pub drain_secs: f64,
    /// Whether everything acknowledged was applied and nothing was left in
    /// Redis before the drain's timeout.
    pub drained: bool,
    pub faults: Vec<Fault>,
    pub counts: Counts,
    /// Versions seen going down during the soak.
    pub regressions: Violations,
    pub end_state: EndState,
    /// What is left in Redis after the drain.
    pub left: Leftovers,
    /// Samples the MongoDB-wire server did not answer (during its restarts).
    pub failed_samples: u64,
    pub points: Vec<Point>,
}

const KINDS: [(FaultKind, RGBColor); 5] = [
    (FaultKind::Kill, RGBColor(230, 85, 13)),
    (FaultKind::Zombie, RGBColor(117, 107, 177)),
    (FaultKind::RedisRestart, RGBColor(222, 45, 38)),
    (FaultKind::MongoRestart, RGBColor(49, 163, 84)),
    (FaultKind::BrokerPause, RGBColor(49, 130, 189)),
];

impl ChaosReport {
    pub fn ok(&self) -> bool {
        self.regressions.count == 0
            && self.end_state.ok()
            && self.left.clean()
            && self.faults.iter().all(|f| f.error.is_none())
    }

    pub fn console(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "chaos soak `{}`, seed {}: {:.0}s under faults, drained in {:.1}s{}",
            self.scenario.name,
            self.scenario.seed,
            self.soak_secs,
            self.drain_secs,
            if self.drained { "" } else { " (timed out)" }
        );
        let _ = writeln!(
            s,
            "changes       {} acknowledged, {} indeterminate; deletes {} acknowledged, {} indeterminate",
            self.counts.acked,
            self.counts.indeterminate,
            self.counts.deletes_acked,
            self.counts.deletes_indeterminate
        );
        let _ = writeln!(
            s,
            "faults        kind            count  recovery s (median / max)"
        );
        for (kind, _) in KINDS {
            let of: Vec<&Fault> = self.faults.iter().filter(|f| f.kind == kind).collect();
            if of.is_empty() {
                continue;
            }
            let mut r: Vec<f64> = of.iter().filter_map(|f| f.recovery_s).collect();
            r.sort_by(f64::total_cmp);
            let unrecovered = of.len() - r.len();
            let _ = writeln!(
                s,
                "              {:<15} {:>5}  {} / {}{}",
                kind.name(),
                of.len(),
                r.get(r.len() / 2).map_or("-".into(), |v| format!("{v:.1}")),
                r.last().map_or("-".into(), |v| format!("{v:.1}")),
                if unrecovered > 0 {
                    format!("  ({unrecovered} never recovered)")
                } else {
                    String::new()
                }
            );
        }
        for f in self.faults.iter().filter(|f| f.error.is_some()) {
            let _ = writeln!(
                s,
                "fault error   {}: {}",
                f.kind.name(),
                f.error.as_deref().unwrap_or_default()
            );
        }
        let mut line = |name: &str, v: &Violations| {
            let _ = writeln!(s, "{name:<15} {}", v.count);
            for e in &v.examples {
                let _ = writeln!(s, "                {e}");
            }
        };
        line("regressions", &self.regressions);
        line("lost", &self.end_state.lost);
        line("phantom", &self.end_state.phantom);
        line("left w/o reason", &self.left.without_reason);
        line("dlq w/o reason", &self.left.dead_letters_without_reason);
        line("left, explained", &self.left.with_dead_letter);
        let _ = writeln!(
            s,
            "end state     {} users checked; {} lost immediate; {} legacy members left; {} open dead letters",
            self.end_state.users_checked,
            self.end_state.lost_immediate,
            self.left.legacy,
            self.left.dead_letters
        );
        let _ = writeln!(
            s,
            "verdict       {}",
            if self.ok() {
                "no violation"
            } else {
                "VIOLATIONS"
            }
        );
        s
    }

    pub fn write(&self, dir: &Path) -> anyhow::Result<()> {
        std::fs::create_dir_all(dir)?;
        std::fs::write(dir.join("report.json"), serde_json::to_string_pretty(self)?)?;
        let chart = self.throughput_svg()?;
        std::fs::write(dir.join("throughput.svg"), &chart)?;
        let mut rows = String::new();
        let num = |v: Option<f64>| v.map_or("-".into(), |v| format!("{v:.1}"));
        for (i, f) in self.faults.iter().enumerate() {
            let _ = write!(
                rows,
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                i + 1,
                f.kind.name(),
                f.instance.map_or("-".into(), |n| format!("datasync-{n}")),
                num(f.start_s),
                num(f.end_s),
                num(f.recovery_s),
                f.error.as_deref().unwrap_or("")
            );
        }
        let html = html_page(
            &format!("datasync chaos soak: {}", self.scenario.name),
            &self.console(),
            &format!(
                "<h2>Throughput, faults shaded</h2>{chart}\
                 <h2>Faults</h2><table><tr><th>#</th><th>kind</th><th>target</th><th>start s</th>\
                 <th>end s</th><th>recovery s</th><th>error</th></tr>{rows}</table>"
            ),
            &self.scenario,
        );
        std::fs::write(dir.join("report.html"), html)?;
        Ok(())
    }

    /// Acknowledged and applied changes per second (over 5 s), with each
    /// fault's span shaded in its kind's colour.
    fn throughput_svg(&self) -> anyhow::Result<String> {
        const WINDOW_S: f64 = 5.0;
        let mut out = String::new();
        {
            let root = SVGBackend::with_string(&mut out, (1000, 420)).into_drawing_area();
            root.fill(&WHITE)?;
            let p = &self.points;
            let rate = |f: fn(&Point) -> u64| {
                let points: Vec<(f64, u64)> = p.iter().map(|x| (x.t_s, f(x))).collect();
                windowed_rates(&points, WINDOW_S)
            };
            let acked = rate(|x| x.acked);
            let applied = rate(|x| x.applied);
            let max_t = p.last().map_or(1.0, |x| x.t_s).max(1.0);
            let max_y = acked
                .iter()
                .chain(&applied)
                .map(|x| x.1)
                .fold(1.0, f64::max)
                * 1.15;
            let mut chart = rate_chart(
                &root,
                format!(
                    "{}: changes per second (over {WINDOW_S:.0} s), faults shaded",
                    self.scenario.name
                ),
                max_t,
                max_y,
            )?;
            for (kind, color) in KINDS {
                let spans: Vec<(f64, f64)> = self
                    .faults
                    .iter()
                    .filter(|f| f.kind == kind)
                    .filter_map(|f| Some((f.start_s?, f.end_s?)))
                    .collect();
                if spans.is_empty() {
                    continue;
                }
                chart
                    .draw_series(spans.into_iter().map(|(a, b)| {
                        Rectangle::new([(a, 0.0), (b, max_y)], color.mix(0.25).filled())
                    }))?
                    .label(kind.name())
                    .legend(move |(x, y)| {
                        Rectangle::new([(x, y - 5), (x + 20, y + 5)], color.mix(0.5).filled())
                    });
            }
            draw_lines(
                &mut chart,
                [
                    ("acknowledged/s", acked, BLACK),
                    ("applied/s", applied, RED),
                ],
            )?;
            draw_legend(&mut chart)?;
            root.present()?;
        }
        Ok(out)
    }
}
