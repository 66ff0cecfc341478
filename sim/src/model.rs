//! The typed scenario model both engines run: host classes, files,
//! arrivals, churn, partitions, workloads, protocol overrides and
//! expectations.
//!
//! It deserializes from TOML (the scenarios crate's file format) with every
//! struct `deny_unknown_fields`, so a misspelt key is an error naming it.
//! Durations are strings with a unit (`"250ms"`, `"10s"`, `"2m"`) or plain
//! seconds; sizes are bytes or strings (`"8 MiB"`, `"500 KB"`); rates are
//! bytes per second or strings (`"2 MB/s"`, `"10 Mbit/s"`).
//!
//! [`Scenario::plan`] turns a scenario and its seed into a [`Plan`]: every
//! host with its class, region and capacities, and every action (boot,
//! crash, restart, share, get, search, lookup, partition, heal) at its
//! simulated time. Random draws (arrivals, session lengths, lookup targets)
//! happen there, from the scenario seed, so both engines run the same plan.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use rand::rngs::ChaCha8Rng;
use rand::{RngExt, SeedableRng};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use shoal_node::core::config::Config;
use shoal_node::core::ids::NodeId;
use shoal_node::core::scheduler::PickPolicy;

/// Hosts one scenario may have (bounds the plan's memory; the des engine
/// is meant for 10^5).
pub const HOSTS_MAX: usize = 200_000;
/// Actions one plan may hold (churn and lookups generate many).
pub const ACTIONS_MAX: usize = 5_000_000;
/// Largest simulated file.
pub const FILE_BYTES_MAX: u64 = 4 << 30;

/// A simulated duration (see module docs for the accepted forms).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct Dur(pub Duration);

/// A size in bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct Size(pub u64);

/// A rate in bytes per second.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct Rate(pub u64);

/// Which engine runs a scenario.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum EngineKind {
    /// The real node driver in turmoil's simulated network.
    #[default]
    Turmoil,
    /// The discrete-event engine driving the core machines directly.
    Des,
}

impl fmt::Display for EngineKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Turmoil => "turmoil",
            Self::Des => "des",
        })
    }
}

/// A whole scenario.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    /// Its name (the catalog name or the file stem).
    #[serde(default)]
    pub name: String,
    /// One line saying what it shows.
    #[serde(default)]
    pub description: String,
    /// Which engine runs it.
    #[serde(default)]
    pub engine: EngineKind,
    /// The seed every random draw derives from.
    #[serde(default)]
    pub seed: u64,
    /// Simulated deadline: the run stops here if its goal is not met sooner.
    pub duration: Dur,
    /// Latencies.
    #[serde(default)]
    pub network: Network,
    /// Host classes, in order; host indices count through them.
    pub hosts: Vec<HostClass>,
    /// Files.
    #[serde(default)]
    pub files: Vec<FileSpec>,
    /// Who downloads what.
    #[serde(default)]
    pub downloads: Vec<DownloadSpec>,
    /// Random crash/restart cycles per class.
    #[serde(default)]
    pub churn: Vec<ChurnSpec>,
    /// Crashes at fixed times.
    #[serde(default)]
    pub crashes: Vec<CrashSpec>,
    /// Network splits.
    #[serde(default)]
    pub partitions: Vec<PartitionSpec>,
    /// Random DHT node lookups.
    #[serde(default)]
    pub lookups: Option<LookupSpec>,
    /// Name searches.
    #[serde(default)]
    pub searches: Vec<SearchSpec>,
    /// Protocol parameters that differ from the defaults.
    #[serde(default)]
    pub protocol: ProtocolOverrides,
    /// What must hold at the end (each becomes a check).
    #[serde(default)]
    pub expect: Expectations,
}

/// One-way latencies between hosts.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Network {
    /// Latency between any two hosts when no regions are given.
    #[serde(default = "default_latency")]
    pub latency: Dur,
    /// Extra latency drawn uniformly in `[0, jitter]` per message.
    #[serde(default)]
    pub jitter: Dur,
    /// Region names; a host class names its region.
    #[serde(default)]
    pub regions: Vec<String>,
    /// `matrix[a][b]`: latency from region a to region b.
    #[serde(default)]
    pub matrix: Vec<Vec<Dur>>,
}

fn default_latency() -> Dur {
    Dur(Duration::from_millis(10))
}

impl Default for Network {
    fn default() -> Self {
        Self { latency: default_latency(), jitter: Dur::default(), regions: Vec::new(), matrix: Vec::new() }
    }
}

/// What a host does besides following the protocol.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Behaviour {
    /// Follows the protocol.
    #[default]
    Honest,
    /// Flips a byte of every block it serves.
    Corrupt,
}

/// A class of identical hosts.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostClass {
    /// Unique name (`seed`, `leechers`…); hosts are `name-0`, `name-1`….
    pub name: String,
    /// How many.
    pub count: usize,
    /// Its region (one of `network.regions`); the first when omitted.
    #[serde(default)]
    pub region: Option<String>,
    /// Uplink capacity; unlimited when omitted.
    #[serde(default)]
    pub uplink: Option<Rate>,
    /// Downlink capacity; unlimited when omitted.
    #[serde(default)]
    pub downlink: Option<Rate>,
    /// Honest or corrupting.
    #[serde(default)]
    pub behaviour: Behaviour,
    /// When its hosts come up (all at t = 0 by default).
    #[serde(default)]
    pub arrival: Arrival,
}

