//! The discrete-event engine: the core [`Node`] machines driven directly,
//! without sockets or tasks, for scenarios of 10^4–10^5 hosts (turmoil's
//! cost per tick grows with the cube of the host count, SIM_NOTES.md).
//!
//! One event heap ordered by (time, sequence number) holds node timers,
//! connection set-up and teardown, and frames in flight. Each host does
//! for its machine what the node's driver does (`shoal_node::driver`):
//! dials become `Connected` on both sides three one-way latencies later
//! (turmoil's SYN, then the hellos, then the proofs), or `DialFailed`
//! (refused at once across a partition, one latency later by a host that
//! is down); frames go out on the connection in the driver's order
//! (control lane first, each lane in order);
//! `ServeBlock` reads the store and sends the block, then reports
//! `BlockSent`; `VerifyPiece` is hashed at once (as the driver does under
//! turmoil; bytes equal to the plan file's piece take the hash memoised
//! when the file was generated); `StorePiece` writes the store;
//! `Disconnect` sends a goodbye; a crash resets its connections (peers
//! learn after one latency); a partition wedges the connections it cuts,
//! which the peers' idle timeouts close (computed from the driver's
//! keepalive schedule).
//! The driver's limits and timeouts are read from `DriverConfig`'s
//! defaults, so the two stay in step.
//!
//! Bandwidth is the driver's own model, with its own code: each host has an
//! upload and a download [`TokenBucket`] (the driver's burst). Each side
//! of a connection has a writer ([`conns::Writer`]) that, as the driver's
//! `write_loop`, writes a frame when free and then sleeps for the upload
//! bucket's debt; so a host's frames of B bytes occupy its uplink for
//! B/up in total, in order on each connection. A frame then travels for
//! the pair's latency (plus seeded jitter), and the receiver's reader takes
//! B from its download bucket and hands the frame over after the wait
//! (B/down once the burst is spent). Frame sizes are the real encoded
//! lengths (`shoal_core::wire::encoded_len`); handshake frames are counted
//! (their size is computed once) but, as in the driver, bypass the rate
//! limits; keepalives are not simulated (idle connections cost nothing)
//! and so are not in the byte counts.
//!
//! Memory: a file's pieces are `Bytes` slices of one buffer
//! ([`FileContent`]); seeders share slices of it, and a downloader's
//! verified piece is stored as the same slice once its bytes compare
//! equal, so a thousand holders hold one copy.
//!
//! Clocks: each node sees its incarnation's time (zero at its start, as
//! the driver's epoch); the collector gets simulated time.
//!
//! Determinism: no clock, no hash-ordered iteration; randomness is the
//! nodes' own seeded RNGs plus one seeded RNG for jitter. Same scenario and
//! seed, same trace hash.

mod conns;
mod frames;
mod links;
mod queue;

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use rand::rngs::ChaCha8Rng;
use rand::{RngExt, SeedableRng};
use shoal_node::core::exchange::{PieceHashed, ServeBlock, StorePiece, VerifyPiece};
use shoal_node::core::ids::{ConnId, FileId, NodeId, PieceIndex};
use shoal_node::core::node::{Node, NodeEvent, NodeInput, NodeOutput};
use shoal_node::core::time::Instant;
use shoal_node::core::wire::{Contact, ExchangeMessage, GoodbyeReason, Hello, HelloProof, Message, Signature};
use shoal_node::driver::{DriverConfig, FrameKind};
use shoal_node::identity::Identity;
use shoal_node::ratelimit::TokenBucket;
use shoal_node::store::{MemoryStore, Store};

use crate::model::{Action, Behaviour, EngineKind, Plan, Scenario, derive_seed, purpose};
use crate::observe::{Collector, Fact, Outcome};
use crate::stores::{FileContent, corrupt_block};
use crate::turmoil_engine::{PORT, Progress};
use conns::{HostConns, Link};
use frames::{FrameId, Frames};
use links::{LinkId, Links};
use queue::EventQueue;

/// Partitions that may be in force at once (one bit each per host).
pub const PARTITIONS_MAX: usize = 64;
/// Simulated time between progress reports.
const PROGRESS_EVERY: Duration = Duration::from_secs(1);
/// First address of the simulated hosts (10.0.0.1, then upwards).
const ADDR_BASE: u32 = 0x0A00_0001;
/// Hosts the address plan can number (10.0.0.1 to 10.255.255.255).
const ADDR_HOSTS_MAX: usize = 0x00FF_FFFF;
/// One-way flights before a dial is a connection on both sides: the SYN
/// (turmoil's connect returns when it arrives), the hellos, the proofs.
const HANDSHAKE_FLIGHTS: u64 = 3;
/// The rate limiters' burst: `Driver::bind` uses four blocks.
const BUCKET_BURST_BYTES: u64 = 4 * 16 * 1024;

/// Why a run stopped early.
type RunResult<T> = Result<T, String>;

#[derive(Debug)]
enum Event {
    /// A booted host's node starts (after the plan's actions of the same
    /// instant, as turmoil runs the host's software after the bounce).
    Start { host: u32, incarnation: u32 },
    /// A node's timer.
    Timer { host: u32, incarnation: u32 },
    /// A dial failed. (The address is boxed: a rare event should not
    /// make every event larger.)
    DialFailed { host: u32, incarnation: u32, addr: Box<SocketAddr> },
    /// The accepting side finished its handshake.
    Accept { link: LinkId },
    /// A side's writer woke from its upload wait.
    WriterReady { link: LinkId, side: u8 },
    /// A frame reached the receiver's reader.
    Arrive { link: LinkId, to: u8, bytes: u32, frame: FrameId },
    /// The reader's download wait ended: the driver hands it over.
    Deliver { link: LinkId, to: u8, frame: FrameId },
    /// One side learns its connection ended (reset or idle timeout).
    Close { link: LinkId, side: u8 },
}

/// A user command waiting for the node to start (the driver's command
/// channel).
#[derive(Clone, Debug)]
enum Command {
    Bootstrap,
    Get(FileId),
    Search(usize),
    Lookup(NodeId),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Down,
    Starting,
    Up,
}

