//! The device's side of every connection: the host sockets (the listener, host clients still
//! sending their `CONNECT` line, connected streams), the connection table keyed by (Ember's
//! port, the guest's port), and the three queues once the driver has set them up.
//!
//! Everything here runs on the device's I/O thread: the queue handler calls in when the driver
//! notifies a queue, and the host sockets' own epoll set (nested in the thread's event loop)
//! calls in when a socket is ready. Every host socket is non-blocking, so nothing here waits on
//! a host peer, and nothing a guest does makes the device hold more than its fixed limits: at
//! most `MAX_CONNECTIONS` connections of at most `BUF_ALLOC` queued bytes each, `MAX_HANDSHAKES`
//! host clients mid-handshake, `MAX_RESETS` RSTs waiting for a receive buffer.

use std::collections::VecDeque;
use std::io::{self, Read};
use std::net::Shutdown;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use super::conn::{pending, ConnError, Connection, Filled, State};
use super::packet::{check, Buffers, Header, Op, PacketError, HEADER_LEN, OP_RST};
use crate::virtio::block::collect_chain_into;
use crate::virtio::{GuestLog, Interrupt, VIRTIO_MMIO_INT_VRING};

/// Connections at once, either way; one more is answered with RST (a guest's REQUEST) or closed
/// (a host client's CONNECT). Each may hold `BUF_ALLOC` bytes the host has not taken: 16 MiB at
/// most in all.
pub const MAX_CONNECTIONS: usize = 64;
/// Host clients that have connected but not yet sent their whole `CONNECT` line; the oldest is
/// closed to make room, so a client that never sends one cannot keep others out.
pub const MAX_HANDSHAKES: usize = 16;
/// RSTs for packets that belong to no connection, waiting for a receive buffer; past this they
/// are dropped (a guest that floods bad packets and never reads loses only its own answers).
pub const MAX_RESETS: usize = 64;
/// `CONNECT 4294967295\n` is 19 bytes.
const CONNECT_LINE_MAX: usize = 24;
/// The ports Ember gives host clients' connections, as the guest sees them: above the range
/// guests use for their own ports, and reported to the client in `OK <port>`.
const HOST_PORT_FIRST: u32 = 1 << 30;
const LISTENER_TOKEN: u64 = 0;
/// `VIRTIO_VSOCK_EVENT_TRANSPORT_RESET` (virtio 1.2 section 5.10.6.7; Linux's
/// include/uapi/linux/virtio_vsock.h), which virtio-bindings does not have.
pub const VIRTIO_VSOCK_EVENT_TRANSPORT_RESET: u32 = 0;
/// Transmit chains per turn: the queue handler lets go of the device between turns.
const TX_PER_TURN: usize = if cfg!(test) { 4 } else { 64 };
/// Host sockets served per wake-up, and new clients accepted per listener event.
const EVENTS_PER_WAKE: usize = 32;
const ACCEPTS_PER_EVENT: usize = 16;

/// The queues, as the driver set them up.
pub struct Active {
    pub mem: GuestMemoryMmap,
    pub rx: Queue,
    pub tx: Queue,
    /// Written once per restore: the TRANSPORT_RESET event (see `Muxer::transport_reset`).
    pub event: Queue,
    pub interrupt: Arc<Interrupt>,
}

/// The device was restored from a snapshot, and the connections the guest had then lived in
/// host sockets of another Ember: the driver is owed a TRANSPORT_RESET event (virtio 1.2 section
/// 5.10.6.7), after which it drops its connected sockets and keeps its listening ones. Until it
/// has done so, host clients are refused (and retry, as before a guest listens): a connection
/// made before the driver handled the event would be dropped with the old ones.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ResetEvent {
    None,
    /// Sent with the first event buffer the driver makes available.
    Pending,
    /// In the driver's buffer; `avail` is the event queue's available index then. Linux handles
    /// the event, then gives the buffer back (the index moves on) and notifies the queue.
    Sent {
        avail: u16,
    },
}