/// When the hosts of a class arrive.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Arrival {
    /// All at once.
    At {
        /// When.
        #[serde(default)]
        at: Dur,
    },
    /// A Poisson process: exponential gaps with mean `1 / rate_per_s`.
    Poisson {
        /// Arrivals per simulated second.
        rate_per_s: f64,
        /// When the first may arrive.
        #[serde(default)]
        from: Dur,
    },
    /// Listed times, one per host (the last repeats for any extra host).
    List {
        /// The times.
        times: Vec<Dur>,
    },
}

impl Default for Arrival {
    fn default() -> Self {
        Self::At { at: Dur::default() }
    }
}

/// A file in the scenario; its bytes are synthetic, from the seed.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileSpec {
    /// Its name (searchable words).
    pub name: String,
    /// Its length.
    pub size: Size,
    /// Classes whose hosts hold it from the start (or from `share_at`).
    pub seeders: Vec<String>,
    /// Piece size, instead of the content model's rule.
    #[serde(default)]
    pub piece_size: Option<Size>,
    /// When the seeders share it (at their arrival by default).
    #[serde(default)]
    pub share_at: Option<Dur>,
}

/// A class fetching a file.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DownloadSpec {
    /// The file's name.
    pub file: String,
    /// The class whose every host fetches it.
    pub by: String,
    /// How long after its arrival each host asks (time to join the DHT).
    #[serde(default = "default_ask_after")]
    pub after: Dur,
}

fn default_ask_after() -> Dur {
    Dur(Duration::from_secs(3))
}

/// A distribution of durations.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Dist {
    /// Always this.
    Fixed {
        /// The value.
        value: Dur,
    },
    /// Uniform in `[min, max]`.
    Uniform {
        /// Lower end.
        min: Dur,
        /// Upper end.
        max: Dur,
    },
    /// Exponential with this mean (memoryless sessions).
    Exponential {
        /// Mean.
        mean: Dur,
    },
    /// Pareto with scale (minimum) and shape: the heavy-tailed session
    /// lengths measured in deployed P2P systems.
    Pareto {
        /// Minimum value.
        scale: Dur,
        /// Tail index (> 0; the mean is finite above 1).
        shape: f64,
    },
}

impl Dist {
    fn validate(&self, what: &str) -> Result<(), String> {
        match self {
            Self::Uniform { min, max } if min > max => Err(format!("{what}: uniform min is above max")),
            Self::Pareto { shape, .. } if !(shape.is_finite() && *shape > 0.0) => {
                Err(format!("{what}: pareto shape must be a positive number"))
            }
            Self::Exponential { mean } if mean.0.is_zero() => Err(format!("{what}: exponential mean must be > 0")),
            _ => Ok(()),
        }
    }

    /// One draw.
    pub fn sample(&self, rng: &mut ChaCha8Rng) -> Duration {
        // In (0, 1]: never 0, so logarithms and powers stay finite.
        let unit = 1.0 - rng.random::<f64>();
        let secs = match self {
            Self::Fixed { value } => return value.0,
            Self::Uniform { min, max } => return min.0 + (max.0 - min.0).mul_f64(1.0 - unit),
            Self::Exponential { mean } => -mean.0.as_secs_f64() * unit.ln(),
            Self::Pareto { scale, shape } => scale.0.as_secs_f64() / unit.powf(1.0 / shape),
        };
        Duration::try_from_secs_f64(secs.min(1e9)).unwrap_or(Duration::from_secs(1_000_000_000))
    }
}

/// Hosts of a class alternate between up (a session) and down.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChurnSpec {
    /// The class.
    pub class: String,
    /// Session length (time up before a crash).
    pub session: Dist,
    /// Time down before the restart; never restarts when omitted.
    #[serde(default)]
    pub downtime: Option<Dist>,
}

/// One host crashing at a fixed time.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CrashSpec {
    /// Its class.
    pub class: String,
    /// Its index in the class.
    #[serde(default)]
    pub index: usize,
    /// When it crashes.
    pub at: Dur,
    /// When it restarts with its store; never when omitted.
    #[serde(default)]
    pub restart: Option<Dur>,
}

/// The listed classes are cut off from everyone else from `at` to `heal`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PartitionSpec {
    /// Classes on one side.
    pub side: Vec<String>,
    /// When the split happens.
    pub at: Dur,
    /// When it heals; never when omitted.
    #[serde(default)]
    pub heal: Option<Dur>,
}

/// Random node lookups, from random up hosts, at uniform times.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LookupSpec {
    /// How many.
    pub count: usize,
    /// The first may start here.
    pub from: Dur,
    /// Spread over this long.
    #[serde(default)]
    pub over: Dur,
    /// Only hosts of this class look up (any class when omitted).
    #[serde(default)]
    pub by: Option<String>,
}

/// Every host of a class searches for words at a time; it succeeds when
/// the results include the named file.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SearchSpec {
    /// The class.
    pub by: String,
    /// The words.
    pub text: String,
    /// When.
    pub at: Dur,
    /// The file (by name) a good answer includes.
    pub expect_file: String,
}

/// Protocol parameters to change from the defaults.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProtocolOverrides {
    /// Kademlia bucket size and replication (k).
    #[serde(default)]
    pub k: Option<usize>,
    /// Kademlia lookup parallelism (α).
    #[serde(default)]
    pub alpha: Option<usize>,
    /// Times a second a DHT node answers one key with its value (past
    /// that, with contacts).
    #[serde(default)]
    pub value_answers_per_s: Option<u32>,
    /// Value answers one key may get at once, above that rate.
    #[serde(default)]
    pub value_answer_burst: Option<u32>,
    /// Gossip mesh degree (D); the low and high marks follow.
    #[serde(default)]
    pub gossip_d: Option<usize>,
    /// Piece selection policy.
    #[serde(default)]
    pub picker: Option<PickPolicy>,
    /// Regular upload slots per file.
    #[serde(default)]
    pub upload_slots: Option<u32>,
    /// Peers one node exchanges a file with (its view of the swarm).
    #[serde(default)]
    pub peers_per_file: Option<u16>,
    /// Seeds reveal pieces one at a time.
    #[serde(default)]
    pub super_seeding: Option<bool>,
}

