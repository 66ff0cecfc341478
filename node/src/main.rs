//! `shoal`: the Shoal node. `shoal daemon` runs a node and serves its REST
//! API; the client commands (share, get, cat, search, ls, peers, status,
//! rm) talk to that API.
//!
//! Errors are one line on stderr with a distinct exit code: 2 for bad
//! flags (clap), 3 when the daemon cannot be reached, 1 for everything
//! else (a node that cannot start, a request the daemon refused, a
//! download that failed or did not verify).

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use http_body_util::BodyExt;
use hyper::Method;
use serde::Serialize;
use shoal_node::api::{self, ApiConfig, ApiState};
use shoal_node::client::{ApiClient, ClientError, encode_query_value};
use shoal_node::control::{FileState, FileView, NodeStatus, PeerView, SearchHit, Shared};
use shoal_node::core::config::Config;
use shoal_node::core::content::{self, Layout};
use shoal_node::core::ids::FileId;
use shoal_node::core::manifest::validate_name;
use shoal_node::core::node::{Node, NodeEvent};
use shoal_node::core::wire::Contact;
use shoal_node::driver::{Command, Driver, DriverConfig};
use shoal_node::identity::Identity;
use shoal_node::store::DiskStore;
use shoal_node::transport::TokioTcp;
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;

/// Commands queued for the driver loop (API requests wait beyond this).
const COMMAND_QUEUE_MAX: usize = 64;
/// Bytes a connection's writer gathers before a system call.
const WRITE_BUFFER_BYTES: usize = 512 * 1024;
/// How often `get` and `cat` ask the daemon for progress.
const PROGRESS_POLL_INTERVAL: Duration = Duration::from_millis(250);
/// The file the daemon writes its bound addresses to, in its data dir.
const ENDPOINTS_FILE: &str = "endpoints.json";

#[derive(Parser)]
#[command(
    name = "shoal",
    version,
    about = "Shoal: peer-to-peer file sharing",
    long_about = "Shoal: peer-to-peer file sharing.\n\n\
        `shoal daemon` runs a node. The other commands talk to a running daemon's \
        local REST API (--api, default 127.0.0.1:4101).\n\n\
        Exit codes: 0 success, 1 failure, 2 bad flags, 3 daemon unreachable.",
    after_help = "Examples:\n  \
        shoal daemon --data-dir ~/shoal --bootstrap 203.0.113.7:4100\n  \
        shoal share ./holiday.mp4          # prints the file id\n  \
        shoal get 3f2a...e9 -o holiday.mp4\n  \
        shoal search holiday"
)]
struct Cli {
    /// Address of the daemon's REST API (the daemon serves it there).
    #[arg(long, global = true, default_value = "127.0.0.1:4101", value_name = "ADDR")]
    api: SocketAddr,
    /// Print machine-readable JSON instead of text.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Commands,
}

#[derive(Subcommand)]
enum Commands {
    /// Run a node: join the network, serve shared files, fetch requested ones.
    Daemon(DaemonArgs),
    /// Share a local file (served in place; prints its file id).
    Share {
        /// The file.
        path: PathBuf,
        /// Name to publish instead of the file's own.
        #[arg(long)]
        name: Option<String>,
    },
    /// Download a file by id; exits 0 only once it is complete and verified.
    Get {
        /// The file id (64 hex digits).
        file: String,
        /// Where to write it [default: its published name, in the current directory].
        #[arg(short, long, value_name = "PATH")]
        output: Option<PathBuf>,
        /// Leave it in the daemon only (no local copy).
        #[arg(long, conflicts_with = "output")]
        no_output: bool,
    },
    /// Stream a file to stdout in order, while it downloads.
    Cat {
        /// The file id.
        file: String,
    },
    /// Search the network by words of a file name.
    Search {
        /// The words.
        #[arg(required = true)]
        words: Vec<String>,
    },
    /// List the files on the daemon, with their progress.
    Ls,
    /// List the connected peers.
    Peers,
    /// Show the node's state and counters.
    Status,
    /// Stop sharing or fetching a file and delete the daemon's copy (a
    /// shared original is never deleted).
    Rm {
        /// The file id.
        file: String,
    },
}

