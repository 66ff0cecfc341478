//! The turmoil engine: every host runs the unmodified `shoal-node` driver
//! over turmoil's simulated TCP with an in-memory store that survives its
//! restarts. Per-host seeds derive from (scenario seed, host index,
//! incarnation); turmoil's own RNG from the scenario seed; bandwidth is the
//! driver's token buckets in virtual time (turmoil has none). Hosts report
//! node events with simulated timestamps to a [`Collector`].
//!
//! Every host is registered at the start with software that waits; the
//! engine boots it at its arrival (and restarts it after a crash) by
//! leaving a command channel in its slot and bouncing it, so a host's
//! whole life is one turmoil host.

use std::cell::Cell;
use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex, Once};
use std::task::{Context, Poll};
use std::time::Duration;

use shoal_node::core::node::Node;
use shoal_node::core::wire::Contact;
use shoal_node::driver::{Command, Driver, DriverConfig, FrameKind, Traffic};
use shoal_node::identity::Identity;
use shoal_node::store::MemoryStore;
use tokio::sync::mpsc;

use shoal_node::store::Store;

use crate::model::{Action, Behaviour, EngineKind, Plan, Scenario, derive_seed, purpose};
use crate::observe::{Collector, Fact, Outcome};
use crate::stores::{CorruptingStore, DurableStore, FileContent, lock};
use crate::transport::TurmoilTcp;

/// The port every simulated node listens on.
pub const PORT: u16 = 4100;
/// Commands queued to one host.
const COMMANDS_MAX: usize = 256;
/// Simulated time between progress reports.
const PROGRESS_EVERY: Duration = Duration::from_secs(1);

/// Where a run is, for a progress bar.
#[derive(Clone, Copy, Debug)]
pub struct Progress {
    /// Simulated time reached.
    pub sim_time: Duration,
    /// The deadline.
    pub deadline: Duration,
    /// Downloads completed.
    pub completed: usize,
    /// Downloads asked for in the plan.
    pub downloads: usize,
}

/// The next incarnation's command channel and number, left for the host
/// factory.
type Inbox = Arc<Mutex<Option<(mpsc::Receiver<Command>, u32)>>>;

/// What the engine keeps per host outside turmoil.
struct Slot {
    store: Arc<Mutex<MemoryStore>>,
    /// The next incarnation's command channel and number.
    inbox: Inbox,
    commands: Option<mpsc::Sender<Command>>,
    incarnation: u32,
    up: bool,
    started_at: Duration,
    /// Files asked for, re-asked after a restart.
    asked: Vec<usize>,
}

thread_local! {
    /// The host whose main task is being polled on this thread.
    static POLLING: Cell<Option<usize>> = const { Cell::new(None) };
    /// The last panic in a host's main task: (host, message).
    static HOST_PANIC: Cell<Option<(usize, String)>> = const { Cell::new(None) };
}

/// Installs (once per process) a panic hook that notes which host's main
/// task panicked, then defers to the previous hook.
fn install_panic_hook() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if let Some(host) = POLLING.with(Cell::get) {
                HOST_PANIC.with(|p| p.set(Some((host, info.to_string()))));
            }
            previous(info);
        }));
    });
}

/// A host's main future, labelled with its index while polled.
struct Labelled<F> {
    host: usize,
    inner: Pin<Box<F>>,
}

impl<F: Future> Future for Labelled<F> {
    type Output = F::Output;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let previous = POLLING.with(|p| p.replace(Some(self.host)));
        let out = self.inner.as_mut().poll(cx);
        POLLING.with(|p| p.set(previous));
        out
    }
}

fn host_ip_name(plan: &Plan, host: usize) -> String {
    plan.hosts[host].name.clone()
}