impl ProtocolOverrides {
    /// The node configuration: defaults with these changes, validated.
    pub fn config(&self) -> Result<Config, String> {
        let mut config = Config::default();
        if let Some(k) = self.k {
            config.kad.bucket_size = k;
        }
        if let Some(alpha) = self.alpha {
            config.kad.parallelism = alpha;
        }
        if let Some(per_s) = self.value_answers_per_s {
            config.kad.value_answers_per_key_per_s = per_s;
        }
        if let Some(burst) = self.value_answer_burst {
            config.kad.value_answer_burst = burst;
        }
        if let Some(d) = self.gossip_d {
            config.gossip.mesh_degree = d;
            config.gossip.mesh_degree_low = d.saturating_sub(d.div_ceil(4)).max(1).min(d);
            config.gossip.mesh_degree_high = d.saturating_mul(2);
        }
        if let Some(picker) = self.picker {
            config.exchange.download.pick_policy = picker;
        }
        if let Some(slots) = self.upload_slots {
            config.exchange.upload_slots = slots;
        }
        if let Some(peers) = self.peers_per_file {
            config.exchange.peers_per_file_max = peers;
        }
        if let Some(on) = self.super_seeding {
            config.exchange.super_seeding = on;
        }
        config.validate().map_err(|e| format!("protocol: {e}"))?;
        Ok(config)
    }
}

/// What must hold at the end; each set field becomes a check.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Expectations {
    /// Every download completes by this time after its ask.
    #[serde(default)]
    pub downloads_complete_within: Option<Dur>,
    /// At least this fraction of downloads complete.
    #[serde(default)]
    pub completion_ratio_min: Option<f64>,
    /// The last completion is at most this multiple of the lower bound.
    #[serde(default)]
    pub bound_ratio_max: Option<f64>,
    /// At least this fraction of node lookups find the closest live node.
    #[serde(default)]
    pub lookup_success_min: Option<f64>,
    /// Median lookup rounds at most this.
    #[serde(default)]
    pub lookup_rounds_p50_max: Option<f64>,
    /// Gossip reaches at least this fraction of live hosts.
    #[serde(default)]
    pub gossip_delivery_min: Option<f64>,
    /// At least this fraction of searches find their file.
    #[serde(default)]
    pub search_success_min: Option<f64>,
    /// Every corrupting host is banned by at least one peer.
    #[serde(default)]
    pub bad_peers_banned: Option<bool>,
}

/// One host of the plan.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostPlan {
    /// `class-index`.
    pub name: String,
    /// Index into [`Scenario::hosts`].
    pub class: usize,
    /// Index into the regions (0 when there are none).
    pub region: usize,
    /// Uplink, bytes per second.
    pub uplink: Option<u64>,
    /// Downlink, bytes per second.
    pub downlink: Option<u64>,
    /// Honest or corrupting.
    pub behaviour: Behaviour,
    /// Hosts it bootstraps through (earlier arrivals).
    pub bootstrap: Vec<usize>,
}

/// One file of the plan.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FilePlan {
    /// Name.
    pub name: String,
    /// Length.
    pub bytes: u64,
    /// Piece size.
    pub piece_bytes: u32,
    /// Seed of its synthetic content.
    pub content_seed: u64,
}

/// Something the engine does at a time.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// The host starts for the first time, bootstrapping through its list.
    Boot {
        /// Host.
        host: usize,
    },
    /// The host's process dies; its store survives.
    Crash {
        /// Host.
        host: usize,
    },
    /// The host starts again from its store.
    Restart {
        /// Host.
        host: usize,
    },
    /// The host gets the file into its store and shares it.
    Share {
        /// Host.
        host: usize,
        /// File index.
        file: usize,
    },
    /// The host asks for a file.
    Get {
        /// Host.
        host: usize,
        /// File index.
        file: usize,
    },
    /// The host searches.
    Search {
        /// Host.
        host: usize,
        /// Index into [`Scenario::searches`].
        search: usize,
    },
    /// The host looks up the nodes closest to a random id.
    Lookup {
        /// Host.
        host: usize,
        /// Target.
        target: NodeId,
    },
    /// Cut these hosts off from all others.
    Split {
        /// Index into [`Scenario::partitions`].
        partition: usize,
        /// Hosts on the cut-off side.
        side: Vec<usize>,
    },
    /// Undo a split.
    Heal {
        /// Index into [`Scenario::partitions`].
        partition: usize,
        /// Hosts on the cut-off side.
        side: Vec<usize>,
    },
}

/// A scenario resolved into hosts and timed actions.
#[derive(Clone, Debug)]
pub struct Plan {
    /// Hosts, by index.
    pub hosts: Vec<HostPlan>,
    /// Files, by index.
    pub files: Vec<FilePlan>,
    /// Actions, in time order (ties in insertion order).
    pub actions: Vec<(Duration, Action)>,
    /// One-way latency between regions.
    pub latency: Vec<Vec<Duration>>,
    /// Per-message jitter bound.
    pub jitter: Duration,
    /// When each host is up: `(from, until)` intervals, in order.
    pub up: Vec<Vec<(Duration, Option<Duration>)>>,
    /// The node configuration every host runs.
    pub config: Config,
    /// The scenario's deadline.
    pub duration: Duration,
    /// Every (host, file) download, with the time it asks.
    pub gets: Vec<(usize, usize, Duration)>,
    /// Search texts, by [`Action::Search`] index.
    pub searches: Vec<String>,
}