#[derive(Args)]
struct DaemonArgs {
    /// Address to accept peer connections on.
    #[arg(long, default_value = "0.0.0.0:4100")]
    listen: SocketAddr,
    /// Directory for the identity key, manifests, downloads and uploads
    /// [default: the platform's data directory].
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// A peer to join the network through (repeatable).
    #[arg(long, value_name = "ADDR")]
    bootstrap: Vec<SocketAddr>,
    /// Upload limit, bytes per second.
    #[arg(long, value_name = "BYTES_PER_S")]
    max_upload: Option<u64>,
    /// Download limit, bytes per second.
    #[arg(long, value_name = "BYTES_PER_S")]
    max_download: Option<u64>,
    /// Protocol limits and timings, a TOML file (every key optional).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
}

/// How a command failed.
enum Failure {
    /// The daemon is not there (exit 3).
    Unreachable(String),
    /// Anything else (exit 1).
    Other(String),
}

impl From<ClientError> for Failure {
    fn from(error: ClientError) -> Self {
        match error {
            ClientError::Unreachable { .. } => Failure::Unreachable(error.to_string()),
            other => Failure::Other(other.to_string()),
        }
    }
}

impl From<String> for Failure {
    fn from(message: String) -> Self {
        Failure::Other(message)
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let result = match cli.command {
        Commands::Daemon(args) => daemon(args, cli.api).map_err(Failure::Other),
        command => client(command, ApiClient::new(cli.api), cli.json),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Unreachable(message)) => {
            eprintln!("shoal: error: {message}");
            ExitCode::from(3)
        }
        Err(Failure::Other(message)) => {
            eprintln!("shoal: error: {message}");
            ExitCode::from(1)
        }
    }
}

fn random_seed() -> Result<[u8; 32], String> {
    let mut seed = [0u8; 32];
    getrandom::fill(&mut seed).map_err(|e| format!("no OS randomness: {e}"))?;
    Ok(seed)
}

fn load_config(path: Option<&Path>) -> Result<Config, String> {
    let Some(path) = path else { return Ok(Config::default()) };
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read config {}: {e}", path.display()))?;
    let config: Config = toml::from_str(&text).map_err(|e| format!("config {}: {}", path.display(), e.message()))?;
    config.validate().map_err(|e| format!("config {}: {e}", path.display()))?;
    Ok(config)
}

fn data_dir(arg: Option<PathBuf>) -> Result<PathBuf, String> {
    let dir = match arg {
        Some(dir) => dir,
        None => directories::ProjectDirs::from("", "", "shoal")
            .map(|dirs| dirs.data_dir().to_path_buf())
            .ok_or("no home directory: pass --data-dir")?,
    };
    std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create data dir {}: {e}", dir.display()))?;
    Ok(dir)
}

/// The addresses a daemon bound, written to its data dir so scripts and
/// tests can start it on port 0.
#[derive(Serialize)]
struct Endpoints {
    listen: SocketAddr,
    api: SocketAddr,
    pid: u32,
}

fn write_endpoints(dir: &Path, endpoints: &Endpoints) -> Result<(), String> {
    let path = dir.join(ENDPOINTS_FILE);
    let tmp = dir.join(format!("{ENDPOINTS_FILE}.tmp"));
    let text = serde_json::to_vec(endpoints).map_err(|e| e.to_string())?;
    std::fs::write(&tmp, text)
        .and_then(|()| std::fs::rename(&tmp, &path))
        .map_err(|e| format!("cannot write {}: {e}", path.display()))
}

