//! An in-process, deterministic multi-node harness for core tests: no
//! tokio, no turmoil, no sockets. It steps the earliest event among all
//! machines (quinn-proto's `tests/util.rs` `Pair`, generalised to N nodes),
//! delivering each message after a fixed one-way latency.
//!
//! Events are ordered by (time, sequence number), and each node's timer is
//! kept in an ordered set, so a step costs O(log N) even at thousands of
//! nodes, and the same inputs always replay the same run.
//!
//! Faults: [`Network::crash`] makes a node vanish silently (no answer, no
//! FIN: messages to it are dropped, its timers stop), and
//! [`Network::partition`] drops messages between groups until healed.
//!
//! Compiled for core's own tests and, with the `testkit` feature, for other
//! crates' tests and benches.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use crate::time::Instant;

/// Index of a node in a [`Network`].
pub type NodeIndex = usize;

/// A sans-IO machine as the harness drives it: the one surface of
/// DESIGN.md, with peers addressed by [`NodeIndex`]. Each protocol's tests
/// adapt their machine to this trait.
pub trait Machine {
    /// What travels between machines.
    type Message;
    /// A message from `from` arrived.
    fn handle_message(&mut self, now: Instant, from: NodeIndex, message: Self::Message);
    /// The deadline from `poll_timeout` passed (may be called early).
    fn handle_timeout(&mut self, now: Instant);
    /// Next message to send, drained until `None` after every mutation.
    fn poll_transmit(&mut self) -> Option<(NodeIndex, Self::Message)>;
    /// The earliest deadline, if any.
    fn poll_timeout(&self) -> Option<Instant>;
}

/// Message counts kept by the harness.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetworkStats {
    /// Messages handed to a live, reachable destination.
    pub delivered: u64,
    /// Messages dropped: destination crashed or partitioned away.
    pub dropped: u64,
    /// Timer events run.
    pub timeouts: u64,
}

struct InFlight<M> {
    from: NodeIndex,
    to: NodeIndex,
    message: M,
}

/// N machines connected by a lossless network with a fixed latency.
pub struct Network<M: Machine> {
    nodes: Vec<M>,
    alive: Vec<bool>,
    group: Vec<u32>,
    deadline: Vec<Option<Instant>>,
    timers: BTreeSet<(Instant, NodeIndex)>,
    in_flight: BTreeMap<(Instant, u64), InFlight<M::Message>>,
    seq: u64,
    now: Instant,
    latency: Duration,
    stats: NetworkStats,
}

impl<M: Machine> Network<M> {
    /// An empty network whose messages take `latency` one way.
    #[must_use]
    pub fn new(latency: Duration) -> Self {
        Self {
            nodes: Vec::new(),
            alive: Vec::new(),
            group: Vec::new(),
            deadline: Vec::new(),
            timers: BTreeSet::new(),
            in_flight: BTreeMap::new(),
            seq: 0,
            now: Instant::ZERO,
            latency,
            stats: NetworkStats::default(),
        }
    }

    /// Add a machine; returns its index.
    pub fn add(&mut self, machine: M) -> NodeIndex {
        let index = self.nodes.len();
        self.nodes.push(machine);
        self.alive.push(true);
        self.group.push(0);
        self.deadline.push(None);
        self.drain(index);
        index
    }

    /// Current simulated time.
    #[must_use]
    pub fn now(&self) -> Instant {
        self.now
    }

    /// Number of nodes ever added (crashed ones included).
    #[must_use]
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Whether no node was added.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// Counters so far.
    #[must_use]
    pub fn stats(&self) -> NetworkStats {
        self.stats
    }

    /// Read a machine.
    #[must_use]
    pub fn node(&self, index: NodeIndex) -> &M {
        &self.nodes[index]
    }

    /// All machines, by index.
    pub fn nodes(&self) -> impl Iterator<Item = (NodeIndex, &M)> {
        self.nodes.iter().enumerate()
    }