impl Plan {
    /// Latency between two hosts (before jitter).
    #[must_use]
    pub fn latency_between(&self, a: usize, b: usize) -> Duration {
        self.latency[self.hosts[a].region][self.hosts[b].region]
    }

    /// Whether a host is up at `at` according to the plan.
    #[must_use]
    pub fn is_up(&self, host: usize, at: Duration) -> bool {
        self.up[host].iter().any(|&(from, until)| from <= at && until.is_none_or(|u| at < u))
    }

    /// Index of the last action that gives the run work to wait for (a
    /// share, get, search or lookup): once past it, with every download
    /// done and every query answered, the goal is met; the churn and
    /// partitions still planned after it do not matter.
    #[must_use]
    pub fn last_work_action(&self) -> usize {
        self.actions
            .iter()
            .rposition(|(_, a)| {
                matches!(a, Action::Share { .. } | Action::Get { .. } | Action::Search { .. } | Action::Lookup { .. })
            })
            .unwrap_or(0)
    }

    /// Hosts of a class.
    pub fn class_hosts(&self, class: usize) -> impl Iterator<Item = usize> + '_ {
        self.hosts.iter().enumerate().filter(move |(_, h)| h.class == class).map(|(i, _)| i)
    }
}

/// Purpose tags for seeds derived from the scenario seed.
pub mod purpose {
    /// The plan's own draws.
    pub const PLAN: u8 = 0;
    /// A host's identity key.
    pub const IDENTITY: u8 = 1;
    /// A host's node machine.
    pub const NODE: u8 = 2;
    /// A host's driver (nonces).
    pub const DRIVER: u8 = 3;
    /// File contents.
    pub const CONTENT: u8 = 4;
    /// The engine's own network draws (jitter).
    pub const NETWORK: u8 = 5;
}

/// A 32-byte seed for (scenario seed, host, incarnation, purpose).
#[must_use]
pub fn derive_seed(scenario: u64, host: usize, incarnation: u32, purpose: u8) -> [u8; 32] {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(b"shoal-sim-seed-v1");
    h.update(scenario.to_be_bytes());
    h.update((host as u64).to_be_bytes());
    h.update(incarnation.to_be_bytes());
    h.update([purpose]);
    h.finalize().into()
}

impl Scenario {
    /// The classic flash crowd, for tests and comparisons: one `seed` host
    /// with a 2 MB/s uplink serves a file to `leechers` hosts (1 MB/s up,
    /// 10 MB/s down) that all ask 3 s after the start; 10 ms links.
    #[must_use]
    pub fn flash_crowd(leechers: usize, file_bytes: u64, seed: u64) -> Self {
        let class = |name: &str, count, up| HostClass {
            name: name.into(),
            count,
            region: None,
            uplink: Some(Rate(up)),
            downlink: (up < 2_000_000).then_some(Rate(10_000_000)),
            behaviour: Behaviour::Honest,
            arrival: Arrival::default(),
        };
        Self {
            name: "flash-crowd".into(),
            description: "one slow seed, everyone asks at once".into(),
            engine: EngineKind::Turmoil,
            seed,
            duration: Dur(Duration::from_secs(300)),
            network: Network::default(),
            hosts: vec![class("seed", 1, 2_000_000), class("leechers", leechers, 1_000_000)],
            files: vec![FileSpec {
                name: "flash.bin".into(),
                size: Size(file_bytes),
                seeders: vec!["seed".into()],
                piece_size: None,
                share_at: None,
            }],
            downloads: vec![DownloadSpec {
                file: "flash.bin".into(),
                by: "leechers".into(),
                after: default_ask_after(),
            }],
            churn: Vec::new(),
            crashes: Vec::new(),
            partitions: Vec::new(),
            lookups: None,
            searches: Vec::new(),
            protocol: ProtocolOverrides::default(),
            expect: Expectations::default(),
        }
    }

