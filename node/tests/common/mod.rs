//! The harness shared by the daemon tests: real `shoal` daemons as child
//! processes on 127.0.0.x (port 0; each daemon writes the ports it bound
//! to its data dir), driven through the client commands and the API.

// Test setup that fails should panic loudly; each test binary uses a part.
#![allow(clippy::unwrap_used, dead_code, unreachable_pub)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::Duration;

use serde::Deserialize;
use sha2::{Digest, Sha256};
use shoal_node::client::{ApiClient, ClientError};
use shoal_node::control::{FileView, NodeStatus};
use shoal_node::core::content;
use tokio::time::Instant;

pub const SHOAL: &str = env!("CARGO_BIN_EXE_shoal");
/// A guard against a hang, not a performance claim.
pub const DEADLINE: Duration = Duration::from_secs(180);
pub const POLL: Duration = Duration::from_millis(100);

#[derive(Deserialize)]
struct Endpoints {
    listen: SocketAddr,
    api: SocketAddr,
    pid: u32,
}

/// One running daemon; killed when dropped.
pub struct Daemon {
    pub child: Child,
    pub dir: PathBuf,
    pub listen: SocketAddr,
    pub api: ApiClient,
}

impl Daemon {
    /// Start a daemon on `127.0.0.{host}` with its data in `dir`.
    pub fn start(dir: &Path, host: u8, bootstrap: &[SocketAddr], extra: &[&str]) -> Daemon {
        std::fs::create_dir_all(dir).unwrap();
        let endpoints_path = dir.join("endpoints.json");
        let _ = std::fs::remove_file(&endpoints_path);
        let log = std::fs::File::options().create(true).append(true).open(dir.with_extension("log")).unwrap();
        let ip = format!("127.0.0.{host}");
        let mut command = Command::new(SHOAL);
        command
            .args(["daemon", "--listen", &format!("{ip}:0"), "--api", &format!("{ip}:0"), "--data-dir"])
            .arg(dir)
            .args(extra)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        for addr in bootstrap {
            command.args(["--bootstrap", &addr.to_string()]);
        }
        let mut child = command.spawn().unwrap();
        let started = Instant::now();
        loop {
            if let Ok(text) = std::fs::read(&endpoints_path)
                && let Ok(endpoints) = serde_json::from_slice::<Endpoints>(&text)
                && endpoints.pid == child.id()
            {
                return Daemon {
                    child,
                    dir: dir.to_path_buf(),
                    listen: endpoints.listen,
                    api: ApiClient::new(endpoints.api),
                };
            }
            if let Ok(Some(status)) = child.try_wait() {
                panic!(
                    "daemon in {} exited at start: {status}; log {}",
                    dir.display(),
                    dir.with_extension("log").display()
                );
            }
            assert!(started.elapsed() < DEADLINE, "daemon in {} did not start", dir.display());
            std::thread::sleep(POLL);
        }
    }

    /// `shoal --api <this daemon> ARGS...`, to completion.
    pub fn cli(&self, args: &[&str]) -> Output {
        let mut command = Command::new(SHOAL);
        command.args(["--api", &self.api.addr().to_string()]).args(args);
        run_with_deadline(command)
    }

    /// Hard kill (SIGKILL): nothing is flushed or closed politely.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub async fn file(&self, id: &str) -> Option<FileView> {
        match self.api.get::<FileView>(&format!("/v1/files/{id}")).await {
            Ok(view) => Some(view),
            Err(ClientError::Api { status: 404, .. }) => None,
            Err(error) => panic!("GET /v1/files/{id}: {error}"),
        }
    }

    pub async fn status(&self) -> NodeStatus {
        self.api.get("/v1/status").await.unwrap()
    }

    /// Poll the file until `done` holds.
    pub async fn wait_file(&self, id: &str, what: &str, done: impl Fn(&FileView) -> bool) -> FileView {
        let started = Instant::now();
        loop {
            if let Some(view) = self.file(id).await
                && done(&view)
            {
                return view;
            }
            assert!(started.elapsed() < DEADLINE, "{what}: not reached on {}", self.dir.display());
            tokio::time::sleep(POLL).await;
        }
    }

    pub async fn wait_peers(&self, at_least: usize) {
        let started = Instant::now();
        while self.status().await.peers < at_least {
            assert!(started.elapsed() < DEADLINE, "{} never had {at_least} peers", self.dir.display());
            tokio::time::sleep(POLL).await;
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn run_with_deadline(mut command: Command) -> Output {
    use std::io::Read;
    let mut child = command.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    // Drained while it runs: a full pipe would stall the child.
    let drain = |mut pipe: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut bytes = Vec::new();
            pipe.read_to_end(&mut bytes).unwrap();
            bytes
        })
    };
    let stdout = drain(Box::new(child.stdout.take().unwrap()));
    let stderr = drain(Box::new(child.stderr.take().unwrap()));
    let status = wait_child(&mut child);
    Output { status, stdout: stdout.join().unwrap(), stderr: stderr.join().unwrap() }
}

pub fn wait_child(child: &mut Child) -> ExitStatus {
    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if started.elapsed() > DEADLINE {
            let _ = child.kill();
            panic!("a shoal command did not finish");
        }
        std::thread::sleep(POLL);
    }
}

pub fn stdout(output: &Output) -> String {
    assert!(output.status.success(), "shoal failed ({}): {}", output.status, String::from_utf8_lossy(&output.stderr));
    String::from_utf8(output.stdout.clone()).unwrap()
}

pub fn sha256_file(path: &Path) -> [u8; 32] {
    use std::io::Read;
    let mut hasher = Sha256::new();
    let mut file = std::fs::File::open(path).unwrap();
    let mut buffer = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buffer).unwrap();
        if n == 0 {
            break;
        }
        hasher.update(&buffer[..n]);
    }
    hasher.finalize().into()
}

/// A file of seeded random bytes.
pub fn write_random(path: &Path, seed: u64, bytes: usize) {
    std::fs::write(path, content::synthetic_bytes(seed, bytes)).unwrap();
}

/// Share `path` on `daemon` with the CLI; returns the printed id.
pub fn share(daemon: &Daemon, path: &Path) -> String {
    let id = stdout(&daemon.cli(&["share", path.to_str().unwrap()])).trim().to_owned();
    assert_eq!(id.len(), 64, "share prints a file id: {id:?}");
    id
}