fn daemon(args: DaemonArgs, api_addr: SocketAddr) -> Result<(), String> {
    let config = load_config(args.config.as_deref())?;
    let dir = data_dir(args.data_dir)?;
    // Drawn up front: a node must never fall back to a predictable key.
    let fresh_secret = random_seed()?;
    let identity = Identity::load_or_create(&dir, || fresh_secret).map_err(|e| e.to_string())?;
    // Store errors name their paths.
    let store = DiskStore::open(&dir).map_err(|e| e.to_string())?;
    for issue in store.load_issues() {
        tracing::warn!(path = %issue.path.display(), error = %issue.error, recovery = ?issue.recovery, "store");
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the runtime: {e}"))?;
    runtime.block_on(async move {
        let mut driver_config = DriverConfig::new(args.listen);
        driver_config.frame_bytes_max = config.frame_bytes_max;
        driver_config.max_upload_bytes_per_s = args.max_upload;
        driver_config.max_download_bytes_per_s = args.max_download;
        // Over TCP a block's data goes out by reference in a writev, so a
        // larger gather costs no copy: up to 32 blocks per system call
        // (the 64 slices tokio gives one writev) instead of 8. A 1 GiB
        // loopback transfer: ~20% less CPU in the seeder.
        driver_config.write_buffer_bytes = WRITE_BUFFER_BYTES;
        let driver = Driver::bind(TokioTcp, identity.clone(), driver_config).await.map_err(|e| e.to_string())?;
        let api_listener = tokio::net::TcpListener::bind(api_addr)
            .await
            .map_err(|e| format!("cannot serve the API on {api_addr}: {e}"))?;
        let api_bound = api_listener.local_addr().map_err(|e| format!("API address {api_addr}: {e}"))?;
        if !api_bound.ip().is_loopback() {
            tracing::warn!(api = %api_bound, "the API has no authentication and is reachable beyond this machine");
        }
        let local = Contact { id: identity.node_id(), addr: driver.local_addr() };
        let node = Node::new(config, local, random_seed()?, driver.now()).map_err(|e| format!("config: {e}"))?;
        let (commands, rx) = mpsc::channel(COMMAND_QUEUE_MAX);
        let state = ApiState::new(commands.clone(), driver.stored_pieces(), ApiConfig::new(&dir));
        let (api_stop, api_stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(async move {
            let stop = async {
                let _ = api_stopped.await;
            };
            axum::serve(api_listener, api::router(state)).with_graceful_shutdown(stop).await
        });
        write_endpoints(&dir, &Endpoints { listen: driver.local_addr(), api: api_bound, pid: std::process::id() })?;
        tracing::info!(
            node = %identity.node_id(), listen = %driver.local_addr(), api = %api_bound,
            data_dir = %dir.display(), "listening"
        );
        if !args.bootstrap.is_empty() {
            let _ = commands.send(Command::Bootstrap(args.bootstrap)).await;
        }
        let shutdown = commands.clone();
        tokio::spawn(async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                tracing::info!("shutting down");
                let _ = shutdown.send(Command::Shutdown).await;
            }
        });
        let observer = Box::new(|_at, event: &NodeEvent| match event {
            NodeEvent::Bootstrapped { contacts } => tracing::info!(contacts, "bootstrapped"),
            NodeEvent::DownloadStarted { file, manifest } => {
                tracing::info!(%file, name = %manifest.name, size = manifest.size, "download started");
            }
            NodeEvent::ManifestNotFound { file } => tracing::warn!(%file, "no manifest found"),
            NodeEvent::Exchange(shoal_node::core::exchange::ExchangeEvent::DownloadComplete { file }) => {
                tracing::info!(%file, "download complete");
            }
            NodeEvent::Exchange(e) => tracing::debug!(?e, "exchange"),
            other => tracing::trace!(?other, "event"),
        });
        // The loop runs as a task on the runtime's workers, not on this
        // thread: its hand-offs to and from the connection tasks are then
        // wakes within the scheduler rather than a futex wake of another
        // thread per frame (a 1 GiB transfer: ~45k context switches per
        // daemon before, ~7-12k after). Its store calls are short (piece
        // writes and syncs run on the blocking pool), and while one holds
        // a worker the other workers keep the connections going.
        let seed = random_seed()?;
        let looping = tokio::spawn(driver.run(node, store, rx, Some(observer), seed));
        let (counters, _store) = looping.await.map_err(|e| format!("the driver loop failed: {e}"))?;
        let _ = api_stop.send(());
        let _ = server.await;
        tracing::info!(?counters, "stopped");
        drop(commands);
        Ok(())
    })
}

fn client(command: Commands, api: ApiClient, json: bool) -> Result<(), Failure> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Failure::Other(format!("cannot start the runtime: {e}")))?;
    runtime.block_on(async move {
        match command {
            Commands::Daemon(_) => Ok(()),
            Commands::Share { path, name } => share(api, json, &path, name).await,
            Commands::Get { file, output, no_output } => get(api, json, &file, output, no_output).await,
            Commands::Cat { file } => cat(api, &file).await,
            Commands::Search { words } => search(api, json, &words.join(" ")).await,
            Commands::Ls => ls(api, json).await,
            Commands::Peers => peers(api, json).await,
            Commands::Status => status(api, json).await,
            Commands::Rm { file } => rm(api, json, &file).await,
        }
    })
}

fn parse_file(text: &str) -> Result<FileId, Failure> {
    text.trim().parse().map_err(|_| Failure::Other(format!("{text:?} is not a file id (64 hex digits)")))
}

fn print_json(value: &impl Serialize) -> Result<(), Failure> {
    let text = serde_json::to_string_pretty(value).map_err(|e| Failure::Other(e.to_string()))?;
    println!("{text}");
    Ok(())
}