struct Host {
    id: NodeId,
    node: Option<Box<Node>>,
    state: State,
    incarnation: u32,
    /// Survives crashes (the durable store).
    store: MemoryStore,
    conns: HostConns,
    next_conn: u64,
    dialing: usize,
    /// Simulated time (µs) its incarnation started: its clock's zero.
    epoch_us: u64,
    /// Its node's deadline, in simulated time (µs).
    timer_us: Option<u64>,
    asked: Vec<usize>,
    pending: Vec<Command>,
    /// Bit p: on the cut-off side of partition p.
    partitions: u64,
    /// The driver's rate limiters (new with each incarnation).
    upload: TokenBucket,
    download: TokenBucket,
}

/// Counters of the engine itself.
#[derive(Clone, Copy, Debug, Default)]
struct Counters {
    events: u64,
    frames: u64,
    frames_lost: u64,
    frames_unencodable: u64,
    connections: u64,
    dials_failed: u64,
    connections_refused: u64,
    store_errors: u64,
    slow_peers: u64,
    blocks_cancelled: u64,
}

struct Engine<'a> {
    plan: &'a Plan,
    seed: u64,
    contents: Vec<FileContent>,
    /// Plan file index of each file id.
    content_of: BTreeMap<FileId, usize>,
    hosts: Vec<Host>,
    links: Links,
    frames: Frames,
    queue: EventQueue<Event>,
    now_us: u64,
    collector: Collector,
    jitter: ChaCha8Rng,
    driver: DriverConfig,
    frame_bytes_max: u32,
    /// Bytes one side sends in a handshake (hello and proof).
    handshake_bytes: u64,
    bytes_by_kind: [u64; FrameKind::ALL.len()],
    frames_by_kind: [u64; FrameKind::ALL.len()],
    gossip_duplicates: u64,
    counters: Counters,
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// The address host `index` listens on.
#[must_use]
pub fn host_addr(index: usize) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(Ipv4Addr::from(ADDR_BASE + index as u32)), PORT)
}

/// The host listening on `addr`, if any.
fn addr_host(addr: SocketAddr, hosts: usize) -> Option<usize> {
    let IpAddr::V4(ip) = addr.ip() else { return None };
    let index = u32::from(ip).checked_sub(ADDR_BASE)? as usize;
    (addr.port() == PORT && index < hosts).then_some(index)
}

fn kind_index(message: &Message) -> usize {
    FrameKind::of(message) as usize
}

/// Run a planned scenario on the discrete-event engine.
pub fn run(
    scenario: &Scenario,
    plan: &Plan,
    mut progress: Option<&mut dyn FnMut(Progress)>,
) -> Result<Outcome, String> {
    if plan.hosts.len() > ADDR_HOSTS_MAX {
        return Err(format!("the des engine numbers at most {ADDR_HOSTS_MAX} hosts"));
    }
    let rss_start = rss_bytes();
    let mut engine = Engine::new(scenario, plan)?;
    let goal = plan.gets.len();
    let answers_due =
        plan.actions.iter().filter(|(_, a)| matches!(a, Action::Lookup { .. } | Action::Search { .. })).count();
    let work = goal > 0 || answers_due > 0;
    let deadline_us = micros(plan.duration);
    let mut next_action = 0;
    let mut next_progress = 0;
    let mut finished = false;
    loop {
        let action_at = plan.actions.get(next_action).map(|(at, _)| micros(*at));
        let event_at = engine.queue.peek_at();
        // Planned actions go first at a tie, as turmoil applies them before
        // its step.
        let at = match (action_at, event_at) {
            (Some(a), Some(e)) => a.min(e),
            (a, e) => match a.or(e) {
                Some(at) => at,
                None => break,
            },
        };
        if at > deadline_us {
            break;
        }
        engine.now_us = at;
        if action_at == Some(at) {
            let action = &plan.actions[next_action].1;
            next_action += 1;
            engine.apply(action)?;
        } else if let Some((_, event)) = engine.queue.pop() {
            engine.counters.events += 1;
            engine.handle(event)?;
        }
        if let Some(report) = progress.as_mut()
            && at >= next_progress
        {
            next_progress = at + micros(PROGRESS_EVERY);
            report(Progress {
                sim_time: Duration::from_micros(at),
                deadline: plan.duration,
                completed: engine.collector.completions(),
                downloads: goal,
            });
        }
        if work
            && next_action == plan.actions.len()
            && engine.collector.completions() >= goal
            && engine.collector.answers() >= answers_due
        {
            finished = true;
            break;
        }
    }
    let sim_time = if finished { Duration::from_micros(engine.now_us) } else { plan.duration };
    let rss_end = rss_bytes();
    engine.finish(sim_time, rss_start.zip(rss_end))
}

/// Resident set size of this process, from `/proc/self/statm` (Linux);
/// `None` elsewhere.
fn rss_bytes() -> Option<u64> {
    const PAGE_BYTES: u64 = 4096;
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * PAGE_BYTES)
}

