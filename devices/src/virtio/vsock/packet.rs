//! Packets of the virtio socket device (virtio 1.2 section 5.10.6): the 44-byte header, the checks
//! every guest packet goes through, and the guest buffers packets travel in.
//!
//! A packet is the bytes of one descriptor chain: transmit chains (guest to host) are all
//! device-readable, receive chains (host to guest) all device-writable, and the header is their
//! first 44 bytes however the driver split them into descriptors (Linux 6.1 gives the header a
//! descriptor of its own, later kernels put header and payload in one). [`Buffers`] is such a
//! chain as checked pieces of guest memory; everything read from a guest packet goes through
//! [`check`] before the device acts on it.

use std::io;

use virtio_queue::desc::split::Descriptor;
use vm_memory::{
    Bytes, GuestAddress, GuestMemory, GuestMemoryError, GuestMemoryMmap, Permissions, ReadVolatile,
    VolatileMemoryError, WriteVolatile,
};

pub const HEADER_LEN: usize = 44;
/// The host's well-known CID; the guest's comes from the config space.
pub const HOST_CID: u64 = 2;
/// Stream sockets, the only type the device has (no SEQPACKET feature is offered).
pub const TYPE_STREAM: u16 = 1;

pub const OP_REQUEST: u16 = 1;
pub const OP_RESPONSE: u16 = 2;
pub const OP_RST: u16 = 3;
pub const OP_SHUTDOWN: u16 = 4;
pub const OP_RW: u16 = 5;
pub const OP_CREDIT_UPDATE: u16 = 6;
pub const OP_CREDIT_REQUEST: u16 = 7;

/// SHUTDOWN flags: the sender will receive no more, will send no more.
pub const SHUTDOWN_RCV: u32 = 1;
pub const SHUTDOWN_SEND: u32 = 2;
pub const SHUTDOWN_BOTH: u32 = SHUTDOWN_RCV | SHUTDOWN_SEND;

/// The largest payload one packet may carry, either way: Linux's own limit
/// (VIRTIO_VSOCK_MAX_PKT_BUF_SIZE), so no Linux driver sends more, and the most the device copies
/// for one packet.
pub const MAX_PAYLOAD: u32 = 64 << 10;

/// `struct virtio_vsock_hdr`, little-endian and packed on the wire.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Header {
    pub src_cid: u64,
    pub dst_cid: u64,
    pub src_port: u32,
    pub dst_port: u32,
    pub len: u32,
    pub type_: u16,
    pub op: u16,
    pub flags: u32,
    pub buf_alloc: u32,
    pub fwd_cnt: u32,
}

impl Header {
    pub fn from_bytes(b: &[u8; HEADER_LEN]) -> Header {
        let u64_at = |at: usize| {
            let mut v = [0u8; 8];
            v.copy_from_slice(&b[at..at + 8]);
            u64::from_le_bytes(v)
        };
        let u32_at = |at: usize| u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
        let u16_at = |at: usize| u16::from_le_bytes([b[at], b[at + 1]]);
        Header {
            src_cid: u64_at(0),
            dst_cid: u64_at(8),
            src_port: u32_at(16),
            dst_port: u32_at(20),
            len: u32_at(24),
            type_: u16_at(28),
            op: u16_at(30),
            flags: u32_at(32),
            buf_alloc: u32_at(36),
            fwd_cnt: u32_at(40),
        }
    }

    pub fn to_bytes(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.type_.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }

    /// The RST that answers this packet: its addresses mirrored, so that the sender finds the
    /// socket it sent from (Linux looks the reply up by both ends).
    pub fn reset_reply(&self) -> Header {
        Header {
            src_cid: self.dst_cid,
            dst_cid: self.src_cid,
            src_port: self.dst_port,
            dst_port: self.src_port,
            type_: TYPE_STREAM,
            op: OP_RST,
            ..Header::default()
        }
    }
}

