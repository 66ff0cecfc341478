//! `shoal-sim` as a user runs it: list, run with --json, replay by seed,
//! exit codes, and errors that name the key and the line.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::{Command, Output};

use serde_json::Value;

const SMALL: &str = r#"
description = "a tiny flash crowd"
seed = 3
duration = "120s"

[[hosts]]
name = "seed"
count = 1
uplink = "2 MB/s"

[[hosts]]
name = "peers"
count = 5
uplink = "1 MB/s"
downlink = "10 MB/s"

[[files]]
name = "tiny.bin"
size = "512 KiB"
seeders = ["seed"]

[[downloads]]
file = "tiny.bin"
by = "peers"

[expect]
completion_ratio_min = 1.0
"#;

fn shoal_sim(args: &[&str], dir: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_shoal-sim")).args(args).current_dir(dir).output().unwrap()
}

fn json_run(dir: &Path, extra: &[&str]) -> (Value, Output) {
    let mut args = vec!["run", "small.toml", "--json"];
    args.extend_from_slice(extra);
    let out = shoal_sim(&args, dir);
    let stdout = String::from_utf8(out.stdout.clone()).unwrap();
    assert_eq!(stdout.lines().count(), 1, "stdout is exactly one JSON object: {stdout}");
    (serde_json::from_str(&stdout).unwrap(), out)
}

#[test]
fn list_names_every_catalog_scenario() {
    let dir = tempfile::tempdir().unwrap();
    let out = shoal_sim(&["list"], dir.path());
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    for name in [
        "flash-crowd",
        "slow-seed",
        "churn",
        "partition-heal",
        "dht-lookups",
        "gossip-spread",
        "bad-peer",
        "name-search",
    ] {
        let line = text.lines().find(|l| l.starts_with(name)).unwrap_or_else(|| panic!("{name} missing: {text}"));
        assert!(line.len() > name.len() + 10, "{name} has a description: {line}");
    }
}

#[test]
fn a_run_reports_json_writes_its_outputs_and_replays_by_seed() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("small.toml"), SMALL).unwrap();
    let (first, out) = json_run(dir.path(), &[]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    for key in ["scenario", "seed", "engine", "hosts", "sim_seconds", "wall_seconds", "trace_hash", "ok"] {
        assert!(first.get(key).is_some(), "{key} in {first}");
    }
    assert_eq!(first["scenario"], "small");
    assert_eq!(first["seed"], 3);
    assert_eq!(first["engine"], "turmoil");
    assert_eq!(first["hosts"], 6);
    assert_eq!(first["downloads"]["completed"], 5);
    for p in ["p50", "p90", "max"] {
        assert!(first["downloads"]["completion_s"][p].as_f64().unwrap() > 0.0);
    }
    let bound = first["lower_bound_s"].as_f64().unwrap();
    assert!(first["downloads"]["completion_s"]["max"].as_f64().unwrap() >= bound);
    for key in ["count", "succeeded", "rounds_p50", "rounds_p90", "latency_ms_p50"] {
        assert!(first["lookups"].get(key).is_some(), "lookups.{key}");
    }
    for key in ["published", "delivery_ratio", "duplicates_per_node"] {
        assert!(first["gossip"].get(key).is_some(), "gossip.{key}");
    }
    for key in ["payload", "overhead", "wasted"] {
        assert!(first["bytes"].get(key).is_some(), "bytes.{key}");
    }
    assert!(first["checks"].as_array().unwrap().iter().all(|c| c["ok"] == true));
    let out_dir = dir.path().join("target/shoal-runs/small-seed3");
    for file in ["summary.json", "trace", "report.html"] {
        assert!(out_dir.join(file).metadata().unwrap().len() > 0, "{file} written");
    }
    let trace = std::fs::read_to_string(out_dir.join("trace")).unwrap();
    assert!(trace.starts_with(&format!("# trace {}", first["trace_hash"].as_str().unwrap())));
    let html = std::fs::read_to_string(out_dir.join("report.html")).unwrap();
    assert!(html.matches("<svg").count() >= 4, "charts are inline SVG");
    assert!(!html.contains("src=\"http") && !html.contains("href=\"http"), "no fetches");

    let (again, _) = json_run(dir.path(), &[]);
    assert_eq!(first["trace_hash"], again["trace_hash"], "same seed, same trace");
    let (other, _) = json_run(dir.path(), &["--seed", "4"]);
    assert_ne!(first["trace_hash"], other["trace_hash"], "another seed, another trace");
}

#[test]
fn a_failed_expectation_exits_one_and_bad_input_exits_two_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("small.toml"), SMALL).unwrap();
    let (summary, out) = json_run(dir.path(), &["--set", "expect.downloads_complete_within=0.001"]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(summary["ok"], false);

    std::fs::write(dir.path().join("typo.toml"), SMALL.replace("uplink = \"1 MB/s\"", "uplnk = \"1 MB/s\"")).unwrap();
    let out = shoal_sim(&["run", "typo.toml"], dir.path());
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(stderr.contains("line 14") && stderr.contains("unknown field `uplnk`"), "{stderr}");

    let out = shoal_sim(&["run", "small.toml", "--set", "hosts.peers.uplink=fast"], dir.path());
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8(out.stderr).unwrap().contains("`fast` is not a rate"));

    let out = shoal_sim(&["run", "no-such-scenario"], dir.path());
    assert_eq!(out.status.code(), Some(2));
}