pub struct Muxer {
    pub active: Option<Active>,
    table: Table,
    /// Where the TRANSPORT_RESET owed after a restore is (see [`ResetEvent`]).
    transport_reset: ResetEvent,
    /// The chain being read, kept to spare an allocation per packet.
    descs: Vec<Descriptor>,
}

/// A host client that has not finished its `CONNECT <port>\n` line.
struct Handshake {
    token: u64,
    stream: UnixStream,
    line: Vec<u8>,
}

struct Table {
    cid: u64,
    uds: PathBuf,
    listener: UnixListener,
    epoll: Epoll,
    handshakes: VecDeque<Handshake>,
    conns: Vec<Connection>,
    resets: VecDeque<Header>,
    /// Where the next receive buffer's search for a connection with something to send starts,
    /// so that one busy stream cannot starve the others.
    cursor: usize,
    next_token: u64,
    next_port: u32,
    /// The host ports below this were given by the Ember a restored device was saved from.
    restored_from: u32,
    /// Set while the listener is out of the epoll set because accepting failed (out of
    /// descriptors): it is readable all the while, and level-triggered it would spin the
    /// thread. Holds how many sockets Ember had then; it is watched again once it has fewer,
    /// or when the guest next asks for something.
    listener_paused: Option<usize>,
    log: GuestLog,
    /// Host-side failures that could repeat without end (a full descriptor table).
    host_log: GuestLog,
}

/// Readable or writable, edge-triggered: a stream is read until it would block and then left
/// alone until its next edge, so one that waits for guest credit does not wake the thread.
fn stream_events() -> EventSet {
    EventSet::IN | EventSet::OUT | EventSet::READ_HANG_UP | EventSet::EDGE_TRIGGERED
}

impl Muxer {
    /// `listener` is non-blocking already.
    pub fn new(cid: u64, uds: PathBuf, listener: UnixListener) -> io::Result<Self> {
        let epoll = Epoll::new()?;
        epoll.ctl(
            ControlOperation::Add,
            listener.as_raw_fd(),
            EpollEvent::new(EventSet::IN, LISTENER_TOKEN),
        )?;
        Ok(Muxer {
            active: None,
            table: Table {
                cid,
                uds,
                listener,
                epoll,
                handshakes: VecDeque::new(),
                conns: Vec::new(),
                resets: VecDeque::new(),
                cursor: 0,
                next_token: LISTENER_TOKEN + 1,
                next_port: HOST_PORT_FIRST,
                restored_from: HOST_PORT_FIRST,
                listener_paused: None,
                log: GuestLog::new("virtio-vsock"),
                host_log: GuestLog::new("virtio-vsock (host sockets)"),
            },
            descs: Vec::with_capacity(8),
            transport_reset: ResetEvent::None,
        })
    }

    /// The port the next host client's connection gets: a restored device goes on from the
    /// saved one, so a new connection never has the 4-tuple of one the guest still winds down.
    pub fn next_port(&self) -> u32 {
        self.table.next_port
    }

    /// For a device rebuilt from a snapshot: its ports go on from `next_port`, and the driver is
    /// owed a TRANSPORT_RESET event.
    pub fn restored(&mut self, next_port: u32) {
        self.table.next_port = next_port.max(HOST_PORT_FIRST);
        self.table.restored_from = self.table.next_port;
        self.transport_reset = ResetEvent::Pending;
    }

    /// Whether the TRANSPORT_RESET event is owed still, or sent and not yet handled.
    pub fn reset_event_pending(&self) -> bool {
        self.transport_reset != ResetEvent::None
    }

    /// The host sockets' epoll set, for the I/O thread's event loop to watch.
    pub fn epoll_fd(&self) -> RawFd {
        self.table.epoll.as_raw_fd()
    }

    pub fn activate(&mut self, active: Active) {
        self.table.resets.clear();
        self.active = Some(active);
    }