/// What a checked guest packet asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Request,
    Response,
    Rst,
    /// SHUTDOWN_RCV and/or SHUTDOWN_SEND.
    Shutdown(u32),
    /// Stream data: the header's `len` payload bytes follow it.
    Rw,
    CreditUpdate,
    CreditRequest,
}

impl Op {
    fn name(code: u16) -> &'static str {
        match code {
            OP_REQUEST => "REQUEST",
            OP_RESPONSE => "RESPONSE",
            OP_RST => "RST",
            OP_SHUTDOWN => "SHUTDOWN",
            OP_RW => "RW",
            OP_CREDIT_UPDATE => "CREDIT_UPDATE",
            OP_CREDIT_REQUEST => "CREDIT_REQUEST",
            _ => "unknown",
        }
    }
}

/// A guest packet the device does not act on. Chain errors leave no header to answer; header
/// errors are answered with RST (see [`PacketError::answer_with_rst`]).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PacketError {
    #[error("dropped descriptor chain: {0}")]
    Chain(#[from] crate::virtio::block::ChainError),
    #[error("a {0} descriptor in a {1} chain")]
    Direction(&'static str, &'static str),
    #[error("buffer {addr:#x}+{len:#x} is not in guest memory")]
    OutsideMemory { addr: u64, len: u32 },
    #[error("packet of {0} bytes is shorter than its {HEADER_LEN}-byte header")]
    Short(u64),
    #[error("source CID {got} is not the guest's ({guest})")]
    SourceCid { got: u64, guest: u64 },
    #[error("destination CID {0} is not the host's ({HOST_CID})")]
    DestinationCid(u64),
    #[error("socket type {0} is not stream ({TYPE_STREAM})")]
    Type(u16),
    #[error("operation {0} is not one the device knows")]
    Op(u16),
    #[error("payload of {0} bytes is over the {MAX_PAYLOAD}-byte limit")]
    TooLong(u32),
    #[error("the header says {header} payload bytes, the chain carries {chain}")]
    Length { header: u32, chain: u64 },
    #[error("{op} packet carries {len} payload bytes")]
    PayloadOnControl { op: &'static str, len: u32 },
    #[error("flags {flags:#x} are not valid on a {op} packet")]
    Flags { op: &'static str, flags: u32 },
}

impl PacketError {
    /// Whether the sender is told with RST: every header error (spec 5.10.6.4: an unknown type
    /// MUST be), except a wrong source CID, where the reply would be addressed to a socket the
    /// guest does not have.
    pub fn answer_with_rst(&self) -> bool {
        !matches!(
            self,
            PacketError::Chain(_)
                | PacketError::Direction(..)
                | PacketError::OutsideMemory { .. }
                | PacketError::Short(_)
                | PacketError::SourceCid { .. }
        )
    }
}

/// Checks every field of a guest packet's header; `payload` is how many bytes follow the header
/// in its chain. Returns what the packet asks for.
pub fn check(h: &Header, guest_cid: u64, payload: u64) -> Result<Op, PacketError> {
    if h.src_cid != guest_cid {
        return Err(PacketError::SourceCid {
            got: h.src_cid,
            guest: guest_cid,
        });
    }
    if h.dst_cid != HOST_CID {
        return Err(PacketError::DestinationCid(h.dst_cid));
    }
    if h.type_ != TYPE_STREAM {
        return Err(PacketError::Type(h.type_));
    }
    let name = Op::name(h.op);
    let op = match h.op {
        OP_REQUEST => Op::Request,
        OP_RESPONSE => Op::Response,
        OP_RST => Op::Rst,
        OP_SHUTDOWN => Op::Shutdown(h.flags),
        OP_RW => Op::Rw,
        OP_CREDIT_UPDATE => Op::CreditUpdate,
        OP_CREDIT_REQUEST => Op::CreditRequest,
        other => return Err(PacketError::Op(other)),
    };
    if h.len > MAX_PAYLOAD {
        return Err(PacketError::TooLong(h.len));
    }
    // A driver may hand over a chain longer than the packet (spare room after the payload is
    // harmless); a chain shorter than the header says is a lie about the payload.
    if u64::from(h.len) > payload {
        return Err(PacketError::Length {
            header: h.len,
            chain: payload,
        });
    }
    match op {
        Op::Rw if h.len == 0 => {
            return Err(PacketError::Length {
                header: 0,
                chain: payload,
            })
        }
        Op::Rw => {}
        _ if h.len != 0 => {
            return Err(PacketError::PayloadOnControl {
                op: name,
                len: h.len,
            })
        }
        _ => {}
    }
    let allowed = match op {
        // At least one of the two: an empty SHUTDOWN says nothing.
        Op::Shutdown(f) if f != 0 => SHUTDOWN_BOTH,
        // Stream packets have no flags (SEQPACKET's message bits are not negotiated).
        _ => 0,
    };
    if h.flags & !allowed != 0 || (h.op == OP_SHUTDOWN && h.flags == 0) {
        return Err(PacketError::Flags {
            op: name,
            flags: h.flags,
        });
    }
    Ok(op)
}

/// The bytes of one descriptor chain, all in one direction, as pieces of guest memory checked to
/// be there with the access the device needs.
#[derive(Debug, Default)]
pub struct Buffers {
    pieces: Vec<(GuestAddress, u32)>,
    len: u64,
}

impl Buffers {
    /// `writable`: a receive chain (the device writes it); else a transmit chain.
    pub fn new(
        mem: &GuestMemoryMmap,
        descs: &[Descriptor],
        writable: bool,
    ) -> Result<Buffers, PacketError> {
        let (want, access) = if writable {
            ("receive", Permissions::Write)
        } else {
            ("transmit", Permissions::Read)
        };
        let mut pieces = Vec::with_capacity(descs.len());
        let mut len = 0u64;
        for d in descs {
            if d.is_write_only() != writable {
                let kind = if writable {
                    "device-readable"
                } else {
                    "device-writable"
                };
                return Err(PacketError::Direction(kind, want));
            }
            if !mem.check_range(d.addr(), d.len() as usize, access) {
                return Err(PacketError::OutsideMemory {
                    addr: d.addr().0,
                    len: d.len(),
                });
            }
            if d.len() > 0 {
                pieces.push((d.addr(), d.len()));
            }
            // At most 2^16 descriptors of under 2^32 bytes: no overflow.
            len += u64::from(d.len());
        }
        Ok(Buffers { pieces, len })
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The pieces of guest memory holding bytes `start..start + len` of the chain (clipped to its
    /// end).
    fn range(&self, start: u64, len: u64) -> impl Iterator<Item = (GuestAddress, usize)> + '_ {
        let end = start.saturating_add(len);
        let mut at = 0u64;
        self.pieces.iter().filter_map(move |&(addr, plen)| {
            let (from, to) = (at, at + u64::from(plen));
            at = to;
            let (lo, hi) = (start.max(from), end.min(to));
            // Checked to lie in guest memory, so the address does not wrap.
            (lo < hi).then(|| (GuestAddress(addr.0 + (lo - from)), (hi - lo) as usize))
        })
    }

    /// Fills `buf` from the chain's bytes at `start` on.
    pub fn read(
        &self,
        mem: &GuestMemoryMmap,
        start: u64,
        buf: &mut [u8],
    ) -> Result<(), GuestMemoryError> {
        let mut done = 0;
        for (addr, n) in self.range(start, buf.len() as u64) {
            mem.read_slice(&mut buf[done..done + n], addr)?;
            done += n;
        }
        Ok(())
    }

    /// Writes `buf` into the chain at `start` (the caller checked it fits).
    pub fn write(
        &self,
        mem: &GuestMemoryMmap,
        start: u64,
        buf: &[u8],
    ) -> Result<(), GuestMemoryError> {
        let mut done = 0;
        for (addr, n) in self.range(start, buf.len() as u64) {
            mem.write_slice(&buf[done..done + n], addr)?;
            done += n;
        }
        Ok(())
    }

    /// Writes up to `len` bytes of the chain from `start` on to `dst`, straight from guest
    /// memory, one `write` per piece; stops at the first short write. Returns how many were
    /// taken: an error only when none were (a socket that would block, or is gone).
    pub fn write_to<W: WriteVolatile>(
        &self,
        mem: &GuestMemoryMmap,
        start: u64,
        len: u64,
        dst: &mut W,
    ) -> io::Result<usize> {
        self.each_slice(mem, start, len, Permissions::Read, |slice| {
            dst.write_volatile(slice)
        })
    }

    /// Reads up to `len` bytes from `src` into the chain at `start` on, straight into guest
    /// memory; stops at the first short read. Returns how many were read (0: end of stream); an
    /// error only when none were.
    pub fn read_from<R: ReadVolatile>(
        &self,
        mem: &GuestMemoryMmap,
        start: u64,
        len: u64,
        src: &mut R,
    ) -> io::Result<usize> {
        self.each_slice(mem, start, len, Permissions::Write, |slice| {
            src.read_volatile(&mut slice.clone())
        })
    }

    fn each_slice<F>(
        &self,
        mem: &GuestMemoryMmap,
        start: u64,
        len: u64,
        access: Permissions,
        mut io: F,
    ) -> io::Result<usize>
    where
        F: FnMut(&vm_memory::VolatileSlice<'_, ()>) -> Result<usize, VolatileMemoryError>,
    {
        let mut done = 0usize;
        for (addr, n) in self.range(start, len) {
            let slices = mem.get_slices(addr, n, access).map_err(io::Error::other)?;
            // A piece crossing from one memory region into the next comes as two slices.
            for slice in slices {
                let slice = slice.map_err(io::Error::other)?;
                let want = slice.len();
                let got = loop {
                    match io(&slice) {
                        Ok(got) => break got,
                        Err(VolatileMemoryError::IOError(e))
                            if e.kind() == io::ErrorKind::Interrupted =>
                        {
                            continue
                        }
                        Err(VolatileMemoryError::IOError(e)) if done == 0 => return Err(e),
                        Err(VolatileMemoryError::IOError(_)) => return Ok(done),
                        Err(e) => return Err(io::Error::other(e)),
                    }
                };
                done += got;
                if got < want {
                    return Ok(done);
                }
            }
        }
        Ok(done)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GUEST: u64 = 3;

    fn hdr(op: u16, len: u32, flags: u32) -> Header {
        Header {
            src_cid: GUEST,
            dst_cid: HOST_CID,
            src_port: 1000,
            dst_port: 52,
            len,
            type_: TYPE_STREAM,
            op,
            flags,
            buf_alloc: 65536,
            fwd_cnt: 7,
        }
    }

    #[test]
    fn the_header_is_44_little_endian_bytes_in_spec_order() {
        let h = Header {
            src_cid: 0x0102_0304_0506_0708,
            dst_cid: 2,
            src_port: 0x1122_3344,
            dst_port: 0x5566_7788,
            len: 9,
            type_: 1,
            op: 5,
            flags: 0xa0b0_c0d0,
            buf_alloc: 0x0004_0000,
            fwd_cnt: 0xdead_beef,
        };
        let b = h.to_bytes();
        assert_eq!(b.len(), 44);
        assert_eq!(&b[0..8], &[8, 7, 6, 5, 4, 3, 2, 1]);
        assert_eq!(&b[16..20], &[0x44, 0x33, 0x22, 0x11]);
        assert_eq!(&b[28..32], &[1, 0, 5, 0]);
        assert_eq!(&b[40..44], &[0xef, 0xbe, 0xad, 0xde]);
        assert_eq!(Header::from_bytes(&b), h);
    }

    #[test]
    fn every_op_is_recognised_with_its_rules() {
        assert_eq!(check(&hdr(OP_REQUEST, 0, 0), GUEST, 0), Ok(Op::Request));
        assert_eq!(check(&hdr(OP_RESPONSE, 0, 0), GUEST, 0), Ok(Op::Response));
        assert_eq!(check(&hdr(OP_RST, 0, 0), GUEST, 0), Ok(Op::Rst));
        for f in [SHUTDOWN_RCV, SHUTDOWN_SEND, SHUTDOWN_BOTH] {
            assert_eq!(
                check(&hdr(OP_SHUTDOWN, 0, f), GUEST, 0),
                Ok(Op::Shutdown(f))
            );
        }
        assert_eq!(check(&hdr(OP_RW, 10, 0), GUEST, 10), Ok(Op::Rw));
        assert_eq!(check(&hdr(OP_RW, 10, 0), GUEST, 4096), Ok(Op::Rw));
        assert_eq!(
            check(&hdr(OP_CREDIT_UPDATE, 0, 0), GUEST, 0),
            Ok(Op::CreditUpdate)
        );
        assert_eq!(
            check(&hdr(OP_CREDIT_REQUEST, 0, 0), GUEST, 0),
            Ok(Op::CreditRequest)
        );
    }

    #[test]
    fn every_header_field_is_checked() {
        let bad = |h: Header, payload: u64| check(&h, GUEST, payload).unwrap_err();
        let mut h = hdr(OP_RW, 1, 0);
        h.src_cid = 4;
        let e = bad(h, 1);
        assert_eq!(e, PacketError::SourceCid { got: 4, guest: 3 });
        assert!(!e.answer_with_rst());
        let mut h = hdr(OP_REQUEST, 0, 0);
        h.dst_cid = 7;
        assert_eq!(bad(h, 0), PacketError::DestinationCid(7));
        let mut h = hdr(OP_REQUEST, 0, 0);
        h.type_ = 2;
        let e = bad(h, 0);
        assert_eq!(e, PacketError::Type(2));
        assert!(e.answer_with_rst());
        for op in [0, 8, 0xffff] {
            assert_eq!(bad(hdr(op, 0, 0), 0), PacketError::Op(op));
        }
        assert_eq!(
            bad(hdr(OP_RW, MAX_PAYLOAD + 1, 0), u64::MAX),
            PacketError::TooLong(MAX_PAYLOAD + 1)
        );
        assert!(matches!(
            bad(hdr(OP_RW, 100, 0), 99),
            PacketError::Length {
                header: 100,
                chain: 99
            }
        ));
        assert!(matches!(
            bad(hdr(OP_RW, 0, 0), 0),
            PacketError::Length { .. }
        ));
        for op in [OP_REQUEST, OP_RESPONSE, OP_RST, OP_CREDIT_UPDATE] {
            assert!(matches!(
                bad(hdr(op, 1, 0), 1),
                PacketError::PayloadOnControl { len: 1, .. }
            ));
        }
        assert!(matches!(
            bad(hdr(OP_SHUTDOWN, 0, 0), 0),
            PacketError::Flags { flags: 0, .. }
        ));
        assert!(matches!(
            bad(hdr(OP_SHUTDOWN, 0, 4), 0),
            PacketError::Flags { flags: 4, .. }
        ));
        assert!(matches!(
            bad(hdr(OP_RW, 1, 1), 1),
            PacketError::Flags { flags: 1, .. }
        ));
    }

    #[test]
    fn a_reset_reply_mirrors_the_addresses() {
        let h = hdr(OP_RW, 5, 0);
        let r = h.reset_reply();
        assert_eq!((r.src_cid, r.dst_cid), (HOST_CID, GUEST));
        assert_eq!((r.src_port, r.dst_port), (52, 1000));
        assert_eq!((r.op, r.type_, r.len, r.flags), (OP_RST, TYPE_STREAM, 0, 0));
    }
}