    /// Check names and values, and resolve the plan for `self.seed`.
    pub fn plan(&self) -> Result<Plan, String> {
        let config = self.protocol.config()?;
        let classes = self.class_index()?;
        let regions = self.regions()?;
        let region_of = |name: &Option<String>| -> Result<usize, String> {
            match name {
                None => Ok(0),
                Some(n) => self
                    .network
                    .regions
                    .iter()
                    .position(|r| r == n)
                    .ok_or_else(|| format!("region `{n}` is not in network.regions")),
            }
        };
        let mut rng = ChaCha8Rng::from_seed(derive_seed(self.seed, 0, 0, purpose::PLAN));

        // Hosts, with their arrival times.
        let mut hosts = Vec::new();
        let mut arrivals = Vec::new();
        for (class_index, class) in self.hosts.iter().enumerate() {
            let region = region_of(&class.region)?;
            let times = arrival_times(&class.arrival, class.count, &mut rng)
                .map_err(|e| format!("hosts `{}`: {e}", class.name))?;
            for (i, at) in times.into_iter().enumerate() {
                hosts.push(HostPlan {
                    name: format!("{}-{i}", class.name),
                    class: class_index,
                    region,
                    uplink: class.uplink.map(|r| r.0),
                    downlink: class.downlink.map(|r| r.0),
                    behaviour: class.behaviour,
                    bootstrap: Vec::new(),
                });
                arrivals.push(at);
            }
        }
        if hosts.is_empty() {
            return Err("hosts: a scenario needs at least one host".into());
        }
        if hosts.len() > HOSTS_MAX {
            return Err(format!("hosts: {} hosts is over the limit of {HOSTS_MAX}", hosts.len()));
        }
        // Bootstrap: the first host to arrive anchors everyone; each host
        // also knows two random hosts that arrived no later than it did.
        let mut by_arrival: Vec<usize> = (0..hosts.len()).collect();
        by_arrival.sort_by_key(|&h| (arrivals[h], h));
        let anchor = by_arrival[0];
        for (rank, &host) in by_arrival.iter().enumerate().skip(1) {
            let mut list = vec![anchor];
            for _ in 0..2 {
                let other = by_arrival[rng.random_range(0..rank)];
                if !list.contains(&other) {
                    list.push(other);
                }
            }
            hosts[host].bootstrap = list;
        }

        let mut actions: Vec<(Duration, Action)> = Vec::new();
        let mut up: Vec<Vec<(Duration, Option<Duration>)>> = Vec::with_capacity(hosts.len());
        for (host, &at) in arrivals.iter().enumerate() {
            actions.push((at, Action::Boot { host }));
            up.push(vec![(at, None)]);
        }
        let deadline = self.duration.0;

        // Churn and fixed crashes.
        for churn in &self.churn {
            let class =
                classes.get(churn.class.as_str()).copied().ok_or_else(|| unknown_class("churn", &churn.class))?;
            churn.session.validate("churn.session")?;
            if let Some(down) = &churn.downtime {
                down.validate("churn.downtime")?;
            }
            for host in (0..hosts.len()).filter(|&h| hosts[h].class == class) {
                let mut t = arrivals[host];
                let mut intervals = Vec::new();
                loop {
                    let session = churn.session.sample(&mut rng).max(Duration::from_millis(1));
                    let crash = t + session;
                    if crash >= deadline {
                        intervals.push((t, None));
                        break;
                    }
                    intervals.push((t, Some(crash)));
                    actions.push((crash, Action::Crash { host }));
                    let Some(down) = &churn.downtime else { break };
                    let back = crash + down.sample(&mut rng).max(Duration::from_millis(1));
                    if back >= deadline {
                        break;
                    }
                    actions.push((back, Action::Restart { host }));
                    t = back;
                    if actions.len() > ACTIONS_MAX {
                        return Err(format!("churn: over {ACTIONS_MAX} actions; lengthen the sessions"));
                    }
                }
                up[host] = intervals;
            }
        }
        for crash in &self.crashes {
            let host = self.host_index(&classes, &crash.class, crash.index, "crashes")?;
            if crash.at.0 < arrivals[host] {
                return Err(format!("crashes: {}-{} crashes before it arrives", crash.class, crash.index));
            }
            actions.push((crash.at.0, Action::Crash { host }));
            if let Some(restart) = crash.restart {
                if restart.0 <= crash.at.0 {
                    return Err(format!("crashes: {}-{} restarts before it crashes", crash.class, crash.index));
                }
                actions.push((restart.0, Action::Restart { host }));
            }
            up[host] = split_interval(&up[host], crash.at.0, crash.restart.map(|r| r.0));
        }

        // Files: seeders share, downloaders ask.
        let mut files = Vec::new();
        for (index, file) in self.files.iter().enumerate() {
            if file.size.0 == 0 || file.size.0 > FILE_BYTES_MAX {
                return Err(format!("files `{}`: size must be 1 byte to {FILE_BYTES_MAX} bytes", file.name));
            }
            let piece_bytes = match file.piece_size {
                Some(size) => {
                    let piece =
                        u32::try_from(size.0).map_err(|_| format!("files `{}`: piece_size too big", file.name))?;
                    shoal_node::core::content::Layout::new(file.size.0, piece)
                        .map_err(|e| format!("files `{}`: piece_size: {e}", file.name))?
                        .piece_bytes()
                }
                None => shoal_node::core::content::piece_bytes_for(file.size.0),
            };
            if self.files[..index].iter().any(|f| f.name == file.name) {
                return Err(format!("files: two files are named `{}`", file.name));
            }
            files.push(FilePlan {
                name: file.name.clone(),
                bytes: file.size.0,
                piece_bytes,
                content_seed: u64::from_be_bytes(
                    derive_seed(self.seed, index, 0, purpose::CONTENT)[..8].try_into().unwrap_or([0; 8]),
                ),
            });
            if file.seeders.is_empty() {
                return Err(format!("files `{}`: no seeders", file.name));
            }
            for seeder in &file.seeders {
                let class =
                    classes.get(seeder.as_str()).copied().ok_or_else(|| unknown_class("files.seeders", seeder))?;
                for host in (0..hosts.len()).filter(|&h| hosts[h].class == class) {
                    let at = file.share_at.map_or(arrivals[host], |s| s.0.max(arrivals[host]));
                    actions.push((at, Action::Share { host, file: index }));
                }
            }
        }
        let file_index = |name: &str| self.files.iter().position(|f| f.name == name);
        let mut gets = Vec::new();
        for download in &self.downloads {
            let file =
                file_index(&download.file).ok_or_else(|| format!("downloads: no file named `{}`", download.file))?;
            let class =
                classes.get(download.by.as_str()).copied().ok_or_else(|| unknown_class("downloads", &download.by))?;
            for host in (0..hosts.len()).filter(|&h| hosts[h].class == class) {
                let at = arrivals[host] + download.after.0;
                actions.push((at, Action::Get { host, file }));
                gets.push((host, file, at));
            }
        }
        for (index, search) in self.searches.iter().enumerate() {
            file_index(&search.expect_file)
                .ok_or_else(|| format!("searches: no file named `{}`", search.expect_file))?;
            let class =
                classes.get(search.by.as_str()).copied().ok_or_else(|| unknown_class("searches", &search.by))?;
            for host in (0..hosts.len()).filter(|&h| hosts[h].class == class) {
                actions.push((search.at.0.max(arrivals[host]), Action::Search { host, search: index }));
            }
        }

        // Partitions.
        for (index, partition) in self.partitions.iter().enumerate() {
            let mut side = Vec::new();
            for name in &partition.side {
                let class = classes.get(name.as_str()).copied().ok_or_else(|| unknown_class("partitions", name))?;
                side.extend((0..hosts.len()).filter(|&h| hosts[h].class == class));
            }
            if let Some(heal) = partition.heal
                && heal <= partition.at
            {
                return Err(format!("partitions[{index}]: heal is not after at"));
            }
            actions.push((partition.at.0, Action::Split { partition: index, side: side.clone() }));
            if let Some(heal) = partition.heal {
                actions.push((heal.0, Action::Heal { partition: index, side }));
            }
        }

        let mut plan = Plan {
            hosts,
            files,
            actions: Vec::new(),
            latency: regions,
            jitter: self.network.jitter.0,
            up,
            config,
            duration: deadline,
            gets,
            searches: self.searches.iter().map(|s| s.text.clone()).collect(),
        };

        // Lookups: from a random host that is up at that time.
        if let Some(lookups) = &self.lookups {
            let by = match &lookups.by {
                Some(name) => Some(classes.get(name.as_str()).copied().ok_or_else(|| unknown_class("lookups", name))?),
                None => None,
            };
            if lookups.count > ACTIONS_MAX {
                return Err(format!("lookups: count is over {ACTIONS_MAX}"));
            }
            let candidates: Vec<usize> =
                (0..plan.hosts.len()).filter(|&h| by.is_none_or(|c| plan.hosts[h].class == c)).collect();
            for _ in 0..lookups.count {
                let at = lookups.from.0 + lookups.over.0.mul_f64(rng.random::<f64>());
                let target = NodeId(rng.random());
                let start = rng.random_range(0..candidates.len().max(1));
                let host = (0..candidates.len())
                    .map(|k| candidates[(start + k) % candidates.len()])
                    .find(|&h| plan.is_up(h, at));
                if let Some(host) = host {
                    actions.push((at, Action::Lookup { host, target }));
                }
            }
        }
        if actions.len() > ACTIONS_MAX {
            return Err(format!("the plan has over {ACTIONS_MAX} actions"));
        }
        // Stable: same-time actions keep their order (boots before shares
        // before gets, as pushed).
        actions.sort_by_key(|(at, _)| *at);
        plan.actions = actions;
        Ok(plan)
    }

