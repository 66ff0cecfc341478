//! Seed sweeps: many seeds of one scenario in parallel (one simulation per
//! thread), sharded across machines, merged afterwards.

use std::ops::RangeInclusive;
use std::sync::Mutex;

use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use shoal_sim::summary::Spread;

use crate::runner::{self, Options};

/// Seeds one sweep may run.
pub const SEEDS_MAX: u64 = 1_000_000;

/// One seed's result, as a shard file records it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SeedResult {
    /// The seed.
    pub seed: u64,
    /// Every check held.
    pub ok: bool,
    /// The run failed outright (an engine error).
    pub error: Option<String>,
    /// Failed checks, by name.
    pub failed: Vec<String>,
    /// Slowest completion, seconds.
    pub last_s: f64,
    /// Median completion, seconds.
    pub p50_s: f64,
    /// Lower bound, where it applies.
    pub lower_bound_s: Option<f64>,
    /// Lookup success ratio, when the scenario looks up.
    pub lookup_success: Option<f64>,
    /// Trace fingerprint.
    pub trace_hash: String,
    /// Wall seconds.
    pub wall_seconds: f64,
}

/// A shard's output (or a merge of several).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SweepFile {
    /// Scenario name or path, as given.
    pub scenario: String,
    /// The `--set`/`--engine` arguments, for replay commands.
    pub args: Vec<String>,
    /// Results, by seed.
    pub results: Vec<SeedResult>,
}

/// Parse `A..B` (inclusive of both ends, like `1..100` meaning 100 seeds).
pub fn parse_seeds(text: &str) -> Result<RangeInclusive<u64>, String> {
    let bad = || format!("--seeds `{text}`: expected A..B, e.g. 1..100");
    let (a, b) = text.split_once("..").ok_or_else(bad)?;
    let (a, b): (u64, u64) = (a.trim().parse().map_err(|_| bad())?, b.trim().parse().map_err(|_| bad())?);
    if a > b {
        return Err(format!("--seeds `{text}`: {a} is after {b}"));
    }
    if b - a >= SEEDS_MAX {
        return Err(format!("--seeds `{text}`: at most {SEEDS_MAX} seeds per sweep; shard it"));
    }
    Ok(a..=b)
}

/// Parse `I/N` (0-based shard I of N).
pub fn parse_shard(text: &str) -> Result<(u64, u64), String> {
    let bad = || format!("--shard `{text}`: expected I/N with 0 <= I < N, e.g. 0/4");
    let (i, n) = text.split_once('/').ok_or_else(bad)?;
    let (i, n): (u64, u64) = (i.trim().parse().map_err(|_| bad())?, n.trim().parse().map_err(|_| bad())?);
    if n == 0 || i >= n {
        return Err(bad());
    }
    Ok((i, n))
}

/// The command that replays one seed.
#[must_use]
pub fn replay_command(scenario: &str, args: &[String], seed: u64) -> String {
    let mut cmd = format!("shoal-sim run {scenario} --seed {seed}");
    for arg in args {
        cmd.push(' ');
        cmd.push_str(arg);
    }
    cmd
}

/// Run the seeds of `range` that fall in the shard, `jobs` at a time,
/// printing a line per seed as it finishes.
pub fn run(
    scenario: &str,
    options: &Options,
    args: &[String],
    range: RangeInclusive<u64>,
    shard: (u64, u64),
    jobs: usize,
) -> Result<SweepFile, String> {
    // Fail fast on a bad scenario before starting threads.
    runner::prepare(scenario, options)?.plan()?;
    let seeds: Vec<u64> = range.filter(|s| s % shard.1 == shard.0).collect();
    let pool = rayon::ThreadPoolBuilder::new().num_threads(jobs.max(1)).build().map_err(|e| e.to_string())?;
    let print = Mutex::new(());
    let mut results: Vec<SeedResult> = pool.install(|| {
        seeds
            .par_iter()
            .map(|&seed| {
                let result = run_seed(scenario, options, seed);
                let _guard = print.lock();
                println!("{}", seed_line(&result));
                result
            })
            .collect()
    });
    results.sort_by_key(|r| r.seed);
    Ok(SweepFile { scenario: scenario.to_owned(), args: args.to_vec(), results })
}

fn run_seed(scenario: &str, options: &Options, seed: u64) -> SeedResult {
    let options = Options { seed: Some(seed), ..options.clone() };
    let empty = |error: String| SeedResult {
        seed,
        ok: false,
        error: Some(error),
        failed: Vec::new(),
        last_s: 0.0,
        p50_s: 0.0,
        lower_bound_s: None,
        lookup_success: None,
        trace_hash: String::new(),
        wall_seconds: 0.0,
    };
    let run = match runner::prepare(scenario, &options).and_then(|s| runner::execute(&s, false)) {
        Ok(run) => run,
        Err(e) => return empty(e),
    };
    let s = run.summary;
    SeedResult {
        seed,
        ok: s.ok,
        error: None,
        failed: s.checks.iter().filter(|c| !c.ok).map(|c| format!("{}: {}", c.name, c.detail)).collect(),
        last_s: s.downloads.completion_s.max,
        p50_s: s.downloads.completion_s.p50,
        lower_bound_s: s.lower_bound_s,
        lookup_success: (s.lookups.count > 0).then_some(s.lookups.success_ratio),
        trace_hash: s.trace_hash,
        wall_seconds: s.wall_seconds,
    }
}

