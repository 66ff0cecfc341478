//! `shoal`: the Shoal node. `shoal daemon` runs a node; the client
//! commands (share, get, cat, search, ls, peers, rm, status) arrive with
//! the REST API.
//!
//! Errors are one line on stderr with a distinct exit code: 2 for bad
//! flags (clap), 1 for a node that cannot start (unusable port, data dir
//! or config).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use shoal_node::core::config::Config;
use shoal_node::core::node::{Node, NodeEvent};
use shoal_node::core::wire::Contact;
use shoal_node::driver::{Command, Driver, DriverConfig};
use shoal_node::identity::Identity;
use shoal_node::store::DiskStore;
use shoal_node::transport::TokioTcp;
use tokio::sync::mpsc;

#[derive(Parser)]
#[command(name = "shoal", version, about = "Shoal: peer-to-peer file sharing node")]
struct Cli {
    #[command(subcommand)]
    command: Commands,
}

#[derive(Subcommand)]
enum Commands {
    /// Run a node: join the network, serve shared files, fetch requested ones.
    Daemon(DaemonArgs),
}

#[derive(Args)]
struct DaemonArgs {
    /// Address to accept peer connections on.
    #[arg(long, default_value = "0.0.0.0:4100")]
    listen: SocketAddr,
    /// Address of the local REST API (not served by this build yet).
    #[arg(long, default_value = "127.0.0.1:4101")]
    api: SocketAddr,
    /// Directory for the identity key, manifests and downloads
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

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let result = match cli.command {
        Commands::Daemon(args) => daemon(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
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

fn daemon(args: DaemonArgs) -> Result<(), String> {
    let config = load_config(args.config.as_deref())?;
    let dir = data_dir(args.data_dir)?;
    // Drawn up front: a node must never fall back to a predictable key.
    let fresh_secret = random_seed()?;
    let identity = Identity::load_or_create(&dir, || fresh_secret).map_err(|e| e.to_string())?;
    // Store errors name their paths.
    let store = DiskStore::open(&dir).map_err(|e| e.to_string())?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the runtime: {e}"))?;
    runtime.block_on(async move {
        let mut driver_config = DriverConfig::new(args.listen);
        driver_config.frame_bytes_max = config.frame_bytes_max;
        driver_config.max_upload_bytes_per_s = args.max_upload;
        driver_config.max_download_bytes_per_s = args.max_download;
        let driver = Driver::bind(TokioTcp, identity.clone(), driver_config).await.map_err(|e| e.to_string())?;
        let local = Contact { id: identity.node_id(), addr: driver.local_addr() };
        let node = Node::new(config, local, random_seed()?, driver.now()).map_err(|e| format!("config: {e}"))?;
        tracing::info!(node = %identity.node_id(), listen = %driver.local_addr(), data_dir = %dir.display(), "listening");
        tracing::warn!(api = %args.api, "the REST API is not served by this build yet");
        let (commands, rx) = mpsc::channel(64);
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
            NodeEvent::Exchange(e) => tracing::debug!(?e, "exchange"),
            other => tracing::trace!(?other, "event"),
        });
        let (counters, _store) = driver.run(node, store, rx, Some(observer), random_seed()?).await;
        tracing::info!(?counters, "stopped");
        drop(commands);
        Ok(())
    })
}