    fn class_index(&self) -> Result<BTreeMap<&str, usize>, String> {
        let mut classes = BTreeMap::new();
        for (index, class) in self.hosts.iter().enumerate() {
            if class.name.is_empty() || !class.name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') {
                return Err(format!("hosts: class name `{}` must be letters, digits, `-` or `_`", class.name));
            }
            if classes.insert(class.name.as_str(), index).is_some() {
                return Err(format!("hosts: two classes are named `{}`", class.name));
            }
        }
        Ok(classes)
    }

    fn host_index(
        &self,
        classes: &BTreeMap<&str, usize>,
        class: &str,
        index: usize,
        what: &str,
    ) -> Result<usize, String> {
        let c = classes.get(class).copied().ok_or_else(|| unknown_class(what, class))?;
        if index >= self.hosts[c].count {
            return Err(format!("{what}: class `{class}` has {} hosts, no index {index}", self.hosts[c].count));
        }
        Ok(self.hosts[..c].iter().map(|h| h.count).sum::<usize>() + index)
    }

    fn regions(&self) -> Result<Vec<Vec<Duration>>, String> {
        let n = &self.network;
        if n.regions.is_empty() {
            if !n.matrix.is_empty() {
                return Err("network.matrix needs network.regions".into());
            }
            return Ok(vec![vec![n.latency.0]]);
        }
        if n.matrix.len() != n.regions.len() || n.matrix.iter().any(|row| row.len() != n.regions.len()) {
            return Err(format!("network.matrix must be {0}×{0}, one row and column per region", n.regions.len()));
        }
        Ok(n.matrix.iter().map(|row| row.iter().map(|d| d.0).collect()).collect())
    }
}

fn unknown_class(what: &str, name: &str) -> String {
    format!("{what}: no host class named `{name}`")
}

/// Remove `[crash, restart)` from a host's up intervals.
fn split_interval(
    intervals: &[(Duration, Option<Duration>)],
    crash: Duration,
    restart: Option<Duration>,
) -> Vec<(Duration, Option<Duration>)> {
    let mut out = Vec::new();
    for &(from, until) in intervals {
        let ends_before = until.is_some_and(|u| u <= crash);
        let starts_after = restart.is_some_and(|r| from >= r);
        if ends_before || starts_after {
            out.push((from, until));
            continue;
        }
        if from < crash {
            out.push((from, Some(crash)));
        }
        if let Some(r) = restart
            && until.is_none_or(|u| u > r)
        {
            out.push((r, until));
        }
    }
    out
}

fn arrival_times(arrival: &Arrival, count: usize, rng: &mut ChaCha8Rng) -> Result<Vec<Duration>, String> {
    Ok(match arrival {
        Arrival::At { at } => vec![at.0; count],
        Arrival::Poisson { rate_per_s, from } => {
            if !(rate_per_s.is_finite() && *rate_per_s > 0.0) {
                return Err("arrival rate_per_s must be a positive number".into());
            }
            let mut t = from.0.as_secs_f64();
            (0..count)
                .map(|_| {
                    t += -(1.0 - rng.random::<f64>()).ln() / rate_per_s;
                    Duration::from_secs_f64(t.min(1e9))
                })
                .collect()
        }
        Arrival::List { times } => {
            let last = times.last().ok_or("arrival list has no times")?;
            (0..count).map(|i| times.get(i).unwrap_or(last).0).collect()
        }
    })
}

