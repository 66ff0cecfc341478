//! `shoal daemon` as a user meets it: a clear one-line error and a
//! distinct exit code for bad flags, an unusable data dir, a taken port, a
//! bad config file, and a data dir already in use.

// Test setup that fails should panic loudly.
#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

fn shoal(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_shoal")).args(args).env("RUST_LOG", "info").output().unwrap()
}

fn last_line(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).lines().last().unwrap_or_default().to_owned()
}

#[test]
fn bad_flags_exit_2_naming_the_flag() {
    let out = shoal(&["daemon", "--listen", "nope"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid value 'nope' for '--listen"));
    assert_eq!(shoal(&["fly"]).status.code(), Some(2));
}

#[test]
fn an_unusable_data_dir_or_port_is_one_line_and_exit_1() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("a-file");
    std::fs::write(&file, b"x").unwrap();
    let out = shoal(&["daemon", "--listen", "127.0.0.1:0", "--data-dir", file.join("sub").to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(last_line(&out).starts_with("shoal: error: cannot create data dir"), "{}", last_line(&out));

    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let dir = tmp.path().join("data");
    let out = shoal(&["daemon", "--listen", &addr, "--data-dir", dir.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(last_line(&out).contains(&format!("cannot listen on {addr}")), "{}", last_line(&out));
}

#[test]
fn a_bad_config_file_names_the_key() {
    let tmp = tempfile::tempdir().unwrap();
    let config = tmp.path().join("shoal.toml");
    std::fs::write(&config, "frame_bytes_max = 262144\nconections_max = 3\n").unwrap();
    let dir = tmp.path().join("data");
    let out = shoal(&[
        "daemon",
        "--listen",
        "127.0.0.1:0",
        "--data-dir",
        dir.to_str().unwrap(),
        "--config",
        config.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(last_line(&out).contains("conections_max"), "{}", last_line(&out));
}

#[test]
fn a_second_daemon_on_the_same_data_dir_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let dir = dir.to_str().unwrap();
    let mut first = Command::new(env!("CARGO_BIN_EXE_shoal"))
        .args(["daemon", "--listen", "127.0.0.1:0", "--data-dir", dir])
        .env("RUST_LOG", "info")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = first.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    // A guard against a hang, not a performance claim.
    let listening =
        (0..100).any(|_| rx.recv_timeout(Duration::from_millis(100)).is_ok_and(|l| l.contains("listening")));
    assert!(listening, "the first daemon started");
    let second = shoal(&["daemon", "--listen", "127.0.0.1:0", "--data-dir", dir]);
    first.kill().unwrap();
    let _ = first.wait();
    assert_eq!(second.status.code(), Some(1));
    let line = last_line(&second);
    assert!(line.contains(dir) && line.contains("in use"), "{line}");
}