    /// The driver reset the device: every connection ends (the host peers see end of file);
    /// the listener stays.
    pub fn reset(&mut self) {
        self.active = None;
        // A driver that resets the device starts with no connections anyway.
        self.transport_reset = ResetEvent::None;
        self.table.conns.clear();
        self.table.resets.clear();
        self.table.resume_listener(true);
    }

    pub fn connections(&self) -> usize {
        self.table.conns.len()
    }

    /// Bytes held for host sockets that have not taken them, over all connections.
    pub fn queued_bytes(&self) -> usize {
        self.table.conns.iter().map(Connection::queued_len).sum()
    }

    /// The driver notified queue `index`: serves a turn. Returns whether more is waiting. An
    /// error means a queue's rings are unusable.
    pub fn serve_queue(&mut self, index: usize) -> Result<bool, virtio_queue::Error> {
        let more = match index {
            1 => self.process_tx()?,
            // New receive or event buffers.
            _ => false,
        };
        self.pump_event()?;
        self.pump_rx()?;
        self.table.resume_listener(true);
        Ok(more)
    }

    /// Serves the host sockets that are ready, then sends what they had for the guest (unless
    /// the queues are not `usable`: a driver broke one).
    pub fn host_events(&mut self, usable: bool) -> Result<(), virtio_queue::Error> {
        let mut events = [EpollEvent::default(); EVENTS_PER_WAKE];
        let n = match self.table.epoll.wait(0, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => 0,
            Err(e) => {
                self.table
                    .host_log
                    .warn(format_args!("cannot read the host sockets' events: {e}"));
                0
            }
        };
        if usable {
            self.check_reset_handled()?;
        }
        let active = usable && self.active.is_some() && self.transport_reset == ResetEvent::None;
        for ev in &events[..n] {
            self.table.host_event(ev.data(), ev.event_set(), active);
        }
        if usable {
            self.pump_rx()?;
        }
        self.table.resume_listener(false);
        Ok(())
    }

    /// Whether the driver has given back an event buffer since the TRANSPORT_RESET: it has
    /// handled the event then, and host clients may connect again.
    fn check_reset_handled(&mut self) -> Result<(), virtio_queue::Error> {
        if let (ResetEvent::Sent { avail }, Some(a)) = (self.transport_reset, &self.active) {
            if a.event
                .avail_idx(&a.mem, std::sync::atomic::Ordering::Acquire)?
                .0
                != avail
            {
                self.transport_reset = ResetEvent::None;
            }
        }
        Ok(())
    }

    /// Sends the TRANSPORT_RESET event if one is owed and the driver has an event buffer.
    fn pump_event(&mut self) -> Result<(), virtio_queue::Error> {
        self.check_reset_handled()?;
        if self.transport_reset != ResetEvent::Pending {
            return Ok(());
        }
        let Some(active) = self.active.as_mut() else {
            return Ok(());
        };
        let (mem, event) = (&active.mem, &mut active.event);
        let Some(chain) = event.iter(mem)?.next() else {
            // None yet: the driver's next buffer notifies the queue, and this runs again.
            return Ok(());
        };
        let head = chain.head_index();
        // struct virtio_vsock_event is one le32, the event's id; the spec gives the driver's
        // buffer as one device-writable descriptor of that size.
        let id = VIRTIO_VSOCK_EVENT_TRANSPORT_RESET.to_le_bytes();
        let mut written = 0;
        for desc in chain {
            if desc.is_write_only() && desc.len() as usize >= id.len() {
                match vm_memory::Bytes::write_slice(mem, &id, desc.addr()) {
                    Ok(()) => written = id.len() as u32,
                    Err(e) => self
                        .table
                        .log
                        .warn(format_args!("event buffer outside guest memory: {e}")),
                }
                break;
            }
        }
        if written == 0 {
            self.table.log.warn(format_args!(
                "event buffer {head} has no writable descriptor of 4 bytes; returned empty"
            ));
        }
        event.add_used(mem, head, written)?;
        // Sent (or the driver's buffer was unusable, which it would be for every event): once.
        let avail = event
            .avail_idx(mem, std::sync::atomic::Ordering::Acquire)?
            .0;
        self.transport_reset = ResetEvent::Sent { avail };
        if event.event_idx_enabled() {
            // The driver is to notify when it makes the next buffer available: the one it gives
            // back after handling the event (avail_event, at the end of the used ring).
            let at = event
                .used_ring()
                .checked_add(4 + 8 * u64::from(event.size()))
                .ok_or(virtio_queue::Error::AddressOverflow)?;
            vm_memory::Bytes::write_obj(mem, avail.to_le(), vm_memory::GuestAddress(at))
                .map_err(virtio_queue::Error::GuestMemory)?;
        }
        if crate::virtio::needs_interrupt(event, mem)? {
            active.interrupt.trigger(VIRTIO_MMIO_INT_VRING);
        }
        Ok(())
    }