// ---- units ----

fn parse_number_unit(text: &str) -> Option<(f64, String)> {
    let text = text.trim();
    let split = text.find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '_')).unwrap_or(text.len());
    let number: f64 = text[..split].replace('_', "").parse().ok()?;
    if !number.is_finite() || number < 0.0 {
        return None;
    }
    Some((number, text[split..].trim().to_owned()))
}

impl Dur {
    /// Parse `"250ms"`, `"10s"`, `"2m"`, `"1h"`, `"1.5s"`.
    pub fn parse(text: &str) -> Result<Self, String> {
        let bad = || format!("`{text}` is not a duration (try \"250ms\", \"10s\", \"2m\")");
        let (n, unit) = parse_number_unit(text).ok_or_else(bad)?;
        let secs = match unit.as_str() {
            "us" | "µs" => n / 1e6,
            "ms" => n / 1e3,
            "s" | "" => n,
            "m" | "min" => n * 60.0,
            "h" => n * 3600.0,
            _ => return Err(bad()),
        };
        Duration::try_from_secs_f64(secs).map(Dur).map_err(|_| bad())
    }
}

impl Size {
    /// Parse `"8 MiB"`, `"500 KB"`, `"1GiB"`, `"123"` (bytes).
    pub fn parse(text: &str) -> Result<Self, String> {
        let bad = || format!("`{text}` is not a size (try \"8 MiB\", \"500 KB\", 1048576)");
        let (n, unit) = parse_number_unit(text).ok_or_else(bad)?;
        let scale = unit_scale(&unit).ok_or_else(bad)?;
        Ok(Size((n * scale).round() as u64))
    }
}

fn unit_scale(unit: &str) -> Option<f64> {
    Some(match unit {
        "" | "B" => 1.0,
        "KB" | "kB" => 1e3,
        "MB" => 1e6,
        "GB" => 1e9,
        "KiB" => 1024.0,
        "MiB" => 1024.0 * 1024.0,
        "GiB" => 1024.0 * 1024.0 * 1024.0,
        "Kbit" | "kbit" => 1e3 / 8.0,
        "Mbit" => 1e6 / 8.0,
        "Gbit" => 1e9 / 8.0,
        _ => return None,
    })
}

impl Rate {
    /// Parse `"2 MB/s"`, `"10 Mbit/s"`, `"512 KiB/s"`, or bytes per second.
    pub fn parse(text: &str) -> Result<Self, String> {
        let bad = || format!("`{text}` is not a rate (try \"2 MB/s\", \"10 Mbit/s\", 2000000)");
        let (n, unit) = parse_number_unit(text).ok_or_else(bad)?;
        let unit = unit.strip_suffix("/s").or_else(|| unit.strip_suffix("ps")).unwrap_or(&unit).trim();
        let scale = unit_scale(unit).ok_or_else(bad)?;
        let bytes = (n * scale).round() as u64;
        if bytes == 0 {
            return Err(format!("`{text}`: a rate must be above zero (omit it for unlimited)"));
        }
        Ok(Rate(bytes))
    }
}

macro_rules! unit_serde {
    ($ty:ident, $inner:ty, $from_number:expr, $display:expr) => {
        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                #[derive(Deserialize)]
                #[serde(untagged)]
                enum Raw {
                    Int(u64),
                    Float(f64),
                    Text(String),
                }
                let from_number: fn(f64) -> Result<$ty, String> = $from_number;
                match Raw::deserialize(d)? {
                    Raw::Int(n) => from_number(n as f64),
                    Raw::Float(n) => from_number(n),
                    Raw::Text(s) => $ty::parse(&s),
                }
                .map_err(serde::de::Error::custom)
            }
        }
        impl Serialize for $ty {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                let display: fn(&$ty) -> String = $display;
                s.serialize_str(&display(self))
            }
        }
    };
}

unit_serde!(
    Dur,
    Duration,
    |n| Duration::try_from_secs_f64(n).map(Dur).map_err(|_| format!("{n} is not a duration in seconds")),
    |d| format!("{}ms", d.0.as_millis())
);
unit_serde!(
    Size,
    u64,
    |n| if n >= 0.0 && n.fract() == 0.0 { Ok(Size(n as u64)) } else { Err(format!("{n} is not a size in bytes")) },
    |s| s.0.to_string()
);
unit_serde!(
    Rate,
    u64,
    |n| if n >= 1.0 { Ok(Rate(n as u64)) } else { Err(format!("{n} is not a rate in bytes per second")) },
    |r| format!("{}/s", r.0)
);

#[cfg(test)]
mod tests {
    use super::*;

    fn minimal() -> Scenario {
        Scenario {
            name: "t".into(),
            description: String::new(),
            engine: EngineKind::Turmoil,
            seed: 1,
            duration: Dur(Duration::from_secs(100)),
            network: Network::default(),
            hosts: vec![
                HostClass {
                    name: "seed".into(),
                    count: 1,
                    region: None,
                    uplink: Some(Rate(2_000_000)),
                    downlink: None,
                    behaviour: Behaviour::Honest,
                    arrival: Arrival::default(),
                },
                HostClass {
                    name: "peers".into(),
                    count: 20,
                    region: None,
                    uplink: Some(Rate(1_000_000)),
                    downlink: None,
                    behaviour: Behaviour::Honest,
                    arrival: Arrival::Poisson { rate_per_s: 2.0, from: Dur(Duration::from_secs(1)) },
                },
            ],
            files: vec![FileSpec {
                name: "f.bin".into(),
                size: Size(1 << 20),
                seeders: vec!["seed".into()],
                piece_size: None,
                share_at: None,
            }],
            downloads: vec![DownloadSpec { file: "f.bin".into(), by: "peers".into(), after: default_ask_after() }],
            churn: Vec::new(),
            crashes: Vec::new(),
            partitions: Vec::new(),
            lookups: None,
            searches: Vec::new(),
            protocol: ProtocolOverrides::default(),
            expect: Expectations::default(),
        }
    }