impl<'a> Engine<'a> {
    fn new(scenario: &Scenario, plan: &'a Plan) -> RunResult<Self> {
        let contents: Vec<FileContent> = plan.files.iter().map(FileContent::generate).collect::<Result<_, _>>()?;
        let file_ids: Vec<_> = contents.iter().map(|c| c.id).collect();
        let hosts = plan
            .hosts
            .iter()
            .enumerate()
            .map(|(index, h)| Host {
                // The same ids as the turmoil engine's hosts.
                id: Identity::from_secret(derive_seed(scenario.seed, index, 0, purpose::IDENTITY)).node_id(),
                node: None,
                state: State::Down,
                incarnation: 0,
                store: MemoryStore::new(),
                conns: HostConns::default(),
                next_conn: 1,
                dialing: 0,
                epoch_us: 0,
                timer_us: None,
                asked: Vec::new(),
                pending: Vec::new(),
                partitions: 0,
                upload: TokenBucket::new(h.uplink, BUCKET_BURST_BYTES, Duration::ZERO),
                download: TokenBucket::new(h.downlink, BUCKET_BURST_BYTES, Duration::ZERO),
            })
            .collect();
        let driver = DriverConfig::new(host_addr(0));
        let frame_bytes_max = plan.config.frame_bytes_max.min(driver.frame_bytes_max);
        let hello = Hello { protocol_version: 0, public_key: [0; 32], listen_addr: Some(host_addr(0)), nonce: [0; 32] };
        let proof = HelloProof { signature: Signature([0; 64]) };
        let frame_len = |m: &Message| {
            shoal_node::core::wire::encoded_len(m, frame_bytes_max).map(u64::from).map_err(|e| e.to_string())
        };
        let handshake_bytes = frame_len(&Message::Hello(hello))? + frame_len(&Message::HelloProof(proof))?;
        Ok(Self {
            plan,
            seed: scenario.seed,
            content_of: file_ids.iter().enumerate().map(|(i, id)| (*id, i)).collect(),
            contents,
            hosts,
            links: Links::default(),
            frames: Frames::default(),
            queue: EventQueue::new(),
            now_us: 0,
            collector: Collector::new(&file_ids),
            jitter: ChaCha8Rng::from_seed(derive_seed(scenario.seed, 0, 0, purpose::NETWORK)),
            driver,
            frame_bytes_max,
            handshake_bytes,
            bytes_by_kind: [0; FrameKind::ALL.len()],
            frames_by_kind: [0; FrameKind::ALL.len()],
            gossip_duplicates: 0,
            counters: Counters::default(),
        })
    }

    /// A host's clock, as its driver's: time since this incarnation
    /// started (`Driver::bind` takes its epoch then).
    fn host_now(&self, host: usize) -> Instant {
        Instant::from_micros(self.now_us.saturating_sub(self.hosts[host].epoch_us))
    }

    fn sim_now(&self) -> Duration {
        Duration::from_micros(self.now_us)
    }

    fn latency_us(&self, a: u32, b: u32) -> u64 {
        micros(self.plan.latency_between(a as usize, b as usize))
    }

    /// One frame's latency: the pair's plus seeded jitter.
    fn flight_us(&mut self, a: u32, b: u32) -> u64 {
        let jitter = micros(self.plan.jitter);
        let extra = if jitter == 0 { 0 } else { self.jitter.random_range(0..=jitter) };
        self.latency_us(a, b) + extra
    }

    fn separated(&self, a: u32, b: u32) -> bool {
        self.hosts[a as usize].partitions != self.hosts[b as usize].partitions
    }

    fn alive(&self, host: u32, incarnation: u32) -> bool {
        let h = &self.hosts[host as usize];
        h.incarnation == incarnation && h.state != State::Down
    }

    // ---- planned actions ----

    fn apply(&mut self, action: &Action) -> RunResult<()> {
        let now = self.sim_now();
        match action {
            Action::Boot { host } | Action::Restart { host } => {
                let restart = matches!(action, Action::Restart { .. });
                let h = &mut self.hosts[*host];
                h.incarnation += u32::from(restart);
                h.state = State::Starting;
                h.pending.clear();
                if !self.plan.hosts[*host].bootstrap.is_empty() {
                    h.pending.push(Command::Bootstrap);
                }
                for &file in &h.asked {
                    h.pending.push(Command::Get(self.contents[file].id));
                }
                let incarnation = h.incarnation;
                self.queue.push(self.now_us, Event::Start { host: *host as u32, incarnation });
                self.collector.engine(*host, now, if restart { Fact::Restarted } else { Fact::Booted });
            }
            Action::Crash { host } => self.crash(*host),
            Action::Share { host, file } => {
                let content = &self.contents[*file];
                self.hosts[*host].store.add_shared(content.data.clone(), &content.manifest, &content.hashes).map_err(
                    |e| format!("{}: sharing {}: {e}", self.plan.hosts[*host].name, self.plan.files[*file].name),
                )?;
                // A node starting now shares its store's files by itself.
                if self.hosts[*host].state == State::Up {
                    let (manifest, hashes) = (content.manifest.clone(), content.hashes.clone());
                    self.with_node(*host, |node, now| node.share(now, manifest, hashes));
                }
            }
            Action::Get { host, file } => {
                self.hosts[*host].asked.push(*file);
                self.command(*host, Command::Get(self.contents[*file].id));
            }
            Action::Search { host, search } => self.command(*host, Command::Search(*search)),
            Action::Lookup { host, target } => self.command(*host, Command::Lookup(*target)),
            Action::Split { partition, side } => {
                if *partition >= PARTITIONS_MAX {
                    return Err(format!("the des engine supports at most {PARTITIONS_MAX} partitions"));
                }
                for &h in side {
                    self.hosts[h].partitions |= 1 << partition;
                }
                self.wedge_cut_links();
            }
            Action::Heal { partition, side } => {
                if *partition < PARTITIONS_MAX {
                    for &h in side {
                        self.hosts[h].partitions &= !(1 << partition);
                    }
                }
            }
        }
        Ok(())
    }

    /// A user command: run now if the node runs, queue it if it is
    /// starting, drop it if the host is down (as the turmoil engine does).
    fn command(&mut self, host: usize, command: Command) {
        match self.hosts[host].state {
            State::Down => {}
            State::Starting => self.hosts[host].pending.push(command),
            State::Up => self.run_command(host, command),
        }
    }

    fn run_command(&mut self, host: usize, command: Command) {
        match command {
            Command::Bootstrap => {
                let seeds: Vec<SocketAddr> = self.plan.hosts[host].bootstrap.iter().map(|&b| host_addr(b)).collect();
                self.with_node(host, |node, now| node.bootstrap(now, &seeds));
            }
            Command::Get(file) => self.with_node(host, |node, now| node.get(now, file)),
            Command::Search(search) => {
                let text = self.plan.searches.get(search).cloned().unwrap_or_default();
                self.with_node(host, |node, now| {
                    node.search(now, &text);
                });
            }
            Command::Lookup(target) => self.with_node(host, |node, now| {
                node.find_node(now, target);
            }),
        }
    }