    /// The queues' positions as the device serves them, for a snapshot.
    pub fn queue_states(&self) -> Option<Vec<virtio_queue::QueueState>> {
        let a = self.active.as_ref()?;
        Some(vec![a.rx.state(), a.tx.state(), a.event.state()])
    }

    fn process_tx(&mut self) -> Result<bool, virtio_queue::Error> {
        let Muxer {
            active,
            table,
            descs,
            ..
        } = self;
        let Some(active) = active.as_mut() else {
            return Ok(false);
        };
        let (mem, tx) = (&active.mem, &mut active.tx);
        let mut used = false;
        let mut budget = TX_PER_TURN;
        let mut more = false;
        'turn: loop {
            tx.disable_notification(mem)?;
            loop {
                if budget == 0 {
                    more = true;
                    break 'turn;
                }
                let Some(chain) = tx.iter(mem)?.next() else {
                    break;
                };
                budget -= 1;
                let head = chain.head_index();
                if head >= tx.size() {
                    table.log.warn(format_args!(
                        "skipped transmit entry {head}: not a descriptor index"
                    ));
                    continue;
                }
                match collect_chain_into(chain, descs)
                    .map_err(PacketError::from)
                    .and_then(|()| Buffers::new(mem, descs, false))
                {
                    Ok(buf) => table.packet(mem, &buf),
                    Err(e) => table.log.warn(format_args!("{e}")),
                }
                // The payload is with the host or queued: the driver may reuse the buffers.
                tx.add_used(mem, head, 0)?;
                used = true;
            }
            if !tx.enable_notification(mem)? {
                break;
            }
        }
        if used && crate::virtio::needs_interrupt(tx, mem)? {
            active.interrupt.trigger(VIRTIO_MMIO_INT_VRING);
        }
        Ok(more)
    }

    /// Fills receive buffers with what is owed to the guest: RSTs for stray packets first, then
    /// each connection in turn (control packets, stream data within the guest's credit). Stops
    /// when nothing is left to send or the driver has no buffer left (then it is asked to
    /// notify when it adds one).
    fn pump_rx(&mut self) -> Result<(), virtio_queue::Error> {
        let Muxer {
            active,
            table,
            descs,
            ..
        } = self;
        let Some(active) = active.as_mut() else {
            return Ok(());
        };
        let (mem, rx) = (&active.mem, &mut active.rx);
        let mut used = false;
        // Looking again after re-enabling notifications, a bounded number of times: the next
        // wake-up carries on.
        let mut recheck = 4;
        while table.has_rx_work() {
            let Some(chain) = rx.iter(mem)?.next() else {
                // Starved: the driver's next buffer must notify (EVENT_IDX: avail_event now).
                if rx.enable_notification(mem)? && recheck > 0 {
                    recheck -= 1;
                    continue;
                }
                break;
            };
            let head = chain.head_index();
            if head >= rx.size() {
                table.log.warn(format_args!(
                    "skipped receive entry {head}: not a descriptor index"
                ));
                continue;
            }
            let buf = match collect_chain_into(chain, descs)
                .map_err(PacketError::from)
                .and_then(|()| Buffers::new(mem, descs, true))
            {
                Ok(buf) if buf.len() >= HEADER_LEN as u64 => buf,
                Ok(buf) => {
                    table.log.warn(format_args!(
                        "receive buffer of {} bytes is too small for a header; returned empty",
                        buf.len()
                    ));
                    rx.add_used(mem, head, 0)?;
                    used = true;
                    continue;
                }
                Err(e) => {
                    table
                        .log
                        .warn(format_args!("receive buffer returned empty: {e}"));
                    rx.add_used(mem, head, 0)?;
                    used = true;
                    continue;
                }
            };
            match table.fill(mem, &buf) {
                Some(len) => {
                    rx.add_used(mem, head, len)?;
                    used = true;
                }
                None => {
                    // Nothing to send after all (a socket that was readable had nothing): the
                    // buffer stays the driver's, for the next packet.
                    rx.go_to_previous_position();
                    break;
                }
            }
        }
        if used && crate::virtio::needs_interrupt(rx, mem)? {
            active.interrupt.trigger(VIRTIO_MMIO_INT_VRING);
        }
        Ok(())
    }
}