    #[test]
    fn units_parse_and_reject_nonsense() {
        assert_eq!(Dur::parse("250ms").unwrap().0, Duration::from_millis(250));
        assert_eq!(Dur::parse("1.5s").unwrap().0, Duration::from_millis(1500));
        assert_eq!(Dur::parse("2m").unwrap().0, Duration::from_secs(120));
        assert_eq!(Size::parse("8 MiB").unwrap().0, 8 << 20);
        assert_eq!(Size::parse("500KB").unwrap().0, 500_000);
        assert_eq!(Rate::parse("2 MB/s").unwrap().0, 2_000_000);
        assert_eq!(Rate::parse("10 Mbit/s").unwrap().0, 1_250_000);
        for bad in ["", "ten seconds", "5 parsecs", "-1s"] {
            assert!(Dur::parse(bad).is_err(), "{bad}");
        }
        assert!(Rate::parse("0 MB/s").is_err());
        assert!(Size::parse("3 bananas").is_err());
    }

    #[test]
    fn a_plan_is_a_pure_function_of_the_seed() {
        let a = minimal().plan().unwrap();
        let b = minimal().plan().unwrap();
        assert_eq!(a.actions, b.actions);
        let other = Scenario { seed: 2, ..minimal() }.plan().unwrap();
        assert_ne!(a.actions, other.actions, "Poisson arrivals follow the seed");
        assert_eq!(a.hosts.len(), 21);
        assert_eq!(a.gets.len(), 20);
        // Actions are in time order; every peer boots before it asks.
        assert!(a.actions.windows(2).all(|w| w[0].0 <= w[1].0));
        for (host, _, ask) in &a.gets {
            let boot = a.actions.iter().find(|(_, x)| *x == Action::Boot { host: *host }).unwrap().0;
            assert_eq!(*ask, boot + Duration::from_secs(3));
            assert!(a.hosts[*host].bootstrap.iter().all(|&b| b != *host));
        }
    }

    #[test]
    fn churn_alternates_crash_and_restart_within_the_deadline() {
        let mut s = minimal();
        s.churn.push(ChurnSpec {
            class: "peers".into(),
            session: Dist::Exponential { mean: Dur(Duration::from_secs(20)) },
            downtime: Some(Dist::Uniform { min: Dur(Duration::from_secs(1)), max: Dur(Duration::from_secs(5)) }),
        });
        let plan = s.plan().unwrap();
        for host in plan.class_hosts(1) {
            let mut up = true;
            for (at, action) in plan
                .actions
                .iter()
                .filter(|(_, a)| matches!(a, Action::Crash { host: h } | Action::Restart { host: h } if *h == host))
            {
                assert!(*at < plan.duration);
                match action {
                    Action::Crash { .. } => assert!(std::mem::replace(&mut up, false), "crash while down"),
                    _ => assert!(!std::mem::replace(&mut up, true), "restart while up"),
                }
                assert_eq!(plan.is_up(host, *at), up, "the up intervals agree with the actions");
            }
        }
        let crashes = plan.actions.iter().filter(|(_, a)| matches!(a, Action::Crash { .. })).count();
        assert!(crashes >= 20, "20 hosts × 100 s with 20 s sessions crash often: {crashes}");
    }

    #[test]
    fn bad_references_are_errors_naming_them() {
        let mut s = minimal();
        s.downloads[0].by = "leechers".into();
        assert_eq!(s.plan().unwrap_err(), "downloads: no host class named `leechers`");
        let mut s = minimal();
        s.files[0].seeders = vec![];
        assert!(s.plan().unwrap_err().contains("no seeders"));
        let mut s = minimal();
        s.network.regions = vec!["eu".into()];
        assert!(s.plan().unwrap_err().contains("network.matrix must be 1×1"));
        let mut s = minimal();
        s.protocol.k = Some(0);
        assert!(s.plan().unwrap_err().starts_with("protocol:"));
        let mut s = minimal();
        s.crashes.push(CrashSpec { class: "peers".into(), index: 20, at: Dur::default(), restart: None });
        assert!(s.plan().unwrap_err().contains("has 20 hosts, no index 20"));
    }

    #[test]
    fn pareto_and_exponential_draws_have_the_right_shape() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let exp = Dist::Exponential { mean: Dur(Duration::from_secs(10)) };
        let mean = (0..20_000).map(|_| exp.sample(&mut rng).as_secs_f64()).sum::<f64>() / 20_000.0;
        assert!((9.5..10.5).contains(&mean), "exponential mean {mean}");
        let pareto = Dist::Pareto { scale: Dur(Duration::from_secs(2)), shape: 2.0 };
        let draws: Vec<f64> = (0..20_000).map(|_| pareto.sample(&mut rng).as_secs_f64()).collect();
        assert!(draws.iter().all(|&d| d >= 2.0), "never below the scale");
        let mean = draws.iter().sum::<f64>() / draws.len() as f64;
        assert!((3.6..4.4).contains(&mean), "pareto(2, 2) mean is 4: {mean}");
    }
}
