//! A virtio-blk request (spec 5.2.6), parsed out of a descriptor chain and checked.
//!
//! Framing (spec 2.6.4): a request is the bytes of its device-readable descriptors (a 16-byte
//! header, then data for the device) followed by the bytes of its device-writable descriptors
//! (data for the driver, then the status byte, the very last byte). A device may not assume how
//! the driver splits those bytes into descriptors, so parsing works on byte offsets and yields
//! [`Segment`]s of guest memory. Everything a guest controls is checked here: the chain's shape,
//! directions, that every buffer lies in guest memory with the access it needs, lengths, and sector
//! ranges. Executing a [`Request`] needs no further checks on guest data.

use std::mem::size_of;
use std::ops::Deref;

use virtio_bindings::virtio_blk::{
    virtio_blk_discard_write_zeroes, virtio_blk_outhdr, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_UNSUPP,
    VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::DescriptorChain;
use vm_memory::{Bytes, GuestAddress, GuestMemory, Permissions};

use super::backend::{DISK_ID_LEN, SECTOR_SIZE};

const HEADER_LEN: u64 = size_of::<virtio_blk_outhdr>() as u64;
const DISCARD_SEGMENT_LEN: u64 = size_of::<virtio_blk_discard_write_zeroes>() as u64;

/// A piece of guest memory, checked to be inside guest RAM with the access the request needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    pub addr: GuestAddress,
    pub len: u32,
}

/// Sectors checked to lie on the disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SectorRange {
    pub sector: u64,
    pub sectors: u32,
}

impl SectorRange {
    /// The range's byte offset and length on the disk.
    pub fn bytes(&self) -> (u64, u64) {
        // Checked to lie on the disk, whose size in bytes fits in u64.
        (
            self.sector * SECTOR_SIZE,
            u64::from(self.sectors) * SECTOR_SIZE,
        )
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RequestKind {
    /// Disk to guest: `segments` hold a whole number of sectors from `sector` on.
    Read {
        sector: u64,
        segments: Vec<Segment>,
    },
    /// Guest to disk.
    Write {
        sector: u64,
        segments: Vec<Segment>,
    },
    Flush,
    /// The device id goes to `segments` (at most 20 bytes in all).
    GetId {
        segments: Vec<Segment>,
    },
    Discard(SectorRange),
    WriteZeroes {
        range: SectorRange,
        unmap: bool,
    },
}

/// A checked request and where its status byte goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    pub kind: RequestKind,
    pub status: GuestAddress,
}

impl Request {
    pub fn kind_name(&self) -> &'static str {
        match self.kind {
            RequestKind::Read { .. } => "read",
            RequestKind::Write { .. } => "write",
            RequestKind::Flush => "flush",
            RequestKind::GetId { .. } => "get-id",
            RequestKind::Discard(_) => "discard",
            RequestKind::WriteZeroes { .. } => "write-zeroes",
        }
    }
}

/// What the parser must know about the disk and the negotiated features.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DiskLimits {
    pub sectors: u64,
    pub readonly: bool,
    /// VIRTIO_BLK_F_DISCARD / VIRTIO_BLK_F_WRITE_ZEROES negotiated.
    pub discard: bool,
    pub write_zeroes: bool,
    pub max_discard_sectors: u32,
    pub max_write_zeroes_sectors: u32,
}

/// A chain that has nowhere to put a status byte: it goes back to the driver unanswered.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ChainError {
    #[error(
        "descriptor chain is empty (head outside the descriptor table, or a bad indirect table)"
    )]
    Empty,
    #[error(
        "descriptor chain does not end (a loop, a next index outside the table, or over 4 GiB)"
    )]
    Unterminated,
    #[error("descriptor chain has no status byte: its last descriptor is not device-writable or is empty")]
    NoStatus,
    #[error("status byte at {0:#x} is not in guest memory")]
    StatusOutsideMemory(u64),
}

/// A request answered with an error status.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Rejection {
    #[error("a device-readable descriptor follows a device-writable one")]
    ReadableAfterWritable,
    #[error("request header is {0} bytes, not {HEADER_LEN}")]
    ShortHeader(u64),
    #[error("buffer {addr:#x}+{len:#x} is not in guest memory")]
    OutsideMemory { addr: u64, len: u32 },
    #[error("data length {0} is not a multiple of {SECTOR_SIZE}")]
    UnalignedLength(u64),
    #[error("sectors {sector}+{count} are past the end of the disk ({capacity} sectors)")]
    PastEnd {
        sector: u64,
        count: u64,
        capacity: u64,
    },
    #[error("{0} request carries data in the wrong direction")]
    WrongDirection(&'static str),
    #[error("write to a read-only disk")]
    ReadOnly,
    #[error("request type {0} is not supported")]
    Unsupported(u32),
    #[error(
        "discard/write-zeroes payload of {0} bytes is not one {DISCARD_SEGMENT_LEN}-byte segment"
    )]
    BadSegments(u64),
    #[error("discard/write-zeroes flags {0:#x} are not supported")]
    UnsupportedFlags(u32),
    #[error("discard/write-zeroes of {0} sectors is over the device's limit")]
    TooManySectors(u32),
}