impl Table {
    fn token(&mut self) -> u64 {
        let t = self.next_token;
        self.next_token += 1;
        t
    }

    fn sockets(&self) -> usize {
        self.conns.len() + self.handshakes.len()
    }

    fn pause_listener(&mut self) {
        let fd = self.listener.as_raw_fd();
        if self
            .epoll
            .ctl(ControlOperation::Delete, fd, EpollEvent::default())
            .is_ok()
        {
            self.listener_paused = Some(self.sockets());
        }
    }

    /// Watches the listener again after `pause_listener`, once Ember holds fewer sockets than
    /// then, or when `anyway` (the guest asked for something: at worst one more failed accept).
    fn resume_listener(&mut self, anyway: bool) {
        let Some(held) = self.listener_paused else {
            return;
        };
        if !anyway && self.sockets() >= held {
            return;
        }
        let fd = self.listener.as_raw_fd();
        if self
            .epoll
            .ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(EventSet::IN, LISTENER_TOKEN),
            )
            .is_ok()
        {
            self.listener_paused = None;
        }
    }

    /// Adds a host socket to the epoll set under a new token; None (logged) if it cannot be.
    fn watch(&mut self, stream: &UnixStream) -> Option<u64> {
        let token = self.token();
        match self.epoll.ctl(
            ControlOperation::Add,
            stream.as_raw_fd(),
            EpollEvent::new(stream_events(), token),
        ) {
            Ok(()) => Some(token),
            Err(e) => {
                // Out of memory for epoll entries; a guest could ask again and again.
                self.host_log
                    .warn(format_args!("cannot watch a host socket: {e}"));
                None
            }
        }
    }

    fn find(&self, key: (u32, u32)) -> Option<usize> {
        self.conns.iter().position(|c| c.key() == key)
    }

    fn has_rx_work(&self) -> bool {
        !self.resets.is_empty() || self.conns.iter().any(Connection::has_work)
    }

    fn queue_reset(&mut self, h: Header) {
        if self.resets.len() >= MAX_RESETS {
            self.log.warn(format_args!(
                "{MAX_RESETS} RSTs wait for receive buffers already; one more dropped"
            ));
            return;
        }
        self.resets.push_back(h);
    }

    /// Ember ends connection `i`: the host peer sees end of file now, the guest gets RST as soon
    /// as there is a receive buffer for it.
    fn abort(&mut self, i: usize) {
        let c = &mut self.conns[i];
        c.owe(pending::RST);
        let _ = c.stream().shutdown(Shutdown::Both);
    }

    /// Puts the next packet owed to the guest into `buf`; returns its length, None if there is
    /// none after all.
    fn fill(&mut self, mem: &GuestMemoryMmap, buf: &Buffers) -> Option<u32> {
        if let Some(h) = self.resets.pop_front() {
            return match buf.write(mem, 0, &h.to_bytes()) {
                Ok(()) => Some(HEADER_LEN as u32),
                Err(e) => {
                    self.log.warn(format_args!("cannot write an RST: {e}"));
                    Some(0)
                }
            };
        }
        let n = self.conns.len();
        for k in 0..n {
            let i = (self.cursor + k) % n;
            // A connection whose host socket fails gets a second go: its RST.
            for _ in 0..2 {
                match self.conns[i].fill(mem, buf) {
                    Ok(Filled::Packet(len)) => {
                        self.cursor = i + 1;
                        if self.conns[i].is_done() {
                            self.conns.swap_remove(i);
                        }
                        return Some(len);
                    }
                    Ok(Filled::Nothing) => break,
                    Err(e) => {
                        log::debug!(
                            "virtio-vsock: connection {:?} reset: {e}",
                            self.conns[i].key()
                        );
                        self.abort(i);
                    }
                }
            }
        }
        None
    }

    /// One packet from the guest's transmit queue.
    fn packet(&mut self, mem: &GuestMemoryMmap, buf: &Buffers) {
        if buf.len() < HEADER_LEN as u64 {
            self.log
                .warn(format_args!("{}", PacketError::Short(buf.len())));
            return;
        }
        let mut raw = [0u8; HEADER_LEN];
        if let Err(e) = buf.read(mem, 0, &mut raw) {
            self.log
                .warn(format_args!("cannot read a packet header: {e}"));
            return;
        }
        let h = Header::from_bytes(&raw);
        let key = (h.dst_port, h.src_port);
        let op = match check(&h, self.cid, buf.len() - HEADER_LEN as u64) {
            Ok(op) => op,
            Err(e) => {
                self.log.warn(format_args!(
                    "packet from port {} to port {}: {e}",
                    h.src_port, h.dst_port
                ));
                if e.answer_with_rst() && h.op != OP_RST {
                    if let Some(i) = self.find(key) {
                        self.abort(i);
                    } else {
                        self.queue_reset(h.reset_reply());
                    }
                }
                return;
            }
        };
        let Some(i) = self.find(key) else {
            match op {
                Op::Request => self.connect_for_guest(&h),
                // Never answer an RST with one.
                Op::Rst => {}
                // One of the connections the guest had before a restore winding down: expected.
                _ if (HOST_PORT_FIRST..self.restored_from).contains(&h.dst_port) => {
                    log::debug!(
                        "virtio-vsock: packet for a connection from before the restore (port {} \
                         to port {}); answered with RST",
                        h.src_port,
                        h.dst_port
                    );
                    self.queue_reset(h.reset_reply());
                }
                _ => {
                    self.log.warn(format_args!(
                        "packet for no connection (port {} to port {}); answered with RST",
                        h.src_port, h.dst_port
                    ));
                    self.queue_reset(h.reset_reply());
                }
            }
            return;
        };
        let c = &mut self.conns[i];
        c.set_peer_credit(&h);
        let result = match (op, c.state) {
            (Op::Rst, _) => {
                // The guest ended it: the host peer sees end of file when the socket closes.
                self.conns.swap_remove(i);
                return;
            }
            (Op::Response, State::Connecting) => c.established(),
            (Op::Request | Op::Response, _) | (_, State::Connecting) => {
                Err(ConnError::Unexpected(op))
            }
            (Op::Rw, State::Closing) => Err(ConnError::Unexpected(op)),
            (Op::Rw, _) => c.take_guest_data(mem, buf, h.len),
            (Op::Shutdown(flags), _) => c.peer_shutdown(flags),
            (Op::CreditUpdate, _) => Ok(()),
            (Op::CreditRequest, _) => {
                c.owe(pending::CREDIT_UPDATE);
                Ok(())
            }
        };
        if let Err(e) = result {
            match e {
                ConnError::Host(_) => log::debug!("virtio-vsock: connection {key:?} reset: {e}"),
                _ => self.log.warn(format_args!("connection {key:?} reset: {e}")),
            }
            self.abort(i);
        }
    }

    /// The guest's REQUEST to host port P: Ember connects to `<uds>_P`; RESPONSE if that
    /// worked, RST if nothing listens there (or too many connections are open).
    fn connect_for_guest(&mut self, h: &Header) {
        if self.conns.len() >= MAX_CONNECTIONS {
            self.log.warn(format_args!(
                "connection to port {} refused: {MAX_CONNECTIONS} connections are open",
                h.dst_port
            ));
            self.queue_reset(h.reset_reply());
            return;
        }
        let mut path = self.uds.clone().into_os_string();
        path.push(format!("_{}", h.dst_port));
        let stream = match connect_nonblocking(Path::new(&path)) {
            Ok(s) => s,
            Err(e) => {
                // The guest picks the port: limited like a guest error.
                self.log.warn(format_args!(
                    "connection to port {}: cannot connect to {}: {e}; answered with RST",
                    h.dst_port,
                    Path::new(&path).display()
                ));
                self.queue_reset(h.reset_reply());
                return;
            }
        };
        let Some(token) = self.watch(&stream) else {
            self.queue_reset(h.reset_reply());
            return;
        };
        let mut c = Connection::from_guest(token, h, stream);
        // Data the host end wrote before its first edge is not missed.
        c.host_readable = true;
        self.conns.push(c);
    }

    fn host_event(&mut self, token: u64, events: EventSet, active: bool) {
        if token == LISTENER_TOKEN {
            self.accept(active);
            return;
        }
        if let Some(i) = self.conns.iter().position(|c| c.token == token) {
            let c = &mut self.conns[i];
            if events.intersects(
                EventSet::IN | EventSet::READ_HANG_UP | EventSet::HANG_UP | EventSet::ERROR,
            ) {
                c.host_readable = true;
            }
            if events.intersects(EventSet::OUT | EventSet::HANG_UP | EventSet::ERROR) {
                if let Err(e) = c.flush() {
                    log::debug!("virtio-vsock: connection {:?} reset: {e}", c.key());
                    self.abort(i);
                }
            }
            return;
        }
        if let Some(i) = self.handshakes.iter().position(|h| h.token == token) {
            self.handshake(i, active);
        }
    }

    fn accept(&mut self, active: bool) {
        for _ in 0..ACCEPTS_PER_EVENT {
            let stream = match accept_nonblocking(&self.listener) {
                Ok(s) => s,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                // The client gave up before it was accepted.
                Err(e) if e.raw_os_error() == Some(libc::ECONNABORTED) => continue,
                Err(e) => {
                    // Out of descriptors, most likely: the client waits in the backlog.
                    self.host_log.warn(format_args!(
                        "cannot accept a host connection ({e}); the listener waits until a \
                         socket closes"
                    ));
                    self.pause_listener();
                    return;
                }
            };
            if self.handshakes.len() >= MAX_HANDSHAKES {
                log::info!(
                    "virtio-vsock: {MAX_HANDSHAKES} host clients have not sent CONNECT yet; the \
                     oldest is closed"
                );
                self.handshakes.pop_front();
            }
            let Some(token) = self.watch(&stream) else {
                continue;
            };
            self.handshakes.push_back(Handshake {
                token,
                stream,
                line: Vec::new(),
            });
            // Its line may be there already: edge-triggered, the socket would not say so again.
            self.handshake(self.handshakes.len() - 1, active);
        }
    }

    /// Reads client `i`'s `CONNECT <port>\n` a byte at a time (nothing past the newline is
    /// taken: it is stream data); once whole, the guest is asked for the connection.
    fn handshake(&mut self, i: usize, active: bool) {
        let hs = &mut self.handshakes[i];
        let complete = loop {
            let mut b = [0u8; 1];
            match (&hs.stream).read(&mut b) {
                Ok(0) => break Err("closed before its CONNECT line"),
                Ok(_) if b[0] == b'\n' => break Ok(()),
                Ok(_) if hs.line.len() >= CONNECT_LINE_MAX => break Err("line too long"),
                Ok(_) => hs.line.push(b[0]),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(_) => break Err("read failed"),
            }
        };
        let Some(hs) = self.handshakes.remove(i) else {
            return;
        };
        let port = complete.and_then(|()| parse_connect(&hs.line));
        let port = match port {
            Ok(_) if !active => Err("the guest's driver has not started the device"),
            Ok(_) if self.conns.len() >= MAX_CONNECTIONS => Err("too many connections"),
            p => p,
        };
        let port = match port {
            Ok(p) => p,
            Err(why) => {
                // A host client's mistake, not the guest's: closed, as a refused connection.
                log::info!("virtio-vsock: host connection closed: {why}");
                return;
            }
        };
        let local = self.host_port();
        let c = Connection::from_host(hs.token, local, port, self.cid, hs.stream);
        self.conns.push(c);
    }

    /// The next port for a host client's connection, one no connection uses.
    fn host_port(&mut self) -> u32 {
        loop {
            let p = self.next_port;
            // u32::MAX is VMADDR_PORT_ANY.
            self.next_port = if p >= u32::MAX - 1 {
                HOST_PORT_FIRST
            } else {
                p + 1
            };
            if !self.conns.iter().any(|c| c.local_port == p) {
                return p;
            }
        }
    }
}