/// The classic result (catalog `slow-seed`): a seed no faster than its
/// peers, four upload slots per peer, 50 peers. Rarest-first finishes
/// sooner than random because random spends the seed's upload on pieces
/// other peers already hold; sequential selection is far slower (every
/// peer wants the same next piece). The claim is about the distribution:
/// a single seed can go the other way (random won seed 1 of 1..8 on the
/// build that joined with empty-bucket refreshes, by 0.3 s, while losing
/// by 2 s at the median), so the test compares the mean over four seeds.
#[test]
fn slow_seed_rarest_first_beats_random() {
    let dir = tempfile::tempdir().unwrap();
    let last = |seed: &str, set: &str| {
        let out = shoal_sim(&["run", "slow-seed", "--json", "--seed", seed, "--set", set], dir.path());
        assert!(out.status.success(), "{set}: {}", String::from_utf8_lossy(&out.stderr));
        let summary: Value = serde_json::from_slice(&out.stdout).unwrap();
        summary["downloads"]["completion_s"]["max"].as_f64().unwrap()
    };
    let seeds = ["1", "2", "3", "4"];
    let (mut rarest_sum, mut random_sum) = (0.0, 0.0);
    for seed in seeds {
        let rarest = last(seed, "protocol.picker=rarest-first");
        let random = last(seed, "protocol.picker=random");
        eprintln!("slow-seed seed {seed}: last completion rarest-first {rarest:.2} s, random {random:.2} s");
        rarest_sum += rarest;
        random_sum += random;
    }
    let n = seeds.len() as f64;
    let (rarest, random) = (rarest_sum / n, random_sum / n);
    assert!(rarest < random, "mean last completion: rarest-first {rarest:.2} s vs random {random:.2} s");
    let sequential = last("1", "protocol.picker=sequential");
    assert!(sequential > random, "seed 1: sequential {sequential} s vs mean random {random} s");
}

/// Super seeding (the seed reveals each piece to one peer) in a small,
/// fast, fully unchoked swarm: plain rarest-first loses seed upload to
/// peers picking the same unspread pieces at once; super seeding sends
/// each piece once and comes within 15% of the Kumar-Ross bound.
#[test]
fn super_seeding_brings_a_fast_swarm_near_the_bound() {
    let dir = tempfile::tempdir().unwrap();
    let fast_swarm =
        ["hosts.peers.count=20", "hosts.peers.uplink=2 MB/s", "files.0.piece_size=16 KiB", "protocol.upload_slots=8"];
    let run = |extra: &str| {
        let mut args = vec!["run", "slow-seed", "--json", "--set", extra];
        for set in &fast_swarm {
            args.extend(["--set", set]);
        }
        let out = shoal_sim(&args, dir.path());
        assert!(out.status.success(), "{extra}: {}", String::from_utf8_lossy(&out.stderr));
        let summary: Value = serde_json::from_slice(&out.stdout).unwrap();
        (summary["downloads"]["completion_s"]["max"].as_f64().unwrap(), summary["lower_bound_s"].as_f64().unwrap())
    };
    let (rarest, bound) = run("protocol.picker=rarest-first");
    let (superseed, _) = run("protocol.super_seeding=true");
    eprintln!("fast swarm (bound {bound:.2} s): rarest-first {rarest:.2} s, super seeding {superseed:.2} s");
    assert!(superseed <= 1.15 * bound, "super seeding {superseed} vs bound {bound}");
    assert!(superseed < rarest, "super seeding {superseed} vs plain rarest-first {rarest}");
}

/// A sweep split in two shards, merged: every seed once, a line per seed,
/// and a failing seed's replay command (forced by an impossible
/// expectation).
#[test]
fn sharded_sweeps_merge_and_name_replay_commands() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("small.toml"), SMALL).unwrap();
    let set = "expect.downloads_complete_within=0.001";
    for shard in ["0/2", "1/2"] {
        let out_file = format!("shard{}.json", &shard[..1]);
        let out = shoal_sim(
            &[
                "sweep",
                "small.toml",
                "--seeds",
                "1..3",
                "--shard",
                shard,
                "--jobs",
                "1",
                "--set",
                set,
                "--out",
                &out_file,
            ],
            dir.path(),
        );
        assert_eq!(out.status.code(), Some(1), "every seed fails the impossible expectation");
        let text = String::from_utf8(out.stdout).unwrap();
        let lines = text.lines().filter(|l| l.starts_with("seed ")).count();
        assert_eq!(lines, if shard == "0/2" { 1 } else { 2 }, "seed 2 in shard 0, seeds 1 and 3 in shard 1: {text}");
    }
    let out = shoal_sim(&["merge", "shard0.json", "shard1.json"], dir.path());
    let text = String::from_utf8(out.stdout).unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(text.contains("0/3 seeds passed"), "{text}");
    for seed in 1..=3 {
        let replay = format!("replay: shoal-sim run small.toml --seed {seed} --set {set}");
        assert!(text.contains(&replay), "{replay} in {text}");
    }
    let out = shoal_sim(&["merge", "shard0.json", "shard0.json"], dir.path());
    assert_eq!(out.status.code(), Some(2), "a seed in two shards is refused");
}