/// Run a planned scenario in turmoil.
pub fn run(
    scenario: &Scenario,
    plan: &Plan,
    mut progress: Option<&mut dyn FnMut(Progress)>,
) -> Result<Outcome, String> {
    install_panic_hook();
    let contents: Vec<FileContent> = plan.files.iter().map(FileContent::generate).collect::<Result<_, _>>()?;
    let file_ids: Vec<_> = contents.iter().map(|c| c.id).collect();
    let collector = Arc::new(Mutex::new(Collector::new(&file_ids)));
    let node_ids: Vec<_> = (0..plan.hosts.len())
        .map(|h| Identity::from_secret(derive_seed(scenario.seed, h, 0, purpose::IDENTITY)).node_id())
        .collect();

    let single_latency = plan.latency.len() == 1;
    let base = plan.latency[0][0];
    let mut builder = turmoil::Builder::new();
    builder
        .simulation_duration(plan.duration + Duration::from_secs(2))
        .tick_duration(Duration::from_millis(1))
        .min_message_latency(base)
        .max_message_latency(if single_latency { base + plan.jitter } else { base })
        .rng_seed(scenario.seed)
        // turmoil's default of 64 also sizes a listener's SYN queue, and a
        // full queue panics instead of refusing: 99 hosts bootstrapping
        // through one host in the same tick overflow it.
        .tcp_capacity(4096);
    let mut sim = builder.build();
    let traffic: Arc<Mutex<Vec<Arc<Traffic>>>> = Arc::new(Mutex::new(Vec::new()));

    let mut slots = Vec::with_capacity(plan.hosts.len());
    for (index, host) in plan.hosts.iter().enumerate() {
        let store = Arc::new(Mutex::new(MemoryStore::new()));
        let inbox: Inbox = Arc::new(Mutex::new(None));
        let (collector, traffic, durable, slot_inbox) =
            (collector.clone(), traffic.clone(), store.clone(), inbox.clone());
        let (config, seed, host) = (plan.config.clone(), scenario.seed, host.clone());
        sim.host(host.name.clone(), move || {
            let next = lock(&slot_inbox).take();
            let (collector, traffic, durable) = (collector.clone(), traffic.clone(), durable.clone());
            let (config, host) = (config.clone(), host.clone());
            Labelled {
                host: index,
                inner: Box::pin(async move {
                    // Not booted yet (or a bounce without a new incarnation):
                    // no listener, so dials to it are refused.
                    let Some((rx, incarnation)) = next else {
                        std::future::pending::<()>().await;
                        return Ok(());
                    };
                    let ip: IpAddr = turmoil::lookup(host.name.as_str());
                    let mut driver_config = DriverConfig::new(SocketAddr::new(IpAddr::from([0, 0, 0, 0]), PORT));
                    driver_config.advertise = Some(SocketAddr::new(ip, PORT));
                    driver_config.max_upload_bytes_per_s = host.uplink;
                    driver_config.max_download_bytes_per_s = host.downlink;
                    let identity = Identity::from_secret(derive_seed(seed, index, 0, purpose::IDENTITY));
                    let driver = Driver::bind(TurmoilTcp, identity.clone(), driver_config).await?;
                    lock(&traffic).push(driver.traffic());
                    let local = Contact { id: identity.node_id(), addr: driver.local_addr() };
                    let node_seed = derive_seed(seed, index, incarnation, purpose::NODE);
                    let node = Node::new(config, local, node_seed, driver.now()).map_err(|e| e.to_string())?;
                    let observer = Box::new(move |at: shoal_node::core::time::Instant, event: &_| {
                        // Simulation time: a restarted driver's clock starts
                        // again at zero.
                        let now = turmoil::sim_elapsed().unwrap_or(at.since_epoch());
                        lock(&collector).node_event(index, now, event);
                    });
                    let run_seed = derive_seed(seed, index, incarnation, purpose::DRIVER);
                    let store = DurableStore::attach(durable);
                    if host.behaviour == Behaviour::Corrupt {
                        driver.run(node, CorruptingStore(store), rx, Some(observer), run_seed).await;
                    } else {
                        driver.run(node, store, rx, Some(observer), run_seed).await;
                    }
                    std::future::pending::<()>().await;
                    Ok(())
                }),
            }
        });
        slots.push(Slot {
            store,
            inbox,
            commands: None,
            incarnation: 0,
            up: false,
            started_at: Duration::ZERO,
            asked: Vec::new(),
        });
    }

    if !single_latency || !plan.jitter.is_zero() {
        for a in 0..plan.hosts.len() {
            for b in a + 1..plan.hosts.len() {
                let latency = plan.latency_between(a, b);
                let (na, nb) = (host_ip_name(plan, a), host_ip_name(plan, b));
                sim.set_link_latency(na.as_str(), nb.as_str(), latency);
                sim.set_link_max_message_latency(na.as_str(), nb.as_str(), latency + plan.jitter);
            }
        }
    }
    let addrs: Vec<SocketAddr> =
        plan.hosts.iter().map(|h| SocketAddr::new(sim.lookup(h.name.as_str()), PORT)).collect();

    let goal = plan.gets.len();
    let answers_due =
        plan.actions.iter().filter(|(_, a)| matches!(a, Action::Lookup { .. } | Action::Search { .. })).count();
    let last_work = plan.last_work_action();
    let mut next = 0;
    let mut next_progress = Duration::ZERO;
    loop {
        let now = sim.elapsed();
        while next < plan.actions.len() && plan.actions[next].0 <= now {
            let action = &plan.actions[next].1;
            next += 1;
            apply(&mut sim, plan, &contents, &addrs, &mut slots, &collector, now, action)?;
        }
        let (completed, answered) = {
            let c = lock(&collector);
            let answered = c.answers();
            (c.completions(), answered)
        };
        if let Some(report) = progress.as_mut()
            && now >= next_progress
        {
            next_progress = now + PROGRESS_EVERY;
            report(Progress { sim_time: now, deadline: plan.duration, completed, downloads: goal });
        }
        let work = goal > 0 || answers_due > 0;
        let done = work && next > last_work && completed >= goal && answered >= answers_due;
        if done || now >= plan.duration {
            break;
        }
        step(&mut sim, now, scenario.seed, plan)?;
    }
    let sim_time = sim.elapsed();
    for slot in &slots {
        if let Some(tx) = &slot.commands {
            let _ = tx.try_send(Command::Shutdown);
        }
    }
    for _ in 0..10 {
        let now = sim.elapsed();
        step(&mut sim, now, scenario.seed, plan)?;
    }

    // The host factories hold the collector; the simulation goes first.
    drop(sim);
    let collector = Arc::try_unwrap(collector)
        .map_err(|_| "the collector is still shared after the run".to_owned())?
        .into_inner()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let (records, trace_hash, events) = collector.finish();
    let mut bad_content = Vec::new();
    let mut checked = std::collections::BTreeSet::new();
    for r in &records {
        if let Fact::DownloadCompleted { file } = r.fact
            && checked.insert((r.host, file))
            && let Some(content) = contents.get(usize::from(file))
            && !content.held_exactly(&lock(&slots[r.host as usize].store))
        {
            bad_content.push(plan.hosts[r.host as usize].name.clone());
        }
    }
    let mut bytes_by_kind = BTreeMap::new();
    let mut gossip_duplicates = 0;
    for host in lock(&traffic).iter() {
        for kind in FrameKind::ALL {
            *bytes_by_kind.entry(kind.name().to_owned()).or_insert(0) += host.sent(kind);
        }
        gossip_duplicates += host.gossip_duplicates();
    }
    Ok(Outcome {
        engine: EngineKind::Turmoil,
        sim_time,
        trace_hash,
        events,
        records,
        node_ids,
        bytes_by_kind,
        gossip_duplicates,
        bad_content,
        engine_stats: BTreeMap::new(),
    })
}

