//! Connections between simulated hosts, with the lifecycle the node's
//! driver gives the core: a dial becomes a connection after the TCP and
//! handshake round trips, frames flow in order, and a connection ends by
//! a goodbye, a crash (the peer sees the reset) or, on a link a partition
//! cut, by the reader's idle timeout (turmoil's partitioned streams stay
//! silent forever, SIM_NOTES.md; the driver's keepalives stop arriving).

use std::collections::VecDeque;

use shoal_node::core::ids::{ConnId, FileId, PieceIndex};
use shoal_node::core::wire::{ExchangeMessage, Message};
use shoal_node::outbox::Lane;

use super::links::LinkId;

/// A host's connections by handle, in handle order (the order a crash
/// resets them). A sorted `Vec`: a host has at most the driver's
/// `connections_max` (hundreds), handles are mostly added in increasing
/// order, and a binary search of a few cache lines beats a tree.
#[derive(Debug, Default)]
pub(crate) struct HostConns {
    by_conn: Vec<(ConnId, LinkId)>,
}

impl HostConns {
    pub(crate) fn len(&self) -> usize {
        self.by_conn.len()
    }

    fn position(&self, conn: ConnId) -> Result<usize, usize> {
        self.by_conn.binary_search_by_key(&conn, |&(c, _)| c)
    }

    pub(crate) fn get(&self, conn: ConnId) -> Option<LinkId> {
        self.position(conn).ok().map(|i| self.by_conn[i].1)
    }

    /// Map `conn` to `link`, replacing any link it had.
    pub(crate) fn insert(&mut self, conn: ConnId, link: LinkId) {
        match self.position(conn) {
            Ok(i) => self.by_conn[i].1 = link,
            Err(i) => self.by_conn.insert(i, (conn, link)),
        }
    }

    pub(crate) fn remove(&mut self, conn: ConnId) -> Option<LinkId> {
        self.position(conn).ok().map(|i| self.by_conn.remove(i).1)
    }

    /// All of them, in handle order, leaving none.
    pub(crate) fn take_links(&mut self) -> impl Iterator<Item = LinkId> + use<> {
        std::mem::take(&mut self.by_conn).into_iter().map(|(_, link)| link)
    }
}

/// One side of a connection.
#[derive(Debug)]
pub(crate) struct End {
    /// Host index.
    pub(crate) host: u32,
    /// The host's incarnation when the connection was opened: a restarted
    /// host never sees a connection of its previous life.
    pub(crate) incarnation: u32,
    /// The side's handle, once its handshake finished; `None` before, and
    /// after this side closed.
    pub(crate) conn: Option<ConnId>,
    /// Whether this side still reads (and its node knows the connection).
    pub(crate) open: bool,
    /// Its writer: frames not yet written, in order.
    pub(crate) writer: Writer,
}

/// A side's identity and state without its writer: a copy an event
/// handler keeps while it changes the link (cloning the [`End`] would
/// copy the writer's queues' headers too).
#[derive(Clone, Copy, Debug)]
pub(crate) struct EndStatus {
    pub(crate) host: u32,
    pub(crate) incarnation: u32,
    pub(crate) conn: Option<ConnId>,
    pub(crate) open: bool,
}

impl End {
    pub(crate) fn status(&self) -> EndStatus {
        EndStatus { host: self.host, incarnation: self.incarnation, conn: self.conn, open: self.open }
    }
}

/// One side's writer, as the driver's `write_loop`: a frame is written
/// when the writer is free, then the writer sleeps for the upload
/// bucket's debt before the next. Its queue has the driver's two lanes
/// (`shoal_node::outbox`): control frames go before queued exchange
/// frames, each lane in order, both under one bound.
#[derive(Debug, Default)]
pub(crate) struct Writer {
    /// Frames waiting; allocated the first time one waits. Most writers
    /// never wait (no upload limit, or an idle connection), and a link is
    /// the engine's most numerous object: empty lanes inline would cost
    /// 64 bytes a side.
    lanes: Option<Box<Lanes>>,
    /// The writer sleeps until then.
    pub(crate) busy_until_us: u64,
    /// Whether it still writes (it stops after a goodbye, a crash, or when
    /// its reader saw the connection end).
    pub(crate) open: bool,
}

#[derive(Debug, Default)]
struct Lanes {
    /// Control, DHT and gossip frames waiting, with their encoded size.
    control: VecDeque<(Message, u32)>,
    /// Exchange frames (blocks among them) waiting, with their encoded size.
    data: VecDeque<(Message, u32)>,
}

impl Writer {
    /// Frames waiting in both lanes.
    pub(crate) fn len(&self) -> usize {
        self.lanes.as_ref().map_or(0, |l| l.control.len() + l.data.len())
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.lanes.as_ref().is_none_or(|l| l.control.is_empty() && l.data.is_empty())
    }

    /// Queue a frame in its lane.
    pub(crate) fn push(&mut self, message: Message, bytes: u32) {
        let lanes = self.lanes.get_or_insert_with(Box::default);
        match Lane::of(&message) {
            Lane::Control => lanes.control.push_back((message, bytes)),
            Lane::Data => lanes.data.push_back((message, bytes)),
        }
    }