async fn share(api: ApiClient, json: bool, path: &Path, name: Option<String>) -> Result<(), Failure> {
    // The daemon has its own working directory: send an absolute path.
    let path = std::fs::canonicalize(path).map_err(|e| Failure::Other(format!("{}: {e}", path.display())))?;
    let body = serde_json::json!({ "path": path, "name": name });
    let shared: Shared = api.send(Method::POST, "/v1/files", &body).await?;
    if json {
        return print_json(&shared);
    }
    println!("{}", shared.id);
    Ok(())
}

/// Start (or join) a download and wait until the daemon holds every
/// piece, showing progress on a terminal.
async fn wait_complete(api: ApiClient, file: &FileId, show_progress: bool) -> Result<FileView, Failure> {
    let mut view: FileView =
        api.send(Method::POST, "/v1/downloads", &serde_json::json!({ "id": file.to_string() })).await?;
    let bar = if show_progress {
        let bar = indicatif::ProgressBar::new(0);
        let style = indicatif::ProgressStyle::with_template(
            "{spinner} {msg:20} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}",
        )
        .map_err(|e| Failure::Other(e.to_string()))?
        .progress_chars("=> ");
        bar.set_style(style);
        bar
    } else {
        indicatif::ProgressBar::hidden()
    };
    loop {
        match view.state {
            FileState::NotFound => {
                bar.abandon();
                return Err(Failure::Other(format!("no valid manifest for {file} was found in the network")));
            }
            FileState::Complete => {
                bar.set_length(view.size);
                bar.set_position(view.bytes_held);
                bar.finish_with_message(format!("{} complete", short(&view.name)));
                return Ok(view);
            }
            FileState::FindingManifest => bar.set_message("finding manifest"),
            FileState::Downloading => {
                bar.set_length(view.size);
                bar.set_position(view.bytes_held);
                bar.set_message(format!("{} peers", view.peers));
            }
        }
        tokio::time::sleep(PROGRESS_POLL_INTERVAL).await;
        view = api.get(&format!("/v1/downloads/{file}")).await?;
    }
}

fn short(name: &str) -> String {
    if name.chars().count() <= 20 { name.to_owned() } else { name.chars().take(19).chain(['…']).collect() }
}

async fn get(api: ApiClient, json: bool, text: &str, output: Option<PathBuf>, no_output: bool) -> Result<(), Failure> {
    let file = parse_file(text)?;
    let view = wait_complete(api, &file, !json && std::io::stderr().is_terminal()).await?;
    let path = if no_output {
        None
    } else {
        let path = match output {
            Some(path) => path,
            None => {
                validate_name(&view.name).map_err(|e| Failure::Other(format!("published name: {e}; pass -o")))?;
                PathBuf::from(&view.name)
            }
        };
        save(api, &file, &view, &path).await?;
        Some(path)
    };
    if json {
        #[derive(Serialize)]
        struct Got<'a> {
            file: &'a FileView,
            path: Option<&'a Path>,
            verified: bool,
        }
        return print_json(&Got { file: &view, path: path.as_deref(), verified: true });
    }
    match path {
        Some(path) => println!("{} -> {} ({} bytes, verified)", file, path.display(), view.size),
        None => println!("{file} complete in the daemon ({} bytes)", view.size),
    }
    Ok(())
}

/// Copy a complete file out of the daemon to `path`, then hash the copy:
/// it must have the file id asked for.
async fn save(api: ApiClient, file: &FileId, view: &FileView, path: &Path) -> Result<(), Failure> {
    let io = |e: std::io::Error| Failure::Other(format!("{}: {e}", path.display()));
    let response = api.stream(&format!("/v1/files/{file}/content"), &[]).await?;
    let mut body = response.into_body();
    let mut out = tokio::fs::File::create(path).await.map_err(io)?;
    let mut written = 0u64;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| Failure::Other(format!("download from the daemon interrupted: {e}")))?;
        if let Ok(data) = frame.into_data() {
            written += data.len() as u64;
            out.write_all(&data).await.map_err(io)?;
        }
    }
    out.sync_all().await.map_err(io)?;
    if written != view.size {
        return Err(Failure::Other(format!("the daemon sent {written} of {} bytes", view.size)));
    }
    let layout = Layout::new(view.size, view.piece_bytes).map_err(|e| Failure::Other(e.to_string()))?;
    let check = path.to_path_buf();
    let content = tokio::task::spawn_blocking(move || {
        std::fs::File::open(&check)
            .map_err(|e| e.to_string())
            .and_then(|f| content::hash_reader(f, layout).map_err(|e| e.to_string()))
    })
    .await
    .map_err(|e| Failure::Other(e.to_string()))?
    .map_err(|e| Failure::Other(format!("{}: {e}", path.display())))?;
    if content.file_id != *file {
        return Err(Failure::Other(format!("{} does not hash to {file}", path.display())));
    }
    Ok(())
}

