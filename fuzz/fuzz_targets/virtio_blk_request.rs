//! The virtio-blk request parser (`parse_descriptors`, the checked parse step) on arbitrary
//! descriptor chains over guest memory with a hole, arbitrary memory contents and arbitrary disk
//! limits. A request it accepts must be safe to execute without further checks: every buffer in
//! guest memory, every sector on the disk, nothing written to a read-only disk, no feature used
//! that was not negotiated.
#![no_main]

use arbitrary::Arbitrary;
use ember_devices::virtio::block::{
    parse_descriptors, DiskLimits, ParseError, Request, RequestKind, Segment, SECTOR_SIZE,
};
use libfuzzer_sys::fuzz_target;
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryMmap, Permissions};

const LOW: (u64, usize) = (0, 0x1_0000);
const HIGH: (u64, usize) = (0x10_0000, 0x1_0000);

#[derive(Arbitrary, Debug)]
struct Desc {
    /// Where `addr` points: 0 into the low region (whose bytes the fuzzer writes), 1 into the
    /// high one, 2 just below the hole between them, else anywhere.
    place: u8,
    addr: u32,
    len: u32,
    flags: u16,
}

#[derive(Arbitrary, Debug)]
struct Input {
    descs: Vec<Desc>,
    /// Small disks most of the time, so that sector numbers in headers hit the end often.
    small_disk: bool,
    sectors: u64,
    readonly: bool,
    discard: bool,
    write_zeroes: bool,
    max_discard_sectors: u32,
    max_write_zeroes_sectors: u32,
    memory: Vec<u8>,
}

fn in_memory(mem: &GuestMemoryMmap, s: &Segment, access: Permissions) -> bool {
    mem.check_range(s.addr, s.len as usize, access)
}

fn check_sectors(sector: u64, segments: &[Segment], limits: &DiskLimits) {
    let bytes: u64 = segments.iter().map(|s| u64::from(s.len)).sum();
    assert_eq!(bytes % SECTOR_SIZE, 0);
    let end = sector
        .checked_add(bytes / SECTOR_SIZE)
        .expect("sector overflow");
    assert!(
        end <= limits.sectors,
        "{sector}+{bytes} bytes past {}",
        limits.sectors
    );
}

fn check(mem: &GuestMemoryMmap, req: &Request, limits: &DiskLimits) {
    assert!(mem.check_range(req.status, 1, Permissions::Write));
    match &req.kind {
        RequestKind::Read { sector, segments } => {
            assert!(segments
                .iter()
                .all(|s| in_memory(mem, s, Permissions::Write)));
            check_sectors(*sector, segments, limits);
        }
        RequestKind::Write { sector, segments } => {
            assert!(!limits.readonly);
            assert!(segments
                .iter()
                .all(|s| in_memory(mem, s, Permissions::Read)));
            check_sectors(*sector, segments, limits);
        }
        RequestKind::Flush => {}
        RequestKind::GetId { segments } => {
            assert!(segments
                .iter()
                .all(|s| in_memory(mem, s, Permissions::Write)));
            assert!(segments.iter().map(|s| u64::from(s.len)).sum::<u64>() <= 20);
        }
        RequestKind::Discard(r) => {
            assert!(limits.discard && !limits.readonly);
            assert!(r.sectors <= limits.max_discard_sectors);
            assert!(r.sector.checked_add(u64::from(r.sectors)).unwrap() <= limits.sectors);
        }
        RequestKind::WriteZeroes { range: r, .. } => {
            assert!(limits.write_zeroes && !limits.readonly);
            assert!(r.sectors <= limits.max_write_zeroes_sectors);
            assert!(r.sector.checked_add(u64::from(r.sectors)).unwrap() <= limits.sectors);
        }
    }
}

fuzz_target!(|input: Input| {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[
        (GuestAddress(LOW.0), LOW.1),
        (GuestAddress(HIGH.0), HIGH.1),
    ])
    .unwrap();
    let n = input.memory.len().min(LOW.1);
    mem.write_slice(&input.memory[..n], GuestAddress(0))
        .unwrap();
    let descs: Vec<Descriptor> = input
        .descs
        .iter()
        .take(300)
        .enumerate()
        .map(|(i, d)| {
            let addr = match d.place % 4 {
                0 => u64::from(d.addr) % LOW.1 as u64,
                1 => HIGH.0 + u64::from(d.addr) % HIGH.1 as u64,
                2 => LOW.1 as u64 - u64::from(d.addr % 0x200),
                _ => u64::from(d.addr) << 16 | u64::from(d.flags),
            };
            Descriptor::new(addr, d.len, d.flags & 0x7, (i + 1) as u16)
        })
        .collect();
    let limits = DiskLimits {
        sectors: if input.small_disk {
            input.sectors % 128
        } else {
            input.sectors
        },
        readonly: input.readonly,
        discard: input.discard,
        write_zeroes: input.write_zeroes,
        max_discard_sectors: input.max_discard_sectors,
        max_write_zeroes_sectors: input.max_write_zeroes_sectors,
    };
    match parse_descriptors(&mem, &descs, &limits) {
        Ok(req) => check(&mem, &req, &limits),
        Err(ParseError::Rejected { status, reason }) => {
            // A rejection is answered through the status byte, so it must be writable.
            assert!(mem.check_range(status, 1, Permissions::Write), "{reason}");
            drop(reason.to_string());
        }
        Err(ParseError::Chain(e)) => drop(e.to_string()),
    }
});
