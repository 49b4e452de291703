//! One stream connection between a guest socket and a host Unix socket: its state, both
//! directions' credit (spec 5.10.6.3) and the bytes the host has not taken yet.
//!
//! Credit, guest to host: Ember advertises `BUF_ALLOC` bytes per connection and counts in
//! `fwd_cnt` what it has handed to the host socket; a guest may have at most `BUF_ALLOC` bytes
//! in flight, so what the host socket cannot take at once fits in `queued`, never more (a guest
//! that sends past its credit is reset). Host to guest: Ember sends at most what the guest's own
//! `buf_alloc` and `fwd_cnt` leave room for, and reads the host socket only when it can send, so
//! a guest that does not read leaves the data in the host's socket buffer: the host sees
//! backpressure, Ember holds nothing.

use std::collections::VecDeque;
use std::io::{self, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;

use vm_memory::GuestMemoryMmap;

use super::packet::{
    Buffers, Header, HEADER_LEN, HOST_CID, MAX_PAYLOAD, OP_CREDIT_REQUEST, OP_CREDIT_UPDATE,
    OP_REQUEST, OP_RESPONSE, OP_RST, OP_RW, OP_SHUTDOWN, SHUTDOWN_BOTH, SHUTDOWN_RCV,
    SHUTDOWN_SEND, TYPE_STREAM,
};

/// Ember's receive buffer per connection, as advertised to the guest: as large as Linux's own
/// default, so that Ember's window never limits a stream more than the guest's does.
pub const BUF_ALLOC: u32 = 256 << 10;
/// A credit update goes to the guest once it believes it has used this much of its window and
/// more has been forwarded since it was last told: it never waits on an empty window while the
/// host keeps up, and gets one update per half window rather than one per packet.
const CREDIT_UPDATE_AT: u32 = BUF_ALLOC / 2;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    /// Host-initiated: the REQUEST is sent or waiting to be; the guest has not answered.
    Connecting,
    Established,
    /// The guest shut down both ways: what it sent goes to the host, then RST ends it.
    Closing,
}

/// Control packets a connection owes the guest, sent as receive buffers come.
pub mod pending {
    pub const REQUEST: u8 = 1;
    pub const RESPONSE: u8 = 2;
    pub const CREDIT_UPDATE: u8 = 4;
    pub const CREDIT_REQUEST: u8 = 8;
    /// The host will send no more (its socket reached end of file).
    pub const SHUTDOWN: u8 = 16;
    pub const RST: u8 = 32;
}