    /// Whether a node is alive (not crashed).
    #[must_use]
    pub fn is_alive(&self, index: NodeIndex) -> bool {
        self.alive[index]
    }

    /// Mutate a machine from outside (a user command), then drain its
    /// output and re-arm its timer, as a driver would.
    pub fn with_node<R>(&mut self, index: NodeIndex, f: impl FnOnce(&mut M, Instant) -> R) -> R {
        let result = f(&mut self.nodes[index], self.now);
        self.drain(index);
        result
    }

    /// The node vanishes silently: no FIN, no answers, no timers.
    pub fn crash(&mut self, index: NodeIndex) {
        self.alive[index] = false;
        self.set_deadline(index, None);
    }

    /// Put nodes into numbered groups; messages between different groups
    /// are dropped until [`heal`](Self::heal). Unlisted nodes stay in group 0.
    pub fn partition(&mut self, groups: &[(NodeIndex, u32)]) {
        for &(index, group) in groups {
            self.group[index] = group;
        }
    }

    /// Remove every partition.
    pub fn heal(&mut self) {
        self.group.fill(0);
    }

    fn set_deadline(&mut self, index: NodeIndex, deadline: Option<Instant>) {
        if let Some(old) = self.deadline[index].take() {
            self.timers.remove(&(old, index));
        }
        if let Some(new) = deadline {
            self.timers.insert((new, index));
        }
        self.deadline[index] = deadline;
    }

    fn drain(&mut self, index: NodeIndex) {
        while let Some((to, message)) = self.nodes[index].poll_transmit() {
            if !self.alive[index] {
                continue; // a crashed node's output goes nowhere
            }
            let at = self.now + self.latency;
            self.seq += 1;
            self.in_flight.insert((at, self.seq), InFlight { from: index, to, message });
        }
        let deadline = if self.alive[index] { self.nodes[index].poll_timeout() } else { None };
        self.set_deadline(index, deadline);
    }

    /// Time of the next event, if any.
    #[must_use]
    pub fn next_event(&self) -> Option<Instant> {
        let message = self.in_flight.first_key_value().map(|(&(at, _), _)| at);
        let timer = self.timers.first().map(|&(at, _)| at);
        match (message, timer) {
            (Some(m), Some(t)) => Some(m.min(t)),
            (m, t) => m.or(t),
        }
    }

    /// Run the next event (messages before timers at the same instant).
    /// Returns `false` when nothing is left to do.
    pub fn step(&mut self) -> bool {
        let message_at = self.in_flight.first_key_value().map(|(&(at, _), _)| at);
        let timer_at = self.timers.first().map(|&(at, _)| at);
        let message_first = match (message_at, timer_at) {
            (None, None) => return false,
            (Some(m), Some(t)) => m <= t,
            (m, _) => m.is_some(),
        };
        if message_first {
            let Some(((at, _), flight)) = self.in_flight.pop_first() else { return false };
            self.now = self.now.max(at);
            let InFlight { from, to, message } = flight;
            let reachable = to < self.nodes.len() && self.alive[to] && self.group[from] == self.group[to];
            if reachable {
                self.stats.delivered += 1;
                self.nodes[to].handle_message(self.now, from, message);
                self.drain(to);
            } else {
                self.stats.dropped += 1;
            }
            true
        } else {
            let Some((t, index)) = self.timers.pop_first() else { return false };
            self.deadline[index] = None;
            self.now = self.now.max(t);
            self.stats.timeouts += 1;
            self.nodes[index].handle_timeout(self.now);
            self.drain(index);
            true
        }
    }

    /// Run every event up to and including `deadline`; time ends at
    /// `deadline`.
    pub fn run_until(&mut self, deadline: Instant) {
        while self.next_event().is_some_and(|at| at <= deadline) {
            self.step();
        }
        self.now = self.now.max(deadline);
    }