/// `CONNECT <port>`, the port in decimal.
fn parse_connect(line: &[u8]) -> Result<u32, &'static str> {
    let digits = line.strip_prefix(b"CONNECT ").ok_or("not a CONNECT line")?;
    if digits.is_empty() || digits.len() > 10 || !digits.iter().all(u8::is_ascii_digit) {
        return Err("bad port in CONNECT line");
    }
    std::str::from_utf8(digits)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or("bad port in CONNECT line")
}

/// accept4 with the new socket non-blocking from the start (std's accept would need an ioctl
/// afterwards, which the I/O thread's filter does not allow).
fn accept_nonblocking(listener: &UnixListener) -> io::Result<UnixStream> {
    // SAFETY: accept4 on a listening socket we own, with no address buffer; the result is
    // checked and owned at once.
    let fd = unsafe {
        libc::accept4(
            listener.as_raw_fd(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new descriptor nothing else owns.
    Ok(UnixStream::from(unsafe { OwnedFd::from_raw_fd(fd) }))
}

/// A non-blocking connect to a Unix socket: it completes at once, or fails (nothing listens,
/// or its backlog is full: EAGAIN), never waits.
pub(crate) fn connect_nonblocking(path: &Path) -> io::Result<UnixStream> {
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: an all-zero sockaddr_un is valid.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "path too long for a Unix socket",
        ));
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    // SAFETY: a plain socket(2); the result is checked and owned at once.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new descriptor nothing else owns.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    let len = (std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1) as libc::socklen_t;
    // SAFETY: `addr` is a valid sockaddr_un of at least `len` bytes.
    let r = unsafe {
        libc::connect(
            owned.as_raw_fd(),
            (&addr as *const libc::sockaddr_un).cast(),
            len,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(UnixStream::from(owned))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_lines() {
        assert_eq!(parse_connect(b"CONNECT 52"), Ok(52));
        assert_eq!(parse_connect(b"CONNECT 4294967295"), Ok(u32::MAX));
        for bad in [
            &b"CONNECT"[..],
            b"CONNECT ",
            b"CONNECT 4294967296",
            b"CONNECT -1",
            b"CONNECT 5 ",
            b"connect 5",
            b"CONNECT  5",
            b"CONNECT 12345678901",
            b"",
        ] {
            assert!(
                parse_connect(bad).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }
}
