//! Running one scenario: load, run with a progress bar, write the outputs.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use shoal_sim::Run;
use shoal_sim::model::{EngineKind, Scenario};
use shoal_sim::observe::{Fact, Outcome};
use shoal_sim::summary::Summary;
use shoal_sim::turmoil_engine::Progress;

use crate::report;
use crate::spec::{self, Source};

/// Runs shorter than this (wall time) never show a progress bar.
const PROGRESS_AFTER: Duration = Duration::from_secs(1);

/// How to run a scenario.
#[derive(Clone, Debug, Default)]
pub struct Options {
    /// Replace the scenario's seed.
    pub seed: Option<u64>,
    /// Replace its engine.
    pub engine: Option<EngineKind>,
    /// `key=value` overrides.
    pub sets: Vec<String>,
}

/// Load a catalog scenario or a file with the options applied.
pub fn prepare(name_or_path: &str, options: &Options) -> Result<Scenario, String> {
    let source = Source::resolve(name_or_path)?;
    let mut scenario = spec::load(&source, &options.sets)?;
    if let Some(seed) = options.seed {
        scenario.seed = seed;
    }
    if let Some(engine) = options.engine {
        scenario.engine = engine;
    }
    Ok(scenario)
}

/// Run with wall time measured (not part of the deterministic result).
#[allow(clippy::disallowed_methods)] // wall time is reported, never used by the simulation
pub fn execute(scenario: &Scenario, show_progress: bool) -> Result<Run, String> {
    let started = std::time::Instant::now();
    let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::hidden());
    bar.set_style(
        ProgressStyle::with_template("{spinner} [{bar:30}] {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    let terminal = show_progress && std::io::stderr().is_terminal();
    let mut shown = false;
    let mut report = |p: Progress| {
        if terminal && !shown && started.elapsed() >= PROGRESS_AFTER {
            shown = true;
            bar.set_draw_target(ProgressDrawTarget::stderr());
        }
        bar.set_length(p.deadline.as_secs());
        bar.set_position(p.sim_time.as_secs());
        bar.set_message(format!(
            "simulated {:.0} s of {:.0} s, downloads {}/{}",
            p.sim_time.as_secs_f64(),
            p.deadline.as_secs_f64(),
            p.completed,
            p.downloads
        ));
    };
    let result = shoal_sim::run(scenario, Some(&mut report));
    bar.finish_and_clear();
    let mut run = result?;
    run.summary.wall_seconds = started.elapsed().as_secs_f64();
    Ok(run)
}

/// `target/shoal-runs/NAME-seedN`.
#[must_use]
pub fn default_out_dir(scenario: &Scenario) -> PathBuf {
    PathBuf::from("target").join("shoal-runs").join(format!("{}-seed{}", scenario.name, scenario.seed))
}

/// Write `summary.json`, `trace` and `report.html` into `dir`.
pub fn write_outputs(dir: &Path, scenario: &Scenario, run: &Run) -> Result<(), String> {
    let io = |what: &str, e: std::io::Error| format!("{}: {what}: {e}", dir.display());
    std::fs::create_dir_all(dir).map_err(|e| io("creating the output directory", e))?;
    let json = serde_json::to_string_pretty(&run.summary).map_err(|e| e.to_string())?;
    std::fs::write(dir.join("summary.json"), json + "\n").map_err(|e| io("summary.json", e))?;
    std::fs::write(dir.join("trace"), trace_text(&run.outcome, &run.plan.hosts)).map_err(|e| io("trace", e))?;
    let html = report::html(scenario, &run.plan, &run.outcome, &run.summary)?;
    std::fs::write(dir.join("report.html"), html).map_err(|e| io("report.html", e))?;
    Ok(())
}

/// The facts of a run, one per line: `seconds host fact`. (The trace hash
/// covers every node event in full; this file keeps what metrics use.)
#[must_use]
pub fn trace_text(outcome: &Outcome, hosts: &[shoal_sim::model::HostPlan]) -> String {
    use std::fmt::Write;
    let mut out = format!("# trace {} ({} events)\n", outcome.trace_hex(), outcome.events);
    for r in &outcome.records {
        let host = hosts.get(r.host as usize).map_or("?", |h| h.name.as_str());
        let fact = match &r.fact {
            Fact::GossipPublished { id, .. } | Fact::GossipDelivered { id } => {
                let verb =
                    if matches!(r.fact, Fact::GossipPublished { .. }) { "GossipPublished" } else { "GossipDelivered" };
                format!("{verb} {}", id.0[..6].iter().map(|b| format!("{b:02x}")).collect::<String>())
            }
            other => format!("{other:?}"),
        };
        let _ = writeln!(out, "{:.6} {host} {fact}", r.at.as_secs_f64());
    }
    out
}

/// The summary as rows for a table.
#[must_use]
pub fn summary_rows(s: &Summary) -> Vec<(String, String)> {
    let mut rows = vec![
        ("scenario".into(), format!("{} (seed {}, {} engine)", s.scenario, s.seed, s.engine)),
        ("hosts".into(), s.hosts.to_string()),
        ("simulated".into(), format!("{:.1} s in {:.1} s wall", s.sim_seconds, s.wall_seconds)),
    ];
    if s.downloads.asked > 0 {
        let c = &s.downloads.completion_s;
        rows.push((
            "downloads".into(),
            format!("{}/{} completed ({} started)", s.downloads.completed, s.downloads.asked, s.downloads.started),
        ));
        rows.push(("completion".into(), format!("p50 {:.2} s, p90 {:.2} s, last {:.2} s", c.p50, c.p90, c.max)));
        if let Some(bound) = s.lower_bound_s {
            let ratio = s.bound_ratio.map_or("n/a".to_owned(), |r| format!("{r:.2}×"));
            rows.push(("lower bound".into(), format!("{bound:.2} s (Kumar-Ross); last / bound = {ratio}")));
        }
    }
    if s.lookups.count > 0 {
        let l = &s.lookups;
        rows.push((
            "lookups".into(),
            format!(
                "{}/{} found the closest node ({:.2}%), rounds p50 {} p90 {}, latency p50 {:.0} ms",
                l.succeeded,
                l.count,
                l.success_ratio * 100.0,
                l.rounds_p50,
                l.rounds_p90,
                l.latency_ms_p50
            ),
        ));
    }
    if s.searches.count > 0 {
        rows.push(("searches".into(), format!("{}/{} found their file", s.searches.succeeded, s.searches.count)));
    }
    if s.gossip.published > 0 {
        rows.push((
            "gossip".into(),
            format!(
                "{} messages, delivery {:.2}%, {:.1} duplicates per node",
                s.gossip.published,
                s.gossip.delivery_ratio * 100.0,
                s.gossip.duplicates_per_node
            ),
        ));
    }
    rows.push((
        "bytes".into(),
        format!(
            "payload {:.1} MB, overhead {:.1} MB, wasted {:.1} MB",
            s.bytes.payload as f64 / 1e6,
            s.bytes.overhead as f64 / 1e6,
            s.bytes.wasted as f64 / 1e6
        ),
    ));
    if s.pieces.get("failed").copied().unwrap_or(0) > 0 || s.bans > 0 {
        rows.push((
            "bad data".into(),
            format!("{} pieces failed their hash, {} bans", s.pieces.get("failed").copied().unwrap_or(0), s.bans),
        ));
    }
    rows.push(("trace".into(), s.trace_hash.clone()));
    rows
}

/// The readable summary printed after a run.
#[must_use]
pub fn summary_table(s: &Summary) -> String {
    use std::fmt::Write;
    let rows = summary_rows(s);
    let width = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    let mut out = String::new();
    for (k, v) in rows {
        let _ = writeln!(out, "  {k:<width$}  {v}");
    }
    for check in &s.checks {
        let _ = writeln!(out, "  {} {}: {}", if check.ok { "ok  " } else { "FAIL" }, check.name, check.detail);
    }
    let _ = writeln!(out, "  {}", if s.ok { "all checks passed" } else { "SOME CHECKS FAILED" });
    out
}