impl Rejection {
    /// The VIRTIO_BLK_S_* value the driver gets.
    pub fn status(&self) -> u8 {
        match self {
            Rejection::Unsupported(_) | Rejection::UnsupportedFlags(_) => VIRTIO_BLK_S_UNSUPP as u8,
            _ => VIRTIO_BLK_S_IOERR as u8,
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ParseError {
    #[error(transparent)]
    Chain(#[from] ChainError),
    #[error("{reason}")]
    Rejected {
        status: GuestAddress,
        reason: Rejection,
    },
}

/// The descriptors of `chain`, in order. Following the chain is bounded by virtio-queue (at most
/// queue-size descriptors, 4 GiB in all); a chain cut short by that still has NEXT set on its last
/// descriptor, which is how a loop shows up here.
pub fn collect_chain<M>(chain: DescriptorChain<M>) -> Result<Vec<Descriptor>, ChainError>
where
    M: Deref,
    M::Target: GuestMemory,
{
    let mut descs = Vec::new();
    collect_chain_into(chain, &mut descs)?;
    Ok(descs)
}

/// [`collect_chain`] into `descs` (cleared first), so that serving a queue can reuse one buffer.
pub fn collect_chain_into<M>(
    chain: DescriptorChain<M>,
    descs: &mut Vec<Descriptor>,
) -> Result<(), ChainError>
where
    M: Deref,
    M::Target: GuestMemory,
{
    descs.clear();
    descs.extend(chain);
    match descs.last() {
        None => Err(ChainError::Empty),
        Some(d) if d.has_next() => Err(ChainError::Unterminated),
        Some(_) => Ok(()),
    }
}

/// Parses the descriptors of one chain into a checked request.
pub fn parse_descriptors<M: GuestMemory>(
    mem: &M,
    descs: &[Descriptor],
    limits: &DiskLimits,
) -> Result<Request, ParseError> {
    let last = descs.last().ok_or(ChainError::Empty)?;
    if !last.is_write_only() || last.len() == 0 {
        return Err(ChainError::NoStatus.into());
    }
    let status = last
        .addr()
        .0
        .checked_add(u64::from(last.len()) - 1)
        .map(GuestAddress)
        .filter(|a| mem.check_range(*a, 1, Permissions::Write))
        .ok_or(ChainError::StatusOutsideMemory(last.addr().0))?;
    let reject = |reason| ParseError::Rejected { status, reason };

    // The last descriptor is writable, so there is a first writable one.
    let split = descs
        .iter()
        .position(|d| d.is_write_only())
        .unwrap_or(descs.len());
    let (readable, writable) = descs.split_at(split);
    if writable.iter().any(|d| !d.is_write_only()) {
        return Err(reject(Rejection::ReadableAfterWritable));
    }
    for (group, access) in [
        (readable, Permissions::Read),
        (writable, Permissions::Write),
    ] {
        for d in group {
            if !mem.check_range(d.addr(), d.len() as usize, access) {
                return Err(reject(Rejection::OutsideMemory {
                    addr: d.addr().0,
                    len: d.len(),
                }));
            }
        }
    }
    let readable_len = total_len(readable);
    let writable_len = total_len(writable);
    if readable_len < HEADER_LEN {
        return Err(reject(Rejection::ShortHeader(readable_len)));
    }
    let mut header = [0u8; HEADER_LEN as usize];
    read_at(mem, readable, 0, &mut header).map_err(reject)?;
    let request_type = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
    let mut sector_bytes = [0u8; 8];
    sector_bytes.copy_from_slice(&header[8..16]);
    let sector = u64::from_le_bytes(sector_bytes);

    // Data for the device follows the header; the status byte is the last writable byte, and
    // everything before it is data for the driver. Their segments are only built for the request
    // types that move data.
    let out_len = readable_len - HEADER_LEN;
    let in_len = writable_len - 1;

    let kind = match request_type {
        VIRTIO_BLK_T_IN => {
            if out_len != 0 {
                return Err(reject(Rejection::WrongDirection("read")));
            }
            check_sectors(sector, in_len, limits).map_err(reject)?;
            RequestKind::Read {
                sector,
                segments: segments(writable, 0, in_len),
            }
        }
        VIRTIO_BLK_T_OUT => {
            if in_len != 0 {
                return Err(reject(Rejection::WrongDirection("write")));
            }
            if limits.readonly {
                return Err(reject(Rejection::ReadOnly));
            }
            check_sectors(sector, out_len, limits).map_err(reject)?;
            RequestKind::Write {
                sector,
                segments: segments(readable, HEADER_LEN, readable_len),
            }
        }
        VIRTIO_BLK_T_FLUSH => {
            if in_len != 0 || out_len != 0 {
                return Err(reject(Rejection::WrongDirection("flush")));
            }
            RequestKind::Flush
        }
        VIRTIO_BLK_T_GET_ID => {
            if out_len != 0 {
                return Err(reject(Rejection::WrongDirection("get-id")));
            }
            RequestKind::GetId {
                segments: segments(writable, 0, in_len.min(DISK_ID_LEN as u64)),
            }
        }
        VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
            let discard = request_type == VIRTIO_BLK_T_DISCARD;
            let (negotiated, max) = if discard {
                (limits.discard, limits.max_discard_sectors)
            } else {
                (limits.write_zeroes, limits.max_write_zeroes_sectors)
            };
            if !negotiated {
                return Err(reject(Rejection::Unsupported(request_type)));
            }
            if limits.readonly {
                return Err(reject(Rejection::ReadOnly));
            }
            if in_len != 0 {
                return Err(reject(Rejection::WrongDirection("discard/write-zeroes")));
            }
            // max_discard_seg and max_write_zeroes_seg are 1.
            if out_len != DISCARD_SEGMENT_LEN {
                return Err(reject(Rejection::BadSegments(out_len)));
            }
            let mut seg = [0u8; DISCARD_SEGMENT_LEN as usize];
            read_at(mem, readable, HEADER_LEN, &mut seg).map_err(reject)?;
            let mut s = [0u8; 8];
            s.copy_from_slice(&seg[0..8]);
            let range_sector = u64::from_le_bytes(s);
            let sectors = u32::from_le_bytes([seg[8], seg[9], seg[10], seg[11]]);
            let flags = u32::from_le_bytes([seg[12], seg[13], seg[14], seg[15]]);
            let allowed = if discard {
                0
            } else {
                VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP
            };
            if flags & !allowed != 0 {
                return Err(reject(Rejection::UnsupportedFlags(flags)));
            }
            if sectors > max {
                return Err(reject(Rejection::TooManySectors(sectors)));
            }
            check_sectors(range_sector, u64::from(sectors) * SECTOR_SIZE, limits)
                .map_err(reject)?;
            let range = SectorRange {
                sector: range_sector,
                sectors,
            };
            if discard {
                RequestKind::Discard(range)
            } else {
                RequestKind::WriteZeroes {
                    range,
                    unmap: flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0,
                }
            }
        }
        other => return Err(reject(Rejection::Unsupported(other))),
    };
    Ok(Request { kind, status })
}

fn total_len(descs: &[Descriptor]) -> u64 {
    // At most 2^16 descriptors of under 2^32 bytes each: no overflow in u64.
    descs.iter().map(|d| u64::from(d.len())).sum()
}

/// The bytes `start..end` of the concatenation of `descs`, as segments.
fn segments(descs: &[Descriptor], start: u64, end: u64) -> Vec<Segment> {
    pieces(descs, start, end).collect()
}

/// The bytes `start..end` of the concatenation of `descs`, one piece per descriptor they touch.
fn pieces(descs: &[Descriptor], start: u64, end: u64) -> impl Iterator<Item = Segment> + '_ {
    descs
        .iter()
        .scan(0u64, move |offset, d| {
            let at = *offset;
            let len = u64::from(d.len());
            *offset += len;
            let (from, to) = (start.max(at), end.min(at + len));
            // Callers checked every descriptor lies in guest memory, so the address cannot wrap.
            let piece = match (from < to, d.addr().0.checked_add(from - at)) {
                (true, Some(addr)) => Some(Segment {
                    addr: GuestAddress(addr),
                    // A piece of one descriptor: fits in u32.
                    len: (to - from) as u32,
                }),
                _ => None,
            };
            Some(piece)
        })
        .flatten()
}

/// Fills `buf` from the bytes of `descs` at `start` on (the caller checked there are enough).
fn read_at<M: GuestMemory>(
    mem: &M,
    descs: &[Descriptor],
    start: u64,
    buf: &mut [u8],
) -> Result<(), Rejection> {
    let mut done = 0usize;
    for s in pieces(descs, start, start + buf.len() as u64) {
        let n = s.len as usize;
        mem.read_slice(&mut buf[done..done + n], s.addr)
            .map_err(|_| Rejection::OutsideMemory {
                addr: s.addr.0,
                len: s.len,
            })?;
        done += n;
    }
    Ok(())
}

fn check_sectors(sector: u64, len: u64, limits: &DiskLimits) -> Result<(), Rejection> {
    if !len.is_multiple_of(SECTOR_SIZE) {
        return Err(Rejection::UnalignedLength(len));
    }
    let count = len / SECTOR_SIZE;
    match sector.checked_add(count) {
        Some(end) if end <= limits.sectors => Ok(()),
        _ => Err(Rejection::PastEnd {
            sector,
            count,
            capacity: limits.sectors,
        }),
    }
}