    fn crash(&mut self, host: usize) {
        if self.hosts[host].state == State::Down {
            return;
        }
        self.collector.engine(host, self.sim_now(), Fact::Crashed);
        let h = &mut self.hosts[host];
        if let Some(node) = h.node.take() {
            self.gossip_duplicates += node.gossip().counters().duplicates;
        }
        h.state = State::Down;
        h.timer_us = None;
        h.dialing = 0;
        h.pending.clear();
        for link in h.conns.take_links() {
            self.reset(host as u32, link);
        }
    }

    /// `host`'s side of `link` is gone without a goodbye (a crash): the
    /// peer sees the reset one latency later, unless the link is wedged
    /// (then its idle timeout is already scheduled).
    fn reset(&mut self, host: u32, link_id: LinkId) {
        let Some(link) = self.links.get_mut(link_id) else { return };
        let Some(side) = link.side_of(host) else { return };
        link.shut(side);
        let peer = link.ends[1 - side].status();
        let wedged = link.wedged;
        if link.is_dead() {
            self.links.remove(link_id);
            return;
        }
        if peer.open && !wedged {
            let at = self.now_us + self.latency_us(host, peer.host);
            self.queue.push(at, Event::Close { link: link_id, side: (1 - side) as u8 });
        }
    }

    /// After a split: every open connection between separated hosts goes
    /// silent; each side's reader times out on its own schedule.
    fn wedge_cut_links(&mut self) {
        let (keepalive, idle) = (micros(self.driver.keepalive_interval), micros(self.driver.idle_timeout));
        let mut closes = Vec::new();
        for id in self.links.dial_order() {
            let Some(link) = self.links.get_mut(id) else { continue };
            let (a, b) = (link.ends[0].host, link.ends[1].host);
            if link.wedged || self.hosts[a as usize].partitions == self.hosts[b as usize].partitions {
                continue;
            }
            link.wedged = true;
            let latency = micros(self.plan.latency_between(a as usize, b as usize));
            for side in 0..2 {
                if link.ends[side].open && link.ends[side].conn.is_some() {
                    closes.push((link.idle_close_at(side, self.now_us, latency, keepalive, idle), id, side as u8));
                }
            }
        }
        for (at, link, side) in closes {
            self.queue.push(at, Event::Close { link, side });
        }
    }

    // ---- events ----

    fn handle(&mut self, event: Event) -> RunResult<()> {
        match event {
            Event::Start { host, incarnation } => self.start(host as usize, incarnation)?,
            Event::Timer { host, incarnation } => {
                let h = &mut self.hosts[host as usize];
                // Stale events (the deadline moved) find a later deadline
                // or none, and do nothing.
                if h.incarnation == incarnation && h.timer_us.is_some_and(|at| at <= self.now_us) {
                    h.timer_us = None;
                    self.with_node(host as usize, |node, now| node.handle_timeout(now));
                }
            }
            Event::DialFailed { host, incarnation, addr } => {
                if self.alive(host, incarnation) {
                    self.counters.dials_failed += 1;
                    let h = &mut self.hosts[host as usize];
                    h.dialing = h.dialing.saturating_sub(1);
                    self.with_node(host as usize, |node, now| {
                        node.handle_input(now, NodeInput::DialFailed { addr: *addr })
                    });
                }
            }
            Event::Accept { link } => self.accept(link),
            Event::WriterReady { link, side } => self.write_queued(link, usize::from(side)),
            Event::Arrive { link, to, bytes, frame } => self.arrive(link, usize::from(to), bytes, frame),
            Event::Deliver { link, to, frame } => {
                let message = self.frames.take(frame);
                self.deliver(link, usize::from(to), message);
            }
            Event::Close { link, side } => self.close(link, usize::from(side)),
        }
        Ok(())
    }

    fn start(&mut self, host: usize, incarnation: u32) -> RunResult<()> {
        let h = &self.hosts[host];
        if h.incarnation != incarnation || h.state != State::Starting {
            return Ok(());
        }
        let local = Contact { id: h.id, addr: host_addr(host) };
        let seed = derive_seed(self.seed, host, incarnation, purpose::NODE);
        self.hosts[host].epoch_us = self.now_us;
        let node = Node::new(self.plan.config.clone(), local, seed, self.host_now(host))
            .map_err(|e| format!("{}: {e}", self.plan.hosts[host].name))?;
        let mut node = Box::new(node);
        let now = self.sim_now();
        let h = &mut self.hosts[host];
        // A new driver: its connection numbers and rate limiters start again.
        h.next_conn = 1;
        h.upload = TokenBucket::new(self.plan.hosts[host].uplink, BUCKET_BURST_BYTES, now);
        h.download = TokenBucket::new(self.plan.hosts[host].downlink, BUCKET_BURST_BYTES, now);
        h.state = State::Up;
        shoal_node::driver::resume_from_store(&mut node, &h.store, Instant::ZERO);
        h.node = Some(node);
        self.drain(host);
        for command in std::mem::take(&mut self.hosts[host].pending) {
            self.run_command(host, command);
        }
        Ok(())
    }