/// Why a connection must be reset.
#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    #[error(
        "the guest sent {len} bytes with {room} left of the {BUF_ALLOC}-byte credit it was given"
    )]
    CreditExceeded { len: u32, room: usize },
    #[error("the host socket is gone: {0}")]
    Host(#[source] io::Error),
    #[error("guest memory: {0}")]
    Memory(#[source] vm_memory::GuestMemoryError),
    #[error("a {0:?} packet is not valid in the connection's state")]
    Unexpected(super::packet::Op),
}

/// What the connection put into one receive buffer.
#[derive(Debug, PartialEq, Eq)]
pub enum Filled {
    /// A packet of this many bytes, header included.
    Packet(u32),
    /// Nothing to send now.
    Nothing,
}

pub struct Connection {
    /// Identifies the host socket in the device's epoll set.
    pub token: u64,
    /// Ember's end (the port the guest connected to, or one Ember chose for a host client).
    pub local_port: u32,
    pub peer_port: u32,
    pub state: State,
    stream: UnixStream,
    guest_cid: u64,
    /// Guest to host: payload bytes received from the guest, and those handed to the host.
    rx_cnt: u32,
    fwd_cnt: u32,
    /// `fwd_cnt` as the guest last saw it in a header.
    told_fwd_cnt: u32,
    /// What the host socket has not taken yet; at most `BUF_ALLOC` bytes.
    queued: VecDeque<u8>,
    /// `OK <port>\n` for a host client, written before any stream byte.
    greeting: Vec<u8>,
    /// Host to guest: payload bytes sent, and the guest's last word on its buffer.
    tx_cnt: u32,
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    /// The host socket may have bytes to read (edge-triggered: cleared at EAGAIN).
    pub host_readable: bool,
    host_eof: bool,
    /// The host's write side is shut down (the guest will send no more).
    host_write_shut: bool,
    /// SHUTDOWN flags the guest has sent.
    peer_shutdown: u32,
    /// `pending::*` bits.
    owed: u8,
    /// A CREDIT_REQUEST was sent and no credit has come since.
    asked_credit: bool,
    /// The RST went out: the connection is over.
    done: bool,
}

impl Connection {
    /// A connection the guest asked for, to a host socket already connected.
    pub fn from_guest(token: u64, h: &Header, stream: UnixStream) -> Self {
        let mut c = Self::new(token, h.dst_port, h.src_port, h.src_cid, stream);
        c.state = State::Established;
        c.owed = pending::RESPONSE;
        c.set_peer_credit(h);
        c
    }

    /// A connection a host client asked for (`CONNECT <port>`): the guest is asked first.
    pub fn from_host(
        token: u64,
        local_port: u32,
        peer_port: u32,
        guest_cid: u64,
        stream: UnixStream,
    ) -> Self {
        let mut c = Self::new(token, local_port, peer_port, guest_cid, stream);
        c.owed = pending::REQUEST;
        // The client may have written data after its CONNECT line.
        c.host_readable = true;
        c
    }

    fn new(token: u64, local: u32, peer: u32, guest_cid: u64, stream: UnixStream) -> Self {
        Connection {
            token,
            local_port: local,
            peer_port: peer,
            state: State::Connecting,
            stream,
            guest_cid,
            rx_cnt: 0,
            fwd_cnt: 0,
            told_fwd_cnt: 0,
            queued: VecDeque::new(),
            greeting: Vec::new(),
            tx_cnt: 0,
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
            host_readable: false,
            host_eof: false,
            host_write_shut: false,
            peer_shutdown: 0,
            owed: 0,
            asked_credit: false,
            done: false,
        }
    }

    pub fn stream(&self) -> &UnixStream {
        &self.stream
    }

    pub fn key(&self) -> (u32, u32) {
        (self.local_port, self.peer_port)
    }

    pub fn owe(&mut self, what: u8) {
        self.owed |= what;
    }

    /// Bytes waiting for the host socket (the greeting included).
    pub fn queued_len(&self) -> usize {
        self.queued.len() + self.greeting.len()
    }

    /// What the guest may still take: its buffer less what is in flight. A guest claiming to
    /// have forwarded more than it was sent gets no more than its buffer, never an overflow.
    pub fn peer_credit(&self) -> u32 {
        let in_flight = self.tx_cnt.wrapping_sub(self.peer_fwd_cnt);
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    /// Every guest packet on the connection carries its buffer space.
    pub fn set_peer_credit(&mut self, h: &Header) {
        if (h.buf_alloc, h.fwd_cnt) != (self.peer_buf_alloc, self.peer_fwd_cnt) {
            self.asked_credit = false;
        }
        self.peer_buf_alloc = h.buf_alloc;
        self.peer_fwd_cnt = h.fwd_cnt;
    }

    /// The guest accepted a host client's connection: the client hears `OK <port>`.
    pub fn established(&mut self) -> Result<(), ConnError> {
        self.state = State::Established;
        self.greeting = format!("OK {}\n", self.local_port).into_bytes();
        self.flush()
    }

    /// The guest's SHUTDOWN: no more to read from, or to write to, the host. Both together end
    /// the connection once the host has what the guest sent.
    pub fn peer_shutdown(&mut self, flags: u32) -> Result<(), ConnError> {
        self.peer_shutdown |= flags;
        if self.peer_shutdown == SHUTDOWN_BOTH {
            self.state = State::Closing;
        }
        self.flush()
    }

    /// Takes `len` payload bytes of a guest RW packet (at byte `HEADER_LEN` of `buf`): straight
    /// to the host socket while nothing is queued before them, the rest queued.
    pub fn take_guest_data(
        &mut self,
        mem: &GuestMemoryMmap,
        buf: &Buffers,
        len: u32,
    ) -> Result<(), ConnError> {
        let room = (BUF_ALLOC as usize).saturating_sub(self.queued.len());
        let mut sent = 0usize;
        if self.queued_len() == 0 {
            sent = match buf.write_to(mem, HEADER_LEN as u64, u64::from(len), &mut self.stream) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
                Err(e) => return Err(ConnError::Host(e)),
            };
        }
        let rest = len as usize - sent;
        if rest > room {
            return Err(ConnError::CreditExceeded { len, room });
        }
        if rest > 0 {
            // Only while the host is slow; then the copy costs less than the wait.
            let mut tail = vec![0u8; rest];
            buf.read(mem, HEADER_LEN as u64 + sent as u64, &mut tail)
                .map_err(ConnError::Memory)?;
            self.queued.extend(tail);
        }
        self.rx_cnt = self.rx_cnt.wrapping_add(len);
        self.fwd_cnt = self.fwd_cnt.wrapping_add(sent as u32);
        self.after_forward();
        Ok(())
    }

    /// Writes what is queued to the host socket, as much as it takes; then does what waited for
    /// it (the host's write side shut down, RST once the guest closed).
    pub fn flush(&mut self) -> Result<(), ConnError> {
        while !self.greeting.is_empty() {
            match self.stream.write(&self.greeting) {
                Ok(n) => {
                    self.greeting.drain(..n);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) => return Err(ConnError::Host(e)),
            }
        }
        while !self.queued.is_empty() {
            let (front, _) = self.queued.as_slices();
            match self.stream.write(front) {
                Ok(0) => break,
                Ok(n) => {
                    self.queued.drain(..n);
                    self.fwd_cnt = self.fwd_cnt.wrapping_add(n as u32);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(ConnError::Host(e)),
            }
        }
        self.after_forward();
        Ok(())
    }

    fn after_forward(&mut self) {
        if self.queued_len() != 0 || self.state == State::Connecting {
            return;
        }
        if self.peer_shutdown & SHUTDOWN_SEND != 0 && !self.host_write_shut {
            self.host_write_shut = true;
            // The host's reader sees end of file; a socket already gone needs no telling.
            let _ = self.stream.shutdown(Shutdown::Write);
        }
        if self.state == State::Closing {
            self.owed |= pending::RST;
        }
        let told_in_flight = self.rx_cnt.wrapping_sub(self.told_fwd_cnt);
        if self.fwd_cnt != self.told_fwd_cnt && told_in_flight >= CREDIT_UPDATE_AT {
            self.owed |= pending::CREDIT_UPDATE;
        }
    }

    fn header(&mut self, op: u16, len: u32, flags: u32) -> Header {
        self.told_fwd_cnt = self.fwd_cnt;
        // Every packet carries the credit: no separate update is owed after this one.
        self.owed &= !pending::CREDIT_UPDATE;
        Header {
            src_cid: HOST_CID,
            dst_cid: self.guest_cid,
            src_port: self.local_port,
            dst_port: self.peer_port,
            len,
            type_: TYPE_STREAM,
            op,
            flags,
            buf_alloc: BUF_ALLOC,
            fwd_cnt: self.fwd_cnt,
        }
    }

    /// Whether [`fill`](Self::fill) may have something to put in a receive buffer.
    pub fn has_work(&self) -> bool {
        self.owed != 0 || self.wants_to_read()
    }

    fn wants_to_read(&self) -> bool {
        self.state == State::Established
            && self.host_readable
            && !self.host_eof
            && self.peer_shutdown & SHUTDOWN_RCV == 0
    }

    /// Whether the connection is over: its RST went out.
    pub fn is_done(&self) -> bool {
        self.done
    }

    /// Puts the connection's next packet into `buf`, a receive chain of at least a header: a
    /// control packet it owes, or stream data read from the host socket straight into guest
    /// memory (within the guest's credit). An RST is the last packet: the caller drops the
    /// connection after it.
    pub fn fill(&mut self, mem: &GuestMemoryMmap, buf: &Buffers) -> Result<Filled, ConnError> {
        let h = if self.owed & pending::RST != 0 {
            self.owed = 0;
            self.done = true;
            self.header(OP_RST, 0, 0)
        } else if self.owed & pending::REQUEST != 0 {
            self.owed &= !pending::REQUEST;
            self.header(OP_REQUEST, 0, 0)
        } else if self.owed & pending::RESPONSE != 0 {
            self.owed &= !pending::RESPONSE;
            self.header(OP_RESPONSE, 0, 0)
        } else if let Some(h) = self.read_host(mem, buf)? {
            h
        } else if self.owed & pending::SHUTDOWN != 0 {
            self.owed &= !pending::SHUTDOWN;
            self.header(OP_SHUTDOWN, 0, SHUTDOWN_SEND)
        } else if self.owed & pending::CREDIT_REQUEST != 0 {
            self.owed &= !pending::CREDIT_REQUEST;
            self.header(OP_CREDIT_REQUEST, 0, 0)
        } else if self.owed & pending::CREDIT_UPDATE != 0 {
            self.header(OP_CREDIT_UPDATE, 0, 0)
        } else {
            return Ok(Filled::Nothing);
        };
        buf.write(mem, 0, &h.to_bytes())
            .map_err(ConnError::Memory)?;
        Ok(Filled::Packet(HEADER_LEN as u32 + h.len))
    }

    /// Stream data from the host, read into `buf` after its header; None when there is none to
    /// send now (nothing readable, no credit: then the guest is asked for credit once).
    fn read_host(
        &mut self,
        mem: &GuestMemoryMmap,
        buf: &Buffers,
    ) -> Result<Option<Header>, ConnError> {
        if !self.wants_to_read() {
            return Ok(None);
        }
        let credit = self.peer_credit();
        if credit == 0 {
            if !self.asked_credit {
                self.asked_credit = true;
                self.owed |= pending::CREDIT_REQUEST;
            }
            return Ok(None);
        }
        let room = buf.len().saturating_sub(HEADER_LEN as u64);
        let max = room.min(u64::from(credit)).min(u64::from(MAX_PAYLOAD));
        if max == 0 {
            return Ok(None);
        }
        match buf.read_from(mem, HEADER_LEN as u64, max, &mut self.stream) {
            Ok(0) => {
                self.host_eof = true;
                self.owed |= pending::SHUTDOWN;
                Ok(None)
            }
            Ok(n) => {
                // At most MAX_PAYLOAD: fits in u32.
                // Read on until the socket would block: with edge-triggered events, end of file
                // after a short read is only seen by reading again.
                let n = n as u32;
                self.tx_cnt = self.tx_cnt.wrapping_add(n);
                Ok(Some(self.header(OP_RW, n, 0)))
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                self.host_readable = false;
                Ok(None)
            }
            Err(e) => Err(ConnError::Host(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(buf_alloc: u32, fwd_cnt: u32) -> Header {
        Header {
            buf_alloc,
            fwd_cnt,
            ..Header::default()
        }
    }

    fn conn() -> (Connection, UnixStream) {
        let (a, b) = UnixStream::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        (Connection::from_host(1, 1 << 30, 52, 3, a), b)
    }

    #[test]
    fn credit_is_the_peers_buffer_less_what_is_in_flight() {
        let (mut c, _peer) = conn();
        assert_eq!(c.peer_credit(), 0, "nothing before the guest says");
        c.set_peer_credit(&peer(1000, 0));
        assert_eq!(c.peer_credit(), 1000);
        c.tx_cnt = 600;
        assert_eq!(c.peer_credit(), 400);
        c.set_peer_credit(&peer(1000, 500));
        assert_eq!(c.peer_credit(), 900);
        // The counters wrap at 2^32.
        c.tx_cnt = 10;
        c.set_peer_credit(&peer(1000, u32::MAX - 89));
        assert_eq!(c.peer_credit(), 900);
        // A peer that claims to have forwarded more than it got, or a shrunken buffer, gives no
        // more than its buffer and never wraps to a huge credit.
        c.tx_cnt = 100;
        c.set_peer_credit(&peer(1000, 200));
        assert_eq!(c.peer_credit(), 0);
        c.set_peer_credit(&peer(u32::MAX, 100));
        assert_eq!(c.peer_credit(), u32::MAX);
        c.set_peer_credit(&peer(50, 0));
        assert_eq!(c.peer_credit(), 0);
    }
}