fn seed_line(r: &SeedResult) -> String {
    let verdict = if r.ok { "ok  " } else { "FAIL" };
    match &r.error {
        Some(e) => format!("seed {:>6} {verdict} error: {e}", r.seed),
        None => format!(
            "seed {:>6} {verdict} last {:>7.2} s  p50 {:>7.2} s  {}trace {}  ({:.1} s wall)",
            r.seed,
            r.last_s,
            r.p50_s,
            r.lookup_success.map_or(String::new(), |l| format!("lookups {:.2}%  ", l * 100.0)),
            r.trace_hash.get(..12).unwrap_or(""),
            r.wall_seconds
        ),
    }
}

/// The aggregate lines and replay commands for failing seeds.
#[must_use]
pub fn aggregate(file: &SweepFile) -> (String, bool) {
    use std::fmt::Write;
    let n = file.results.len();
    let ok = file.results.iter().filter(|r| r.ok).count();
    let last: Vec<f64> = file.results.iter().filter(|r| r.error.is_none()).map(|r| r.last_s).collect();
    let ratios: Vec<f64> =
        file.results.iter().filter_map(|r| r.lower_bound_s.filter(|b| *b > 0.0).map(|b| r.last_s / b)).collect();
    let spread = Spread::of(&last);
    let mut out = format!(
        "{ok}/{n} seeds passed; last completion over seeds: p50 {:.2} s, p90 {:.2} s, max {:.2} s\n",
        spread.p50, spread.p90, spread.max
    );
    if !ratios.is_empty() {
        let r = Spread::of(&ratios);
        let _ = writeln!(out, "last / lower bound over seeds: p50 {:.3}, p90 {:.3}, max {:.3}", r.p50, r.p90, r.max);
    }
    for r in file.results.iter().filter(|r| !r.ok) {
        let why = r.error.clone().unwrap_or_else(|| r.failed.join("; "));
        let _ = writeln!(
            out,
            "failed seed {}: {why}\n  replay: {}",
            r.seed,
            replay_command(&file.scenario, &file.args, r.seed)
        );
    }
    (out, ok == n)
}

/// Combine shard files of one sweep.
pub fn merge(files: &[SweepFile]) -> Result<SweepFile, String> {
    let first = files.first().ok_or("merge: no shard files given")?;
    let mut results = Vec::new();
    for f in files {
        if f.scenario != first.scenario || f.args != first.args {
            return Err(format!(
                "merge: shards of different sweeps ({} {:?} vs {} {:?})",
                first.scenario, first.args, f.scenario, f.args
            ));
        }
        results.extend(f.results.iter().cloned());
    }
    results.sort_by_key(|r| r.seed);
    if let Some(dup) = results.windows(2).find(|w| w[0].seed == w[1].seed) {
        return Err(format!("merge: seed {} appears in two shards", dup[0].seed));
    }
    Ok(SweepFile { scenario: first.scenario.clone(), args: first.args.clone(), results })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeds_and_shards_parse_with_clear_errors() {
        assert_eq!(parse_seeds("1..100").unwrap(), 1..=100);
        assert!(parse_seeds("5..1").unwrap_err().contains("5 is after 1"));
        assert!(parse_seeds("1-100").is_err());
        assert_eq!(parse_shard("1/4").unwrap(), (1, 4));
        assert!(parse_shard("4/4").is_err());
        assert!(parse_shard("0/0").is_err());
    }

    #[test]
    fn merge_combines_shards_and_refuses_overlaps() {
        let result = |seed| SeedResult {
            seed,
            ok: seed != 3,
            error: None,
            failed: if seed == 3 { vec!["x: y".into()] } else { Vec::new() },
            last_s: seed as f64,
            p50_s: 1.0,
            lower_bound_s: Some(1.0),
            lookup_success: None,
            trace_hash: String::new(),
            wall_seconds: 0.0,
        };
        let shard = |seeds: &[u64]| SweepFile {
            scenario: "flash-crowd".into(),
            args: vec!["--set".into(), "protocol.k=10".into()],
            results: seeds.iter().map(|&s| result(s)).collect(),
        };
        let merged = merge(&[shard(&[2, 4]), shard(&[1, 3])]).unwrap();
        assert_eq!(merged.results.iter().map(|r| r.seed).collect::<Vec<_>>(), [1, 2, 3, 4]);
        let (text, all_ok) = aggregate(&merged);
        assert!(!all_ok);
        assert!(text.contains("3/4 seeds passed"), "{text}");
        assert!(text.contains("replay: shoal-sim run flash-crowd --seed 3 --set protocol.k=10"), "{text}");
        assert!(merge(&[shard(&[1]), shard(&[1])]).unwrap_err().contains("seed 1 appears in two shards"));
    }
}