    /// The handshake completes on the accepting side, and at the same
    /// instant on the dialling side ([`HANDSHAKE_FLIGHTS`] after the dial).
    fn accept(&mut self, link_id: LinkId) {
        let Some(link) = self.links.get(link_id) else { return };
        let (a, b) = (link.ends[0].status(), link.ends[1].status());
        let (dialed_at, wedged) = (link.dialed_at_us, link.wedged);
        if !self.alive(a.host, a.incarnation) {
            self.links.remove(link_id);
            return;
        }
        let latency = self.latency_us(a.host, b.host);
        let addr = host_addr(b.host as usize);
        if !self.alive(b.host, b.incarnation) || self.hosts[b.host as usize].node.is_none() {
            // The acceptor died: the dialer sees the reset.
            self.links.remove(link_id);
            let at = self.now_us + latency;
            self.queue.push(at, Event::DialFailed { host: a.host, incarnation: a.incarnation, addr: Box::new(addr) });
            return;
        }
        if wedged {
            // Cut mid-handshake: the dialer's handshake times out.
            self.links.remove(link_id);
            let at = (dialed_at + micros(self.driver.handshake_timeout)).max(self.now_us);
            self.queue.push(at, Event::DialFailed { host: a.host, incarnation: a.incarnation, addr: Box::new(addr) });
            return;
        }
        self.bytes_by_kind[FrameKind::Handshake as usize] += 2 * self.handshake_bytes;
        let host = &mut self.hosts[b.host as usize];
        if host.conns.len() >= self.driver.connections_max {
            // The driver refuses past `connections_max` with a goodbye.
            self.counters.connections_refused += 1;
            if let Some(link) = self.links.get_mut(link_id) {
                link.shut(1);
            }
            self.bytes_by_kind[FrameKind::Control as usize] += self.goodbye_bytes();
            self.connected(link_id, true);
            return;
        }
        let conn = ConnId(host.next_conn);
        host.next_conn += 1;
        host.conns.insert(conn, link_id);
        if let Some(link) = self.links.get_mut(link_id) {
            link.ends[1].conn = Some(conn);
            link.last_sent_us = [self.now_us; 2];
            link.last_received_us = [self.now_us; 2];
        }
        self.counters.connections += 1;
        let peer = self.hosts[a.host as usize].id;
        let addr = host_addr(a.host as usize);
        self.with_node(b.host as usize, |node, now| {
            node.handle_input(now, NodeInput::Connected { conn, peer, addr, dialed: None });
        });
        // Both sides finish together, one connection after another in the
        // order the dials were made (turmoil delivers the handshakes' frames
        // in the order they were sent): when two hosts dial each other at
        // once, both see the same connection last and use it.
        self.connected(link_id, false);
    }

    /// The handshake completes on the dialling side; `refused` when the
    /// acceptor was full and sends a goodbye right behind its proof.
    fn connected(&mut self, link_id: LinkId, refused: bool) {
        let Some(link) = self.links.get(link_id) else { return };
        let (a, b) = (link.ends[0].status(), link.ends[1].status());
        let (dialed_at, wedged) = (link.dialed_at_us, link.wedged);
        let addr = host_addr(b.host as usize);
        if !self.alive(a.host, a.incarnation) {
            // The dialer crashed mid-handshake: the acceptor sees the reset.
            self.reset(a.host, link_id);
            return;
        }
        let host = &mut self.hosts[a.host as usize];
        host.dialing = host.dialing.saturating_sub(1);
        if wedged || !a.open {
            // Cut (the handshake times out) or reset before the proof.
            if let Some(link) = self.links.get_mut(link_id) {
                link.shut(0);
                if link.is_dead() {
                    self.links.remove(link_id);
                }
            }
            let at =
                if wedged { (dialed_at + micros(self.driver.handshake_timeout)).max(self.now_us) } else { self.now_us };
            host.dialing += 1; // the DialFailed event settles it
            self.queue.push(at, Event::DialFailed { host: a.host, incarnation: a.incarnation, addr: Box::new(addr) });
            return;
        }
        if host.conns.len() >= self.driver.connections_max {
            // Our own driver is full: goodbye, and the node never hears.
            self.counters.connections_refused += 1;
            self.bytes_by_kind[FrameKind::Control as usize] += self.goodbye_bytes();
            self.reset(a.host, link_id);
            return;
        }
        let conn = ConnId(host.next_conn);
        host.next_conn += 1;
        host.conns.insert(conn, link_id);
        if let Some(link) = self.links.get_mut(link_id) {
            link.ends[0].conn = Some(conn);
            link.last_received_us[0] = self.now_us;
        }
        let peer = self.hosts[b.host as usize].id;
        self.with_node(a.host as usize, |node, now| {
            node.handle_input(now, NodeInput::Connected { conn, peer, addr, dialed: Some(addr) });
        });
        if refused {
            // The acceptor's goodbye follows its proof.
            let at = self.now_us + self.latency_us(a.host, b.host);
            self.queue.push(at, Event::Close { link: link_id, side: 0 });
        }
    }

    fn goodbye_bytes(&self) -> u64 {
        let goodbye = Message::Goodbye { reason: GoodbyeReason::TooManyConnections };
        shoal_node::core::wire::encoded_len(&goodbye, self.frame_bytes_max).map_or(0, u64::from)
    }

    /// A side's connection ended without it asking: its node hears
    /// `Disconnected` (the driver's reader stopped).
    fn close(&mut self, link_id: LinkId, side: usize) {
        let Some(link) = self.links.get_mut(link_id) else { return };
        let end = link.ends[side].status();
        // The reader stopped; the driver aborts the writer with it.
        link.shut(side);
        if link.is_dead() {
            self.links.remove(link_id);
        }
        let Some(conn) = end.conn.filter(|_| end.open) else { return };
        if !self.alive(end.host, end.incarnation) {
            return;
        }
        let conns = &mut self.hosts[end.host as usize].conns;
        if conns.get(conn) == Some(link_id) {
            conns.remove(conn);
            self.with_node(end.host as usize, |node, now| node.handle_input(now, NodeInput::Disconnected { conn }));
        }
    }

    fn arrive(&mut self, link_id: LinkId, to: usize, bytes: u32, frame: FrameId) {
        let Some(link) = self.links.get_mut(link_id) else { return self.frames.drop_frame(frame) };
        if link.wedged || !link.ends[to].open {
            self.counters.frames_lost += 1;
            return self.frames.drop_frame(frame);
        }
        link.last_received_us[to] = self.now_us;
        let host = link.ends[to].host as usize;
        // The driver's reader: take from the download bucket, sleep, hand
        // over. The bucket's debt is shared by all the host's readers.
        let now = self.sim_now();
        let wait = self.hosts[host].download.take(u64::from(bytes), now);
        if wait.is_zero() {
            let message = self.frames.take(frame);
            self.deliver(link_id, to, message);
        } else {
            // The frame waits where it is.
            self.queue.push(self.now_us + micros(wait), Event::Deliver { link: link_id, to: to as u8, frame });
        }
    }