async fn cat(api: ApiClient, text: &str) -> Result<(), Failure> {
    let file = parse_file(text)?;
    let mut view: FileView =
        api.send(Method::POST, "/v1/downloads", &serde_json::json!({ "id": file.to_string() })).await?;
    while view.state == FileState::FindingManifest {
        tokio::time::sleep(PROGRESS_POLL_INTERVAL).await;
        view = api.get(&format!("/v1/downloads/{file}")).await?;
    }
    if view.state == FileState::NotFound {
        return Err(Failure::Other(format!("no valid manifest for {file} was found in the network")));
    }
    let response = api.stream(&format!("/v1/files/{file}/content"), &[]).await?;
    let mut body = response.into_body();
    let mut stdout = tokio::io::stdout();
    let mut written = 0u64;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| Failure::Other(format!("stream interrupted: {e}")))?;
        if let Ok(data) = frame.into_data() {
            written += data.len() as u64;
            if let Err(error) = stdout.write_all(&data).await {
                // `shoal cat ID | head` closes the pipe: not a failure.
                if error.kind() == std::io::ErrorKind::BrokenPipe {
                    return Ok(());
                }
                return Err(Failure::Other(format!("stdout: {error}")));
            }
        }
    }
    stdout.flush().await.map_err(|e| Failure::Other(format!("stdout: {e}")))?;
    if written != view.size {
        return Err(Failure::Other(format!("stream ended after {written} of {} bytes", view.size)));
    }
    Ok(())
}

async fn search(api: ApiClient, json: bool, words: &str) -> Result<(), Failure> {
    let hits: Vec<SearchHit> = api.get(&format!("/v1/search?q={}", encode_query_value(words))).await?;
    if json {
        return print_json(&hits);
    }
    if hits.is_empty() {
        eprintln!("no match for {words:?}");
    }
    for hit in hits {
        println!("{}  {:>12}  {}", hit.id, hit.size, hit.name);
    }
    Ok(())
}

fn state_name(state: FileState) -> &'static str {
    match state {
        FileState::FindingManifest => "finding",
        FileState::NotFound => "not-found",
        FileState::Downloading => "downloading",
        FileState::Complete => "complete",
    }
}

async fn ls(api: ApiClient, json: bool) -> Result<(), Failure> {
    let files: Vec<FileView> = api.get("/v1/files").await?;
    if json {
        return print_json(&files);
    }
    for f in files {
        let percent = if f.size == 0 { 100.0 } else { f.bytes_held as f64 * 100.0 / f.size as f64 };
        let kind = if f.shared { "shared" } else { state_name(f.state) };
        println!("{}  {:<11} {:>5.1}%  {:>12}  {:>3} peers  {}", f.id, kind, percent, f.size, f.peers, f.name);
    }
    Ok(())
}

async fn peers(api: ApiClient, json: bool) -> Result<(), Failure> {
    let peers: Vec<PeerView> = api.get("/v1/peers").await?;
    if json {
        return print_json(&peers);
    }
    for p in peers {
        let direction = if p.outbound { "out" } else { "in" };
        println!("{}  {:<21}  {:<3}  {}s", p.node_id, p.addr, direction, p.connected_s);
    }
    Ok(())
}

async fn status(api: ApiClient, json: bool) -> Result<(), Failure> {
    let status: NodeStatus = api.get("/v1/status").await?;
    if json {
        return print_json(&status);
    }
    let listen = status.listen.map(|a| a.to_string()).unwrap_or_default();
    println!("node        {}", status.node_id);
    println!("listen      {listen}");
    println!("uptime      {}s", status.uptime_s);
    println!("peers       {} connected, {} in the routing table", status.peers, status.routing_contacts);
    println!("files       {} seeding, {} downloading", status.files_seeding, status.files_downloading);
    println!("pieces      {} verified, {} failed", status.pieces_verified, status.pieces_failed);
    for line in &status.traffic {
        println!("{:<11} {} B sent, {} B received", line.kind, line.sent_bytes, line.received_bytes);
    }
    Ok(())
}

async fn rm(api: ApiClient, json: bool, text: &str) -> Result<(), Failure> {
    let file = parse_file(text)?;
    api.delete(&format!("/v1/files/{file}")).await?;
    if json {
        return print_json(&serde_json::json!({ "removed": file.to_string() }));
    }
    println!("removed {file}");
    Ok(())
}