/// Carry out one planned action.
#[allow(clippy::too_many_arguments)]
fn apply(
    sim: &mut turmoil::Sim<'_>,
    plan: &Plan,
    contents: &[FileContent],
    addrs: &[SocketAddr],
    slots: &mut [Slot],
    collector: &Mutex<Collector>,
    now: Duration,
    action: &Action,
) -> Result<(), String> {
    let send = |slot: &Slot, command: Command| {
        if let Some(tx) = &slot.commands {
            // A full queue drops the command, as a busy daemon's API would
            // refuse it; the plan's volumes stay far below the bound.
            let _ = tx.try_send(command);
        }
    };
    match action {
        Action::Boot { host } | Action::Restart { host } => {
            let host = *host;
            let slot = &mut slots[host];
            slot.incarnation += u32::from(matches!(action, Action::Restart { .. }));
            let (tx, rx) = mpsc::channel(COMMANDS_MAX);
            let seeds: Vec<SocketAddr> = plan.hosts[host].bootstrap.iter().map(|&b| addrs[b]).collect();
            if !seeds.is_empty() {
                let _ = tx.try_send(Command::Bootstrap(seeds));
            }
            for &file in &slot.asked {
                let _ = tx.try_send(Command::Get { file: contents[file].id });
            }
            *lock(&slot.inbox) = Some((rx, slot.incarnation));
            slot.commands = Some(tx);
            slot.up = true;
            slot.started_at = now;
            sim.bounce(plan.hosts[host].name.as_str());
            let fact = if matches!(action, Action::Boot { .. }) { Fact::Booted } else { Fact::Restarted };
            lock(collector).engine(host, now, fact);
        }
        Action::Crash { host } => {
            let slot = &mut slots[*host];
            if slot.up {
                slot.up = false;
                slot.commands = None;
                sim.crash(plan.hosts[*host].name.as_str());
                lock(collector).engine(*host, now, Fact::Crashed);
            }
        }
        Action::Share { host, file } => {
            let content = &contents[*file];
            let slot = &slots[*host];
            lock(&slot.store)
                .add_shared(content.data.clone(), &content.manifest, &content.hashes)
                .map_err(|e| format!("{}: sharing {}: {e}", plan.hosts[*host].name, plan.files[*file].name))?;
            // A driver starting now shares its store's files by itself.
            if slot.up && slot.started_at < now {
                send(slot, Command::Share { file: content.id });
            }
        }
        Action::Get { host, file } => {
            let slot = &mut slots[*host];
            slot.asked.push(*file);
            if slot.up {
                send(slot, Command::Get { file: contents[*file].id });
            }
        }
        Action::Search { host, search } => {
            let slot = &slots[*host];
            if slot.up {
                let text = plan_search_text(plan, *search);
                send(slot, Command::Search { text });
            }
        }
        Action::Lookup { host, target } => {
            let slot = &slots[*host];
            if slot.up {
                send(slot, Command::Lookup { target: *target });
            }
        }
        Action::Split { side, .. } | Action::Heal { side, .. } => {
            let inside: std::collections::BTreeSet<usize> = side.iter().copied().collect();
            for &a in side {
                for b in (0..plan.hosts.len()).filter(|b| !inside.contains(b)) {
                    let (na, nb) = (plan.hosts[a].name.as_str(), plan.hosts[b].name.as_str());
                    if matches!(action, Action::Split { .. }) {
                        sim.partition(na, nb);
                    } else {
                        sim.repair(na, nb);
                    }
                }
            }
        }
    }
    Ok(())
}