    /// The driver's reader hands a frame to the loop: a goodbye ends the
    /// connection, anything else goes to the node.
    fn deliver(&mut self, link_id: LinkId, to: usize, message: Message) {
        let Some(link) = self.links.get(link_id) else { return };
        let end = &link.ends[to];
        let (Some(conn), true, false) = (end.conn, end.open, link.wedged) else {
            self.counters.frames_lost += 1;
            return;
        };
        let host = end.host as usize;
        if let Message::Exchange(ExchangeMessage::Cancel { file, piece, offset, .. }) = &message {
            self.take_back(link_id, to, (*file, *piece, *offset));
        }
        match message {
            Message::Goodbye { .. } => self.close(link_id, to),
            Message::Keepalive => {}
            message => {
                if self.hosts[host].conns.get(conn) == Some(link_id) {
                    self.with_node(host, |node, now| node.handle_input(now, NodeInput::Message { conn, message }));
                }
            }
        }
    }

    /// The driver's `OutboxSender::cancel`: a peer's `Cancel` takes back a
    /// block still waiting in our writer's queue on that connection (BEP 3).
    fn take_back(&mut self, link_id: LinkId, side: usize, block: (FileId, PieceIndex, u32)) {
        let Some(link) = self.links.get_mut(link_id) else { return };
        if link.ends[side].writer.cancel(block) {
            self.counters.blocks_cancelled += 1;
        }
    }

    // ---- the driver's side of the node ----

    /// Run `f` on a host's node, then drain its outputs and re-arm its
    /// timer (the driver's loop turn).
    fn with_node(&mut self, host: usize, f: impl FnOnce(&mut Node, Instant)) {
        let Some(mut node) = self.hosts[host].node.take() else { return };
        f(&mut node, self.host_now(host));
        self.hosts[host].node = Some(node);
        self.drain(host);
    }

    fn drain(&mut self, host: usize) {
        let Some(mut node) = self.hosts[host].node.take() else { return };
        let now = self.host_now(host);
        while let Some(output) = node.poll_output() {
            match output {
                NodeOutput::Dial { addr } => {
                    let h = &self.hosts[host];
                    if h.conns.len() + h.dialing >= self.driver.connections_max {
                        self.counters.connections_refused += 1;
                        node.handle_input(now, NodeInput::DialFailed { addr });
                    } else {
                        self.hosts[host].dialing += 1;
                        self.dial(host, addr);
                    }
                }
                NodeOutput::Send { conn, message } => self.send(host, &mut node, conn, message),
                NodeOutput::ServeBlock(ServeBlock { conn, file, piece, offset, length }) => {
                    match self.hosts[host].store.read_block(&file, piece, offset, length) {
                        Ok(data) => {
                            let data = if self.plan.hosts[host].behaviour == Behaviour::Corrupt {
                                corrupt_block(&data)
                            } else {
                                data
                            };
                            let message = Message::Exchange(ExchangeMessage::Block { file, piece, offset, data });
                            self.send(host, &mut node, conn, message);
                        }
                        Err(_) => self.counters.store_errors += 1,
                    }
                    node.handle_input(now, NodeInput::BlockSent { conn, file });
                }
                // The turmoil engine's driver hashes inline too: the
                // answer is in before the next event.
                NodeOutput::VerifyPiece(job) => node.handle_input(now, NodeInput::PieceHashed(self.hash_piece(&job))),
                NodeOutput::StorePiece(StorePiece { file, piece, data }) => {
                    let store = &mut self.hosts[host].store;
                    // A verified piece of a plan file is stored as a slice
                    // of the file's one shared buffer, with its memoised
                    // hash (`hash_piece`), so a thousand holders hold one
                    // copy and the node's assembled copy is freed.
                    let written = match Self::canonical_piece(&self.content_of, &self.contents, &file, piece, &data) {
                        Some((content, range)) => store.write_hashed_piece(
                            &file,
                            piece,
                            content.data.slice(range),
                            &content.hashes[piece.0 as usize],
                        ),
                        None => store.write_piece(&file, piece, data),
                    };
                    let failed = written.is_err();
                    self.counters.store_errors += u64::from(failed);
                }
                NodeOutput::Disconnect { conn, reason } => {
                    if let Some(link) = self.hosts[host].conns.remove(conn) {
                        self.goodbye(host as u32, link, reason);
                        node.handle_input(now, NodeInput::Disconnected { conn });
                    }
                }
                NodeOutput::Event(event) => {
                    if let NodeEvent::DownloadStarted { manifest, .. } = &event {
                        // The driver's `create_download`.
                        let created = manifest
                            .piece_hashes
                            .as_deref()
                            .is_some_and(|hashes| self.hosts[host].store.create(manifest, hashes).is_ok());
                        self.counters.store_errors += u64::from(!created);
                    }
                    self.collector.node_event(host, self.sim_now(), &event);
                }
                _ => {}
            }
        }
        let h = &mut self.hosts[host];
        let deadline = node.poll_timeout().map(|at| at.as_micros().saturating_add(h.epoch_us));
        h.node = Some(node);
        if deadline != h.timer_us {
            h.timer_us = deadline;
            if let Some(at) = deadline {
                let incarnation = h.incarnation;
                // A deadline already past fires at once, as the driver's
                // `sleep_until` does.
                self.queue.push(at.max(self.now_us), Event::Timer { host: host as u32, incarnation });
            }
        }
    }