    /// Run for `duration` of simulated time.
    pub fn run_for(&mut self, duration: Duration) {
        self.run_until(self.now + duration);
    }

    /// Run until `done` holds (checked after every event) or `deadline`
    /// passes. Returns whether `done` held.
    pub fn run_until_with(&mut self, deadline: Instant, mut done: impl FnMut(&Self) -> bool) -> bool {
        loop {
            if done(self) {
                return true;
            }
            match self.next_event() {
                Some(at) if at <= deadline => {
                    self.step();
                }
                _ => {
                    self.now = self.now.max(deadline);
                    return done(self);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each node forwards a token to the next one; node 0 also ticks.
    struct Relay {
        index: NodeIndex,
        nodes: usize,
        seen: Vec<(Instant, u32)>,
        outbox: Vec<(NodeIndex, u32)>,
        tick_at: Option<Instant>,
        ticks: u32,
    }

    impl Machine for Relay {
        type Message = u32;
        fn handle_message(&mut self, now: Instant, _from: NodeIndex, hops: u32) {
            self.seen.push((now, hops));
            if hops < 5 {
                self.outbox.push(((self.index + 1) % self.nodes, hops + 1));
            }
        }
        fn handle_timeout(&mut self, now: Instant) {
            if self.tick_at.is_some_and(|t| t <= now) {
                self.ticks += 1;
                self.tick_at = (self.ticks < 3).then(|| now + Duration::from_secs(1));
            }
        }
        fn poll_transmit(&mut self) -> Option<(NodeIndex, u32)> {
            self.outbox.pop()
        }
        fn poll_timeout(&self) -> Option<Instant> {
            self.tick_at
        }
    }

    fn relay(index: NodeIndex, nodes: usize) -> Relay {
        Relay {
            index,
            nodes,
            seen: Vec::new(),
            outbox: Vec::new(),
            tick_at: (index == 0).then_some(Instant::from_micros(500_000)),
            ticks: 0,
        }
    }

    #[test]
    fn messages_arrive_after_latency_and_timers_fire_in_order() {
        let mut net = Network::new(Duration::from_millis(10));
        for i in 0..3 {
            net.add(relay(i, 3));
        }
        net.with_node(0, |m, _| m.outbox.push((1, 0)));
        net.run_until(Instant::from_micros(10_000_000));
        assert_eq!(net.node(1).seen, vec![(Instant::from_micros(10_000), 0), (Instant::from_micros(40_000), 3)]);
        assert_eq!(net.node(0).seen.len(), 2);
        assert_eq!(net.node(0).ticks, 3, "timer re-armed twice after the first tick");
        assert_eq!(net.stats(), NetworkStats { delivered: 6, dropped: 0, timeouts: 3 });
    }

    #[test]
    fn crashed_and_partitioned_nodes_drop_messages() {
        let mut net = Network::new(Duration::from_millis(10));
        for i in 0..3 {
            net.add(relay(i, 3));
        }
        net.crash(2);
        net.with_node(0, |m, _| m.outbox.push((1, 0)));
        net.run_for(Duration::from_secs(5));
        assert_eq!(net.node(1).seen.len(), 1);
        assert!(net.node(2).seen.is_empty());
        assert_eq!(net.stats().dropped, 1);
        assert_eq!(net.node(0).ticks, 3);

        let mut net = Network::new(Duration::from_millis(10));
        for i in 0..2 {
            net.add(relay(i, 2));
        }
        net.partition(&[(1, 1)]);
        net.with_node(0, |m, _| m.outbox.push((1, 0)));
        net.run_for(Duration::from_secs(1));
        assert!(net.node(1).seen.is_empty());
        net.heal();
        net.with_node(0, |m, _| m.outbox.push((1, 0)));
        assert!(net.run_until_with(net.now() + Duration::from_secs(1), |n| !n.node(1).seen.is_empty()));
    }
}
