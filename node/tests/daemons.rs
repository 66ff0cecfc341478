//! Real `shoal` daemons as child processes on 127.0.0.x loopback addresses
//! (port 0; each daemon writes the ports it bound to its data dir), each
//! with a temporary data dir, driven through the `shoal` client commands
//! and the REST API.
//!
//! Waits poll the API until a condition holds, under generous deadlines
//! that only guard against a hang; nothing here measures speed.

// Test setup that fails should panic loudly.
#![allow(clippy::unwrap_used)]

mod common;

use std::process::{Child, Command, Stdio};

use common::{DEADLINE, Daemon, POLL, SHOAL, run_with_deadline, sha256_file, share, stdout, wait_child, write_random};
use hyper::Method;
use hyper::header::RANGE;
use shoal_node::client::ApiClient;
use shoal_node::control::{FileState, FileView, SearchHit, Shared};
use tokio::time::Instant;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_daemons_share_64_mib_fetched_by_two_concurrently_and_found_by_name() {
    let tmp = tempfile::tempdir().unwrap();
    let original = tmp.path().join("Shoal-Regatta_2026-highlights.mkv");
    write_random(&original, 64, 64 << 20);

    let boot = Daemon::start(&tmp.path().join("boot"), 2, &[], &[]);
    let seeder = Daemon::start(&tmp.path().join("seeder"), 3, &[boot.listen], &[]);
    let first = Daemon::start(&tmp.path().join("first"), 4, &[boot.listen], &[]);
    let second = Daemon::start(&tmp.path().join("second"), 5, &[boot.listen], &[]);
    for daemon in [&seeder, &first, &second] {
        daemon.wait_peers(1).await;
    }
    let id = share(&seeder, &original);

    // A word of the name finds it from another node (DHT keywords or the
    // gossip index), with its size.
    let started = Instant::now();
    loop {
        let hits: Vec<SearchHit> = second.api.get("/v1/search?q=regatta").await.unwrap();
        if let Some(hit) = hits.iter().find(|h| h.id == id) {
            assert_eq!(hit.size, 64 << 20);
            assert_eq!(hit.name, "Shoal-Regatta_2026-highlights.mkv");
            break;
        }
        assert!(started.elapsed() < DEADLINE, "search never found the file: {hits:?}");
        tokio::time::sleep(POLL).await;
    }
    let cli_search = stdout(&first.cli(&["search", "highlights"]));
    assert!(cli_search.contains(&id), "`shoal search` lists the file: {cli_search}");

    // Two downloads at once, through the client command.
    let outputs = [tmp.path().join("first.out"), tmp.path().join("second.out")];
    let mut gets: Vec<Child> = [&first, &second]
        .iter()
        .zip(&outputs)
        .map(|(daemon, out)| {
            Command::new(SHOAL)
                .args(["--api", &daemon.api.addr().to_string(), "get", &id, "-o", out.to_str().unwrap()])
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for get in &mut gets {
        let status = wait_child(get);
        assert!(status.success(), "`shoal get` exited with {status}");
    }
    let want = sha256_file(&original);
    for out in &outputs {
        assert_eq!(sha256_file(out), want, "{} differs from the original", out.display());
    }
    for daemon in [&first, &second] {
        let view = daemon.file(&id).await.unwrap();
        assert_eq!((view.state, view.pieces_held, view.bytes_held), (FileState::Complete, view.pieces, 64 << 20));
        let status = daemon.status().await;
        assert_eq!(status.pieces_failed, 0);
        assert_eq!(status.store_errors, 0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_download_survives_its_seeder_being_killed_while_another_complete_node_serves() {
    let tmp = tempfile::tempdir().unwrap();
    let original = tmp.path().join("survivor.bin");
    write_random(&original, 7, 16 << 20);

    let seeder = Daemon::start(&tmp.path().join("seeder"), 6, &[], &[]);
    let mirror = Daemon::start(&tmp.path().join("mirror"), 7, &[seeder.listen], &[]);
    mirror.wait_peers(1).await;
    let id = share(&seeder, &original);
    let mirrored = mirror.cli(&["get", &id, "--no-output"]);
    stdout(&mirrored);

    // Slow enough to be caught mid-transfer: 16 MiB at 4 MB/s.
    let leech =
        Daemon::start(&tmp.path().join("leech"), 8, &[seeder.listen, mirror.listen], &["--max-download", "4000000"]);
    leech.wait_peers(2).await;
    let _: FileView = leech.api.send(Method::POST, "/v1/downloads", &serde_json::json!({ "id": id })).await.unwrap();
    let partial = leech.wait_file(&id, "a tenth downloaded", |v| v.pieces > 0 && v.pieces_held * 10 >= v.pieces).await;
    assert!(partial.pieces_held < partial.pieces, "still mid-transfer when the seeder dies");
    let served_before = mirror.status().await.blocks_served;
    seeder.kill();

    let view = leech.wait_file(&id, "download complete", |v| v.state == FileState::Complete).await;
    assert_eq!(view.bytes_held, 16 << 20);
    assert!(mirror.status().await.blocks_served > served_before, "the mirror served the rest");
    let out = tmp.path().join("leech.out");
    stdout(&leech.cli(&["get", &id, "-o", out.to_str().unwrap()]));
    assert_eq!(sha256_file(&out), sha256_file(&original));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_downloader_resumes_without_refetching_verified_pieces() {
    let tmp = tempfile::tempdir().unwrap();
    let original = tmp.path().join("resume.bin");
    let size = 16usize << 20;
    write_random(&original, 11, size);

    let seeder = Daemon::start(&tmp.path().join("seeder"), 9, &[], &[]);
    let leech_dir = tmp.path().join("leech");
    let limit = ["--max-download", "4000000"];
    let leech = Daemon::start(&leech_dir, 10, &[seeder.listen], &limit);
    leech.wait_peers(1).await;
    let id = share(&seeder, &original);
    let _: FileView = leech.api.send(Method::POST, "/v1/downloads", &serde_json::json!({ "id": id })).await.unwrap();
    leech.wait_file(&id, "a quarter downloaded", |v| v.pieces > 0 && v.pieces_held * 4 >= v.pieces).await;
    leech.kill();

    // Only durable pieces count: what the store holds after the kill, seen
    // by a restart that joins nobody (so nothing changes while we look).
    let alone = Daemon::start(&leech_dir, 10, &[], &[]);
    let resumed = alone.file(&id).await.expect("the partial download is still tracked");
    assert_eq!(resumed.state, FileState::Downloading);
    assert!(resumed.pieces_held * 4 >= resumed.pieces, "verified pieces kept: {resumed:?}");
    assert!(resumed.pieces_held < resumed.pieces);
    alone.kill();

    let leech = Daemon::start(&leech_dir, 10, &[seeder.listen], &[]);

    let done = leech.wait_file(&id, "resumed download complete", |v| v.state == FileState::Complete).await;
    assert_eq!(done.bytes_held, size as u64);
    let status = leech.status().await;
    let blocks_in: u64 = status.traffic.iter().filter(|t| t.kind == "block").map(|t| t.received_bytes).sum();
    let missing = size as u64 - resumed.bytes_held;
    // Frame headers and endgame duplicates cost a few percent at most.
    assert!(blocks_in >= missing, "received {blocks_in} block bytes for {missing} missing");
    assert!(
        blocks_in < missing + missing / 10,
        "re-fetched held pieces: {blocks_in} block bytes for {missing} missing"
    );
    let out = tmp.path().join("resume.out");
    stdout(&leech.cli(&["get", &id, "-o", out.to_str().unwrap()]));
    assert_eq!(sha256_file(&out), sha256_file(&original));
}

/// Every error answer: a 4xx with `{ "error": { "code", "message" } }`.
async fn expect_client_error(
    api: &ApiClient,
    method: Method,
    path: &str,
    body: Option<&str>,
    headers: &[(hyper::header::HeaderName, String)],
    status: u16,
    code: &str,
) {
    use http_body_util::{BodyExt, Full};
    let body = body.map(|text| {
        let body = Full::new(bytes::Bytes::from(text.to_owned())).map_err(|never| match never {}).boxed();
        (body, "application/json")
    });
    let response = api.request(method.clone(), path, body, headers).await.unwrap();
    let got = response.status().as_u16();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    let text = String::from_utf8_lossy(&bytes);
    assert_eq!(got, status, "{method} {path}: {text}");
    let json: serde_json::Value =
        serde_json::from_slice(&bytes).unwrap_or_else(|e| panic!("{method} {path}: not JSON ({e}): {text}"));
    assert_eq!(json["error"]["code"], code, "{method} {path}: {text}");
    assert!(json["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "{method} {path}: {text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_api_input_gets_a_4xx_json_error_and_the_daemon_keeps_serving() {
    let tmp = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(&tmp.path().join("node"), 11, &[], &[]);
    let api = &daemon.api;
    let unknown = "ab".repeat(32);
    let json = |text: &'static str| Some(text);
    let none: &[(hyper::header::HeaderName, String)] = &[];

    expect_client_error(api, Method::GET, "/v1/files/not-a-file-id", None, none, 400, "bad_file_id").await;
    expect_client_error(api, Method::GET, &format!("/v1/files/{unknown}"), None, none, 404, "not_found").await;
    expect_client_error(api, Method::DELETE, &format!("/v1/files/{unknown}"), None, none, 404, "not_found").await;
    expect_client_error(api, Method::GET, &format!("/v1/downloads/{}", "z".repeat(64)), None, none, 400, "bad_file_id")
        .await;
    expect_client_error(api, Method::GET, &format!("/v1/files/{unknown}/content"), None, none, 404, "not_found").await;
    expect_client_error(api, Method::POST, "/v1/downloads", json("{{{"), none, 400, "bad_body").await;
    expect_client_error(api, Method::POST, "/v1/downloads", json(r#"{"id": 7}"#), none, 422, "bad_body").await;
    expect_client_error(api, Method::POST, "/v1/downloads", json(r#"{"id": "0123"}"#), none, 400, "bad_file_id").await;
    expect_client_error(api, Method::POST, "/v1/files", json(r#"{"path": "relative/x"}"#), none, 400, "bad_path").await;
    expect_client_error(
        api,
        Method::POST,
        "/v1/files",
        json(r#"{"path": "/nonexistent/shoal/x"}"#),
        none,
        400,
        "bad_path",
    )
    .await;
    let dir = tmp.path().to_str().unwrap().to_owned();
    let body: &'static str = Box::leak(format!(r#"{{"path": "{dir}"}}"#).into_boxed_str());
    expect_client_error(api, Method::POST, "/v1/files", json(body), none, 400, "bad_path").await;
    let huge: &'static str = Box::leak(format!(r#"{{"path": "/{}"}}"#, "a".repeat(100_000)).into_boxed_str());
    expect_client_error(api, Method::POST, "/v1/files", json(huge), none, 413, "bad_body").await;
    expect_client_error(api, Method::PUT, "/v1/files?name=..", json("x"), none, 400, "bad_name").await;
    expect_client_error(api, Method::PUT, "/v1/files", json("x"), none, 400, "bad_query").await;
    expect_client_error(api, Method::GET, "/v1/search?q=", None, none, 400, "bad_query").await;
    expect_client_error(api, Method::GET, "/v1/search", None, none, 400, "bad_query").await;
    let long = format!("/v1/search?q={}", "w".repeat(1000));
    expect_client_error(api, Method::GET, &long, None, none, 400, "bad_query").await;
    expect_client_error(api, Method::GET, "/v2/status", None, none, 404, "not_found").await;
    expect_client_error(api, Method::DELETE, "/v1/status", None, none, 405, "method_not_allowed").await;

    // An upload streamed in, then its content read back whole and by range.
    let upload = tmp.path().join("upload.bin");
    write_random(&upload, 3, 300_001);
    let file = tokio::fs::File::open(&upload).await.unwrap();
    let shared: Shared = api.put_file("/v1/files?name=notes%20v2.bin", file).await.unwrap();
    assert_eq!((shared.name.as_str(), shared.size), ("notes v2.bin", 300_001));
    let original = std::fs::read(&upload).unwrap();
    let range = |spec: &str| [(RANGE, spec.to_owned())];
    for (spec, first, last) in
        [("bytes=0-9", 0, 9), ("bytes=299990-", 299_990, 300_000), ("bytes=-5", 299_996, 300_000)]
    {
        use http_body_util::BodyExt;
        let response = api.stream(&format!("/v1/files/{}/content", shared.id), &range(spec)).await.unwrap();
        assert_eq!(response.status().as_u16(), 206, "{spec}");
        let want_range = format!("bytes {first}-{last}/300001");
        assert_eq!(response.headers()["content-range"].to_str().unwrap(), want_range);
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&bytes[..], &original[first..=last], "{spec}");
    }
    let content = format!("/v1/files/{}/content", shared.id);
    expect_client_error(api, Method::GET, &content, None, &range("bytes=300001-"), 416, "range_not_satisfiable").await;
    expect_client_error(api, Method::GET, &content, None, &range("bytes=0-1,4-5"), 400, "bad_range").await;
    expect_client_error(api, Method::GET, &content, None, &range("lines=1-2"), 400, "bad_range").await;

    // Still alive, and the metrics name what it did.
    assert_eq!(daemon.status().await.files_seeding, 1);
    let response = api.stream("/metrics", &[]).await.unwrap();
    use http_body_util::BodyExt;
    let metrics = String::from_utf8(response.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap();
    assert!(metrics.contains("shoal_files{state=\"seeding\"} 1"), "{metrics}");
    assert!(metrics.contains("# TYPE shoal_wire_bytes_total counter"), "{metrics}");
    // Removing the upload deletes the daemon's record, then it is gone.
    api.delete(&format!("/v1/files/{}", shared.id)).await.unwrap();
    assert!(daemon.file(&shared.id).await.is_none());
}

#[test]
fn the_client_names_an_unreachable_daemon_and_exits_3() {
    // Port 9 (discard) on a loopback address nobody listens on.
    let mut command = Command::new(SHOAL);
    command.args(["--api", "127.0.0.1:9", "status"]);
    let output = run_with_deadline(command);
    assert_eq!(output.status.code(), Some(3));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("127.0.0.1:9") && stderr.contains("cannot reach"), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn content_is_served_while_downloading_the_requested_range_first() {
    use http_body_util::BodyExt;
    let tmp = tempfile::tempdir().unwrap();
    let original = tmp.path().join("stream.bin");
    let size = 16usize << 20;
    write_random(&original, 5, size);
    let seeder = Daemon::start(&tmp.path().join("seeder"), 12, &[], &[]);
    // 16 MiB at 4 MB/s: about four seconds for the whole file.
    let leech = Daemon::start(&tmp.path().join("leech"), 13, &[seeder.listen], &["--max-download", "4000000"]);
    leech.wait_peers(1).await;
    let id = share(&seeder, &original);
    let _: FileView = leech.api.send(Method::POST, "/v1/downloads", &serde_json::json!({ "id": id })).await.unwrap();
    leech.wait_file(&id, "manifest known", |v| v.state == FileState::Downloading).await;

    // The last 100 KiB, asked for first: fetched ahead of the rest.
    let first = size - 100 * 1024;
    let range = [(RANGE, format!("bytes={first}-"))];
    let response = leech.api.stream(&format!("/v1/files/{id}/content"), &range).await.unwrap();
    assert_eq!(response.status().as_u16(), 206);
    let tail = response.into_body().collect().await.unwrap().to_bytes();
    let view = leech.file(&id).await.unwrap();
    let bytes = std::fs::read(&original).unwrap();
    assert_eq!(&tail[..], &bytes[first..], "the range's bytes");
    assert!(view.pieces_held < view.pieces, "the range came before the whole file: {view:?}");

    // `shoal cat` streams the whole file in order while the rest arrives.
    let output = leech.cli(&["cat", &id]);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    assert!(output.stdout == bytes, "cat gives the file's bytes in order");
}