    /// The next frame to write: the control lane's first.
    pub(crate) fn pop(&mut self) -> Option<(Message, u32)> {
        let lanes = self.lanes.as_mut()?;
        let frame = lanes.control.pop_front().or_else(|| lanes.data.pop_front());
        if lanes.control.is_empty() && lanes.data.is_empty() {
            // Free the lanes with their buffers: a link keeps its writers
            // for its whole life, most of it idle.
            self.lanes = None;
        }
        frame
    }

    /// Drop the waiting frames and their lanes (every caller also closes
    /// the writer).
    pub(crate) fn clear(&mut self) {
        self.lanes = None;
    }

    /// The driver's `OutboxSender::cancel`: take back a queued block.
    pub(crate) fn cancel(&mut self, block: (FileId, PieceIndex, u32)) -> bool {
        let Some(lanes) = self.lanes.as_mut() else { return false };
        let queued = lanes.data.iter().position(|(m, _)| {
            matches!(m, Message::Exchange(ExchangeMessage::Block { file, piece, offset, .. })
                if (*file, *piece, *offset) == block)
        });
        queued.and_then(|index| lanes.data.remove(index)).is_some()
    }
}

/// A connection between two hosts; side 0 dialled, side 1 accepted.
#[derive(Debug)]
pub(crate) struct Link {
    pub(crate) ends: [End; 2],
    /// When the dial started (µs), for the handshake timeout.
    pub(crate) dialed_at_us: u64,
    /// A partition cut it: every frame is lost from now on, even after the
    /// heal.
    pub(crate) wedged: bool,
    /// Latest arrival scheduled towards each side: frames of one
    /// connection arrive in order, whatever the jitter.
    pub(crate) last_arrival_us: [u64; 2],
    /// When each side last wrote a frame (its writer's keepalive clock).
    pub(crate) last_sent_us: [u64; 2],
    /// When each side last received a frame (its reader's idle clock).
    pub(crate) last_received_us: [u64; 2],
}

impl Link {
    pub(crate) fn new(dialer: (u32, u32), acceptor: (u32, u32), now_us: u64) -> Self {
        let end = |(host, incarnation)| End {
            host,
            incarnation,
            conn: None,
            open: true,
            writer: Writer { open: true, ..Writer::default() },
        };
        Self {
            ends: [end(dialer), end(acceptor)],
            dialed_at_us: now_us,
            wedged: false,
            last_arrival_us: [now_us; 2],
            last_sent_us: [now_us; 2],
            last_received_us: [now_us; 2],
        }
    }

    /// Which side `host` is on.
    pub(crate) fn side_of(&self, host: u32) -> Option<usize> {
        self.ends.iter().position(|e| e.host == host)
    }

    /// Both sides stopped reading and writing: nothing refers to it.
    pub(crate) fn is_dead(&self) -> bool {
        self.ends.iter().all(|e| !e.open && !e.writer.open)
    }

    /// Side `side` stops for good: no reads, no writes, queue dropped.
    pub(crate) fn shut(&mut self, side: usize) {
        let end = &mut self.ends[side];
        end.open = false;
        end.conn = None;
        end.writer.open = false;
        end.writer.clear();
    }

    /// When side `side`'s reader gives up on a link wedged at `now_us`:
    /// `idle_us` after the last frame it heard. Besides real frames it
    /// heard the peer's keepalives, written `keepalive_us` after the peer's
    /// last frame and every `keepalive_us` since (the driver's writer), each
    /// `latency_us` in flight; those are computed, not simulated, so an
    /// idle connection costs no events.
    pub(crate) fn idle_close_at(
        &self,
        side: usize,
        now_us: u64,
        latency_us: u64,
        keepalive_us: u64,
        idle_us: u64,
    ) -> u64 {
        let peer_sent = self.last_sent_us[1 - side];
        let mut heard = self.last_received_us[side];
        if keepalive_us > 0 && now_us >= peer_sent + latency_us {
            let beats = (now_us - latency_us - peer_sent) / keepalive_us;
            heard = heard.max(peer_sent + beats * keepalive_us + latency_us);
        }
        heard.saturating_add(idle_us).max(now_us)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000;

    #[test]
    fn a_wedged_reader_times_out_after_the_last_keepalive_it_heard() {
        let mut link = Link::new((0, 0), (1, 0), 0);
        link.last_sent_us = [10 * S, 10 * S];
        link.last_received_us = [10 * S, 10 * S];
        // Peer's last frame at 10 s; keepalives at 25 s, 40 s, 55 s (+10 ms).
        let at = link.idle_close_at(0, 50 * S, 10_000, 15 * S, 45 * S);
        assert_eq!(at, 40 * S + 10_000 + 45 * S);
        // Wedged before the first keepalive: the real frame is the last.
        let at = link.idle_close_at(1, 20 * S, 10_000, 15 * S, 45 * S);
        assert_eq!(at, 10 * S + 10_000 + 45 * S);
    }
}