    /// The driver's hashing of a piece, with a memo: bytes equal to the
    /// plan file's piece have the hash computed when the file was
    /// generated (SHA-256 is a function of the bytes), so only bytes that
    /// differ are hashed. A byte compare costs a fraction of a hash: in
    /// the 200-peer flash crowd, hashing was 14% of the run's samples.
    fn hash_piece(&self, job: &VerifyPiece) -> PieceHashed {
        match Self::canonical_piece(&self.content_of, &self.contents, &job.file, job.piece, &job.data) {
            Some((content, _)) => {
                PieceHashed { file: job.file, piece: job.piece, id: job.id, hash: content.hashes[job.piece.0 as usize] }
            }
            None => job.hash(),
        }
    }

    /// The plan file whose piece `piece` is exactly `data`, and the
    /// piece's range in it.
    fn canonical_piece<'c>(
        content_of: &BTreeMap<FileId, usize>,
        contents: &'c [FileContent],
        file: &FileId,
        piece: PieceIndex,
        data: &[u8],
    ) -> Option<(&'c FileContent, std::ops::Range<usize>)> {
        let content = content_of.get(file).map(|&i| &contents[i])?;
        if piece.0 >= content.layout.piece_count() || data.len() != content.layout.piece_len(piece) as usize {
            return None;
        }
        let start = usize::try_from(content.layout.piece_offset(piece)).ok()?;
        let range = start..start.checked_add(data.len())?;
        (content.data.get(range.clone())? == data).then_some((content, range))
    }

    fn dial(&mut self, host: usize, addr: SocketAddr) {
        let incarnation = self.hosts[host].incarnation;
        let fail = |engine: &mut Self, at| {
            engine.queue.push(at, Event::DialFailed { host: host as u32, incarnation, addr: Box::new(addr) });
        };
        let Some(target) = addr_host(addr, self.hosts.len()).filter(|&t| t != host) else {
            return fail(self, self.now_us);
        };
        let (a, b) = (host as u32, target as u32);
        let latency = self.latency_us(a, b);
        if self.separated(a, b) {
            // turmoil refuses a connect across a partition at once.
            return fail(self, self.now_us);
        }
        if self.hosts[target].state == State::Down {
            // No listener: the SYN is refused where it lands.
            return fail(self, self.now_us + latency);
        }
        let target_incarnation = self.hosts[target].incarnation;
        let id = self.links.insert(Link::new((a, incarnation), (b, target_incarnation), self.now_us));
        self.queue.push(self.now_us + HANDSHAKE_FLIGHTS * latency, Event::Accept { link: id });
    }

    /// The node asked to close: the goodbye goes out ahead of the exchange
    /// frames queued (the control lane), which are then dropped with the
    /// writer, and our side stops reading.
    fn goodbye(&mut self, host: u32, link_id: LinkId, reason: GoodbyeReason) {
        let Some(link) = self.links.get_mut(link_id) else { return };
        let Some(side) = link.side_of(host) else { return };
        link.ends[side].open = false;
        link.ends[side].conn = None;
        self.enqueue(link_id, side, Message::Goodbye { reason });
    }

    /// The driver's `send`: only on a connection it knows; a peer whose
    /// writer queue is full is too slow and is disconnected.
    fn send(&mut self, host: usize, node: &mut Node, conn: ConnId, message: Message) {
        let Some(link_id) = self.hosts[host].conns.get(conn) else { return };
        let Some(link) = self.links.get(link_id) else { return };
        let Some(side) = link.side_of(host as u32) else { return };
        if link.ends[side].writer.len() >= self.driver.conn_queue_frames_max {
            self.counters.slow_peers += 1;
            self.hosts[host].conns.remove(conn);
            // The driver drops its sender; the writer drains and ends.
            if let Some(link) = self.links.get_mut(link_id) {
                link.ends[side].open = false;
                link.ends[side].conn = None;
            }
            node.handle_input(self.host_now(host), NodeInput::Disconnected { conn });
            return;
        }
        self.enqueue(link_id, side, message);
    }

    /// Hand a frame to a side's writer: written now if it is free, else
    /// queued behind the others.
    fn enqueue(&mut self, link_id: LinkId, side: usize, message: Message) {
        let bytes = match shoal_node::core::wire::encoded_len(&message, self.frame_bytes_max) {
            Ok(len) => len,
            Err(_) => {
                // The driver's writer stops on a frame it cannot encode.
                self.counters.frames_unencodable += 1;
                if let Some(link) = self.links.get_mut(link_id) {
                    link.ends[side].writer.open = false;
                    link.ends[side].writer.clear();
                }
                return;
            }
        };
        let Some(link) = self.links.get_mut(link_id) else { return };
        let writer = &mut link.ends[side].writer;
        if !writer.open {
            return;
        }
        let idle = writer.is_empty() && writer.busy_until_us <= self.now_us;
        writer.push(message, bytes);
        if idle {
            self.write_queued(link_id, side);
        } else if writer.len() == 1 {
            let at = writer.busy_until_us;
            self.queue.push(at, Event::WriterReady { link: link_id, side: side as u8 });
        }
    }

    /// The writer is free: write queued frames until one leaves it asleep.
    fn write_queued(&mut self, link_id: LinkId, side: usize) {
        loop {
            let Some(link) = self.links.get(link_id) else { return };
            let end = &link.ends[side];
            if !self.alive(end.host, end.incarnation) {
                // The host crashed with frames queued: they are gone.
                if let Some(link) = self.links.get_mut(link_id) {
                    link.shut(side);
                }
                return;
            }
            let Some(link) = self.links.get_mut(link_id) else { return };
            let writer = &mut link.ends[side].writer;
            if !writer.open || writer.busy_until_us > self.now_us {
                return;
            }
            let Some((message, bytes)) = writer.pop() else { return };
            let goodbye = matches!(message, Message::Goodbye { .. });
            self.write(link_id, side, message, bytes);
            let Some(link) = self.links.get_mut(link_id) else { return };
            let writer = &mut link.ends[side].writer;
            if goodbye {
                // The driver's writer ends after a goodbye.
                writer.open = false;
                writer.clear();
                if link.is_dead() {
                    self.links.remove(link_id);
                }
                return;
            }
            if writer.busy_until_us > self.now_us {
                if !writer.is_empty() {
                    let at = writer.busy_until_us;
                    self.queue.push(at, Event::WriterReady { link: link_id, side: side as u8 });
                }
                return;
            }
        }
    }

    /// One frame goes on the wire: counted, charged to the upload bucket
    /// (the writer sleeps for the debt), and in flight to the peer.
    fn write(&mut self, link_id: LinkId, side: usize, message: Message, bytes: u32) {
        let Some(link) = self.links.get(link_id) else { return };
        let (host, peer) = (link.ends[side].host, link.ends[1 - side].host);
        self.bytes_by_kind[kind_index(&message)] += u64::from(bytes);
        self.frames_by_kind[kind_index(&message)] += 1;
        self.counters.frames += 1;
        let now_d = self.sim_now();
        let wait = self.hosts[host as usize].upload.take(u64::from(bytes), now_d);
        let flight = self.flight_us(host, peer);
        let now = self.now_us;
        let Some(link) = self.links.get_mut(link_id) else { return };
        link.ends[side].writer.busy_until_us = now + micros(wait);
        link.last_sent_us[side] = now;
        if link.wedged {
            self.counters.frames_lost += 1;
            return;
        }
        let to = 1 - side;
        let at = (now + flight).max(link.last_arrival_us[to]);
        link.last_arrival_us[to] = at;
        let frame = self.frames.hold(message);
        self.queue.push(at, Event::Arrive { link: link_id, to: to as u8, bytes, frame });
    }

    fn finish(mut self, sim_time: Duration, rss: Option<(u64, u64)>) -> RunResult<Outcome> {
        // Node counters summed over the hosts up at the end.
        type Counter = (&'static str, fn(&Node) -> u64);
        let node_counters: [Counter; 14] = [
            ("node_responses_unexpected", |n| n.counters().responses_unexpected),
            ("node_dial_queue_full", |n| n.counters().dial_queue_full),
            ("node_connections_idle_closed", |n| n.counters().connections_idle_closed),
            ("node_probes_skipped", |n| n.counters().probes_skipped),
            ("node_swarm_dials_skipped", |n| n.counters().swarm_dials_skipped),
            ("node_connections_open", |n| n.connections() as u64),
            ("gossip_forwarded", |n| n.gossip().counters().forwarded),
            ("gossip_ihave_sent", |n| n.gossip().counters().ihave_sent),
            ("gossip_grafts_sent", |n| n.gossip().counters().grafts_sent),
            ("gossip_prunes_sent", |n| n.gossip().counters().prunes_sent),
            ("gossip_relay_budget_exceeded", |n| n.gossip().counters().relay_budget_exceeded),
            ("gossip_heartbeats", |n| n.gossip().counters().heartbeats),
            ("kad_requests_sent", |n| n.kad().counters().requests_sent),
            ("kad_join_refreshes_skipped", |n| n.kad().counters().join_refreshes_skipped),
        ];
        let mut node_sums = [0u64; 14];
        for node in self.hosts.iter().filter_map(|h| h.node.as_ref()) {
            self.gossip_duplicates += node.gossip().counters().duplicates;
            for (sum, (_, counter)) in node_sums.iter_mut().zip(&node_counters) {
                *sum += counter(node);
            }
        }
        let (records, trace_hash, events) = self.collector.finish();
        let mut bad_content = Vec::new();
        let mut checked = std::collections::BTreeSet::new();
        for r in &records {
            if let Fact::DownloadCompleted { file } = r.fact
                && checked.insert((r.host, file))
                && let Some(content) = self.contents.get(usize::from(file))
                && !content.held_exactly(&self.hosts[r.host as usize].store)
            {
                bad_content.push(self.plan.hosts[r.host as usize].name.clone());
            }
        }
        let bytes_by_kind =
            FrameKind::ALL.iter().map(|&k| (k.name().to_owned(), self.bytes_by_kind[k as usize])).collect();
        let c = self.counters;
        let mut engine_stats: BTreeMap<String, f64> = [
            ("events", c.events as f64),
            ("events_scheduled", self.queue.scheduled() as f64),
            ("event_queue_max", self.queue.len_max() as f64),
            ("frames", c.frames as f64),
            ("frames_lost", c.frames_lost as f64),
            ("frames_unencodable", c.frames_unencodable as f64),
            ("connections", c.connections as f64),
            ("connections_refused", c.connections_refused as f64),
            ("dials_failed", c.dials_failed as f64),
            ("store_errors", c.store_errors as f64),
            ("slow_peers", c.slow_peers as f64),
            ("blocks_cancelled", c.blocks_cancelled as f64),
        ]
        .into_iter()
        .chain(node_counters.iter().zip(node_sums).map(|(&(k, _), v)| (k, v as f64)))
        .map(|(k, v)| (k.to_owned(), v))
        .chain(FrameKind::ALL.iter().map(|&k| (format!("frames_{}", k.name()), self.frames_by_kind[k as usize] as f64)))
        .collect();
        if let Some((start, end)) = rss {
            // Process RSS growth over the run (engine, nodes, stores, links,
            // the trace's records), per host: an upper bound on a node's
            // own state, measured, not estimated.
            engine_stats.insert("rss_bytes_end".into(), end as f64);
            engine_stats
                .insert("rss_bytes_per_node".into(), end.saturating_sub(start) as f64 / self.hosts.len() as f64);
        }
        Ok(Outcome {
            engine: EngineKind::Des,
            sim_time,
            trace_hash,
            events,
            records,
            node_ids: self.hosts.iter().map(|h| h.id).collect(),
            bytes_by_kind,
            gossip_duplicates: self.gossip_duplicates,
            bad_content,
            engine_stats,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_map_back_to_hosts() {
        for index in [0, 1, 255, 256, 70_000, 199_999] {
            assert_eq!(addr_host(host_addr(index), 200_000), Some(index));
        }
        assert_eq!(addr_host(host_addr(10), 10), None, "past the last host");
        assert_eq!(addr_host(SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)), PORT + 1), 10), None);
        assert_eq!(addr_host("[::1]:4100".parse().unwrap(), 10), None);
    }
}
