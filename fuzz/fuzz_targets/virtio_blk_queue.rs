//! virtio-blk queue processing over arbitrary guest memory: the driver's descriptor table, avail
//! ring, used ring and data all come from the fuzzer, as does the number of available entries
//! each time the queue is served. The device is activated the way the transport does it and
//! serves the queue as it does on the event loop (`process_queue`). The disk is a plain image or
//! a copy-on-write one (the same image as its base, under a tmp overlay or an overlay file that
//! lives on from input to input). Besides not panicking or hanging: a read-only image, and a base
//! under an overlay, are never changed.
#![no_main]

use std::os::unix::fs::FileExt;
use std::sync::{Arc, OnceLock};

use arbitrary::Arbitrary;
use ember_devices::virtio::block::QUEUE_SIZE;
use ember_devices::virtio::VirtioDevice;
use ember_devices::virtio::{Block, DiskConfig, Interrupt, OverlayConfig};
use libfuzzer_sys::fuzz_target;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const MEM_SIZE: usize = 0x10_0000;
const DESC: u64 = 0x1000;
const AVAIL: u64 = 0x2000;
const USED: u64 = 0x3000;
const BUFFERS: u64 = 0x1_0000;
const SECTORS: u64 = 64;

/// A descriptor, written into the table in order. Addresses mostly point into the buffer area
/// (so headers and data come from `buffers`); `far` takes the raw address.
#[derive(Arbitrary, Debug)]
struct Desc {
    addr: u32,
    far: bool,
    len: u32,
    flags: u16,
    next: u16,
}

#[derive(Arbitrary, Debug)]
struct Input {
    size_log2: u8,
    readonly: bool,
    features: u64,
    /// Raw guest memory from 0x1000 on: descriptor table, avail ring (0x2000), used ring
    /// (0x3000), then buffers. The structured fields below are written over it.
    memory: Vec<u8>,
    descs: Vec<Desc>,
    avail: Vec<u16>,
    /// Request headers and data, at BUFFERS.
    buffers: Vec<u8>,
    /// Each round sets avail.idx, then the device serves the queue.
    rounds: Vec<u16>,
    /// Occasionally the rings themselves are placed elsewhere (maybe outside memory).
    odd_rings: Option<(u64, u64, u64)>,
    /// 0: the image itself; 1: under a tmp overlay; 2: under the overlay file.
    backend: u8,
}

fn image_path() -> &'static std::path::Path {
    static PATH: OnceLock<std::path::PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        let p = std::env::temp_dir().join(format!("ember-fuzz-blk-{}.img", std::process::id()));
        let f = std::fs::File::create(&p).unwrap();
        let bytes: Vec<u8> = (0..SECTORS * 512).map(|i| (i * 7 % 251) as u8).collect();
        f.write_all_at(&bytes, 0).unwrap();
        p
    })
}

fn overlay_path() -> &'static std::path::Path {
    static PATH: OnceLock<std::path::PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        std::env::temp_dir().join(format!("ember-fuzz-blk-{}.ovl", std::process::id()))
    })
}

fn image_bytes() -> Vec<u8> {
    std::fs::read(image_path()).unwrap()
}

fuzz_target!(|input: Input| {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
    let n = input.memory.len().min(MEM_SIZE - DESC as usize);
    mem.write_slice(&input.memory[..n], GuestAddress(DESC))
        .unwrap();
    for (i, d) in input.descs.iter().take(256).enumerate() {
        let addr = if d.far {
            u64::from(d.addr) << 8
        } else {
            BUFFERS + u64::from(d.addr % 0x1_0000)
        };
        let mut raw = [0u8; 16];
        raw[0..8].copy_from_slice(&addr.to_le_bytes());
        let len = if d.far { d.len } else { d.len % 0x2_0000 };
        raw[8..12].copy_from_slice(&len.to_le_bytes());
        raw[12..14].copy_from_slice(&(d.flags & 0x7).to_le_bytes());
        raw[14..16].copy_from_slice(&d.next.to_le_bytes());
        mem.write_slice(&raw, GuestAddress(DESC + 16 * i as u64))
            .unwrap();
    }
    for (i, head) in input.avail.iter().take(256).enumerate() {
        mem.write_obj(*head, GuestAddress(AVAIL + 4 + 2 * i as u64))
            .unwrap();
    }
    let n = input.buffers.len().min(MEM_SIZE - BUFFERS as usize);
    mem.write_slice(&input.buffers[..n], GuestAddress(BUFFERS))
        .unwrap();

    let overlay = match input.backend % 3 {
        0 => None,
        1 => Some(OverlayConfig::Tmp),
        _ => Some(OverlayConfig::File(overlay_path().to_path_buf())),
    };
    // readonly=on with an overlay is a user error, refused before any guest.
    let readonly = input.readonly && overlay.is_none();
    let unchanged = readonly || overlay.is_some();
    let mut block = Block::new(&DiskConfig {
        path: image_path().to_path_buf(),
        readonly,
        id: None,
        overlay,
    })
    .unwrap();
    let before = unchanged.then(image_bytes);

    let size = 1u16 << (input.size_log2 % 9);
    let mut queue = Queue::new(QUEUE_SIZE).unwrap();
    queue.set_size(size);
    let (desc, avail, used) = input.odd_rings.unwrap_or((DESC, AVAIL, USED));
    queue.set_desc_table_address(Some(desc as u32), Some((desc >> 32) as u32));
    queue.set_avail_ring_address(Some(avail as u32), Some((avail >> 32) as u32));
    queue.set_used_ring_address(Some(used as u32), Some((used >> 32) as u32));
    queue.set_ready(true);
    // The transport only activates queues that are valid in guest memory.
    if !queue.is_valid(&mem) {
        return;
    }
    queue.set_event_idx(input.features & (1 << 29) != 0);
    let interrupt = Arc::new(Interrupt::new().unwrap());
    let acked = input.features & block.features();
    if block
        .activate(mem.clone(), vec![queue], interrupt.clone(), acked)
        .is_err()
    {
        return;
    }
    for idx in input.rounds.iter().take(8) {
        mem.write_obj(*idx, GuestAddress(avail.wrapping_add(2)))
            .ok();
        block.process_queue(0);
    }
    block.process_queue(1); // a queue that does not exist
    block.reset();
    block.process_queue(0);
    if let Some(before) = before {
        assert!(
            before == image_bytes(),
            "a read-only image or an overlay's base changed"
        );
    }
});
