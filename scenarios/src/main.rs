//! `shoal-sim`: run Shoal scenarios in the deterministic simulator.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand, ValueEnum};
use shoal_scenarios::catalog;
use shoal_scenarios::runner::{self, Options};
use shoal_scenarios::sim::model::EngineKind;
use shoal_scenarios::sweep::{self, SweepFile};

/// Deterministic Shoal scenarios: the same scenario and seed always give
/// the same run (and the same trace hash).
#[derive(Parser)]
#[command(name = "shoal-sim", version, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Commands,
}

#[derive(Subcommand)]
enum Commands {
    /// Run one scenario: print a summary, write summary.json, trace and
    /// report.html, and exit 1 if an expectation fails.
    Run {
        /// A catalog name (see `list`) or a path to a scenario TOML file.
        scenario: String,
        #[command(flatten)]
        tweaks: Tweaks,
        /// Output directory [default: target/shoal-runs/NAME-seedN].
        #[arg(long, value_name = "DIR")]
        out: Option<PathBuf>,
        /// Print exactly one JSON object (the summary) on stdout.
        #[arg(long)]
        json: bool,
    },
    /// List the catalog scenarios.
    List,
    /// Run a range of seeds in parallel; print a line per seed, an
    /// aggregate, and the replay command of each failing seed.
    Sweep {
        /// A catalog name or a path to a scenario TOML file.
        scenario: String,
        /// Seeds to run, both ends included: A..B.
        #[arg(long, value_name = "A..B")]
        seeds: String,
        /// Simulations at once [default: the number of CPUs].
        #[arg(long, value_name = "N")]
        jobs: Option<usize>,
        /// Run only the seeds with seed % N == I (for batch schedulers).
        #[arg(long, value_name = "I/N", default_value = "0/1")]
        shard: String,
        #[command(flatten)]
        tweaks: Tweaks,
        /// Where to write this shard's results (JSON, for `merge`)
        /// [default: target/shoal-runs/NAME-sweep/shard-I-of-N.json].
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
    },
    /// Combine the shard files of one sweep and print its aggregate.
    Merge {
        /// Shard files written by `sweep`.
        #[arg(required = true)]
        shards: Vec<PathBuf>,
        /// Write the merged results here too.
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
    },
}

#[derive(Args, Clone)]
struct Tweaks {
    /// Replace the scenario's seed.
    #[arg(long)]
    seed: Option<u64>,
    /// Replace a value: a dotted key path and a TOML value, e.g.
    /// `protocol.picker=random` or `hosts.peers.count=100` (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    sets: Vec<String>,
    /// Replace the engine.
    #[arg(long, value_enum)]
    engine: Option<Engine>,
}

#[derive(Clone, Copy, ValueEnum)]
enum Engine {
    /// The real node driver in turmoil's simulated network.
    Turmoil,
    /// The discrete-event engine (core machines, 10^4+ nodes).
    Des,
}

impl Tweaks {
    fn options(&self) -> Options {
        Options {
            seed: self.seed,
            engine: self.engine.map(|e| match e {
                Engine::Turmoil => EngineKind::Turmoil,
                Engine::Des => EngineKind::Des,
            }),
            sets: self.sets.clone(),
        }
    }

    /// The arguments that reproduce these tweaks (seed excluded).
    fn args(&self) -> Vec<String> {
        let mut args = Vec::new();
        for set in &self.sets {
            args.push("--set".into());
            args.push(set.clone());
        }
        if let Some(engine) = self.engine {
            args.push("--engine".into());
            args.push(match engine {
                Engine::Turmoil => "turmoil".into(),
                Engine::Des => "des".into(),
            });
        }
        args
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match dispatch(cli.command) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("shoal-sim: {e}");
            ExitCode::from(2)
        }
    }
}

/// Ok(false) when a run worked but an expectation failed.
fn dispatch(command: Commands) -> Result<bool, String> {
    match command {
        Commands::List => {
            let width = catalog::CATALOG.iter().map(|e| e.name.len()).max().unwrap_or(0);
            for entry in catalog::CATALOG {
                println!("{:<width$}  {}", entry.name, catalog::description(entry));
            }
            Ok(true)
        }
        Commands::Run { scenario, tweaks, out, json } => {
            let spec = runner::prepare(&scenario, &tweaks.options())?;
            if !json {
                eprintln!("running {} (seed {}, {} engine)…", spec.name, spec.seed, spec.engine);
            }
            let run = runner::execute(&spec, true)?;
            let dir = out.unwrap_or_else(|| runner::default_out_dir(&spec));
            runner::write_outputs(&dir, &spec, &run)?;
            if json {
                println!("{}", serde_json::to_string(&run.summary).map_err(|e| e.to_string())?);
            } else {
                print!("{}", runner::summary_table(&run.summary));
                println!("  wrote {}/{{summary.json,trace,report.html}}", dir.display());
            }
            Ok(run.summary.ok)
        }
        Commands::Sweep { scenario, seeds, jobs, shard, tweaks, out } => {
            let range = sweep::parse_seeds(&seeds)?;
            let shard = sweep::parse_shard(&shard)?;
            let jobs = jobs.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
            let file = sweep::run(&scenario, &tweaks.options(), &tweaks.args(), range, shard, jobs)?;
            let name = std::path::Path::new(&scenario).file_stem().and_then(|s| s.to_str()).unwrap_or("sweep");
            let path = out.unwrap_or_else(|| {
                PathBuf::from("target")
                    .join("shoal-runs")
                    .join(format!("{name}-sweep"))
                    .join(format!("shard-{}-of-{}.json", shard.0, shard.1))
            });
            write_json(&path, &file)?;
            let (text, ok) = sweep::aggregate(&file);
            print!("{text}");
            println!("wrote {}", path.display());
            Ok(ok)
        }
        Commands::Merge { shards, out } => {
            let mut files = Vec::new();
            for path in &shards {
                let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
                let file: SweepFile =
                    serde_json::from_str(&text).map_err(|e| format!("{}: not a sweep shard: {e}", path.display()))?;
                files.push(file);
            }
            let merged = sweep::merge(&files)?;
            if let Some(path) = out {
                write_json(&path, &merged)?;
            }
            let (text, ok) = sweep::aggregate(&merged);
            print!("{text}");
            Ok(ok)
        }
    }
}

fn write_json(path: &std::path::Path, file: &SweepFile) -> Result<(), String> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    let json = serde_json::to_string_pretty(file).map_err(|e| e.to_string())?;
    std::fs::write(path, json + "\n").map_err(|e| format!("{}: {e}", path.display()))
}