fn plan_search_text(plan: &Plan, search: usize) -> String {
    plan.searches.get(search).cloned().unwrap_or_default()
}

/// One turmoil step; a host error or a panic anywhere in the simulation is
/// a failed run naming the seed, the simulated time and, for a panic in a
/// host's main task, the host.
fn step(sim: &mut turmoil::Sim<'_>, now: Duration, seed: u64, plan: &Plan) -> Result<(), String> {
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| sim.step()));
    let host = HOST_PANIC.with(Cell::take).map(|(h, message)| (plan.hosts[h].name.clone(), message));
    let at = format!("at {:.3} s (seed {seed})", now.as_secs_f64());
    match (result, host) {
        (Ok(Ok(_)), None) => Ok(()),
        (_, Some((name, message))) => Err(format!("host {name} panicked {at}: {message}")),
        (Ok(Err(e)), None) => Err(format!("simulation failed {at}: {e}")),
        (Err(panic), None) => {
            let message = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                .unwrap_or_default();
            Err(format!("simulation panicked {at}: {message}"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A panic in a host's main task fails the run naming the host, the
    /// simulated time and the seed.
    #[test]
    fn a_host_panic_names_the_host() {
        install_panic_hook();
        let plan = Scenario::flash_crowd(2, 1024, 5).plan().unwrap();
        let mut sim = turmoil::Builder::new().build();
        for (index, host) in plan.hosts.iter().enumerate() {
            sim.host(host.name.as_str(), move || Labelled {
                host: index,
                inner: Box::pin(async move {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    assert!(index != 2, "host {index} hit a bug");
                    std::future::pending::<()>().await;
                    Ok(())
                }),
            });
        }
        let error = (0..1000).find_map(|_| step(&mut sim, Duration::from_millis(50), 5, &plan).err()).unwrap();
        assert!(error.starts_with("host leechers-1 panicked at 0.050 s (seed 5)"), "{error}");
        assert!(error.contains("host 2 hit a bug"), "{error}");
    }
}
