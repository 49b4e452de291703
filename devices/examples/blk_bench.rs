//! The disk benchmark's host-side parts (scripts/bench-disk.sh runs them; docs/disk-bench.md).
//!
//! `blk_bench device IMG` drives Ember's virtio-blk device model with no VM: guest memory is a
//! `GuestMemoryMmap` in this process, the split queue is laid out in it, requests are pushed the
//! way the test guest pushes them (tests/guests/blk.c, `blk.mode=bench`) and the device's queue
//! processing is called directly. The time reported is the time spent inside
//! `Block::process_queue` only: the device model's own cost (reading the rings, parsing the chain,
//! the file I/O, moving data to or from guest memory, the used ring, the interrupt eventfd),
//! without VM exits, the ioeventfd wake-up, guest code, or this driver's own ring writes.
//!
//! `blk_bench device IMG --overlay FILE|tmp` does the same with IMG as the read-only base of a
//! copy-on-write disk: reads come from the base until written, writes go to the overlay (run it
//! twice over one FILE for the second pass, where every block is the overlay's already). It
//! reports as `device-overlay`.
//!
//! `blk_bench host IMG` runs the same workloads with pread/pwrite on the file itself: the ceiling
//! for a device that adds nothing. `--direct` opens it O_DIRECT (the disk under the page cache,
//! which Ember's device never bypasses: a reference, not a peer).
//!
//! `blk_bench tsc-hz` measures the TSC rate against CLOCK_MONOTONIC, to turn the guest's RDTSC
//! figures into seconds.
//!
//! Workloads, in order, the same in all three: `seq-read` (the whole image in 1 MiB requests),
//! `seq-write` (the whole image, each request writing the same 1 MiB buffer, which then holds the
//! image's last MiB), `flush` (one flush / fdatasync), `rand-read` (`--rand N` 4 KiB reads at
//! 4 KiB-aligned offsets from an LCG with Knuth's MMIX constants, seed 1). One request in flight.
//! Each prints `blk_bench: WHO PHASE bytes B requests R seconds S`.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ember_devices::virtio::block::{DiskConfig, OverlayConfig, QUEUE_SIZE};
use ember_devices::virtio::{Block, Interrupt, VirtioDevice};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_S_OK, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const REQUEST: usize = 1 << 20;
const BLOCK: usize = 4096;
const SECTOR: u64 = 512;

fn usage() -> ExitCode {
    eprintln!(
        "usage: blk_bench device IMG [--rand N] [--seg BYTES] [--overlay FILE|tmp]\n       \
         blk_bench host IMG [--rand N] [--direct]\n       blk_bench tsc-hz"
    );
    ExitCode::from(2)
}

struct Options {
    image: PathBuf,
    rand: u64,
    seg: u32,
    direct: bool,
    overlay: Option<OverlayConfig>,
}

fn parse(args: &[String]) -> Option<Options> {
    let mut o = Options {
        image: PathBuf::from(args.first()?),
        rand: 10_000,
        seg: 8192,
        direct: false,
        overlay: None,
    };
    let mut it = args[1..].iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--rand" => o.rand = it.next()?.parse().ok()?,
            "--seg" => o.seg = it.next()?.parse().ok()?,
            "--direct" => o.direct = true,
            "--overlay" => {
                o.overlay = Some(match it.next()?.as_str() {
                    "tmp" => OverlayConfig::Tmp,
                    f => OverlayConfig::File(PathBuf::from(f)),
                })
            }
            _ => return None,
        }
    }
    Some(o)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("tsc-hz") => {
            println!("blk_bench: tsc-hz {:.0}", tsc_hz());
            Ok(())
        }
        Some(who @ ("device" | "host")) => {
            let Some(o) = parse(&args[1..]) else {
                return usage();
            };
            if who == "device" {
                device(&o)
            } else {
                host(&o)
            }
        }
        _ => return usage(),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("blk_bench: error: {e}");
            ExitCode::FAILURE
        }
    }
}

type Result<T> = std::result::Result<T, String>;

fn report(who: &str, phase: &str, bytes: u64, requests: u64, t: Duration) {
    println!(
        "blk_bench: {who} {phase} bytes {bytes} requests {requests} seconds {:.6}",
        t.as_secs_f64()
    );
}

/// The random-read sequence shared with the test guest: 4 KiB block numbers.
struct Lcg(u64);

impl Lcg {
    fn next_block(&mut self, blocks: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) % blocks
    }
}

// ---- the host baseline -------------------------------------------------------------------

/// A heap buffer aligned for O_DIRECT.
struct Aligned {
    ptr: *mut u8,
    layout: std::alloc::Layout,
}

impl Aligned {
    fn new(len: usize) -> Self {
        let layout = std::alloc::Layout::from_size_align(len, 4096).unwrap();
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        assert!(!ptr.is_null(), "out of memory");
        Aligned { ptr, layout }
    }

    fn slice(&mut self) -> &mut [u8] {
        // SAFETY: ptr points to layout.size() initialised bytes that only self hands out.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.layout.size()) }
    }
}

impl Drop for Aligned {
    fn drop(&mut self) {
        // SAFETY: allocated in new() with this layout.
        unsafe { std::alloc::dealloc(self.ptr, self.layout) }
    }
}

fn host(o: &Options) -> Result<()> {
    let who = if o.direct { "host-direct" } else { "host" };
    let mut opts = OpenOptions::new();
    opts.read(true).write(true);
    if o.direct {
        opts.custom_flags(libc::O_DIRECT);
    }
    let file: File = opts
        .open(&o.image)
        .map_err(|e| format!("{}: {e}", o.image.display()))?;
    let size = file.metadata().map_err(|e| e.to_string())?.len();
    let mut buf = Aligned::new(REQUEST);
    let buf = buf.slice();
    let io = |e: std::io::Error| format!("{}: {e}", o.image.display());

    let (t, n) = (Instant::now(), size.div_ceil(REQUEST as u64));
    for i in 0..n {
        let off = i * REQUEST as u64;
        let len = (size - off).min(REQUEST as u64) as usize;
        file.read_exact_at(&mut buf[..len], off).map_err(io)?;
    }
    report(who, "seq-read", size, n, t.elapsed());

    let t = Instant::now();
    for i in 0..n {
        let off = i * REQUEST as u64;
        let len = (size - off).min(REQUEST as u64) as usize;
        file.write_all_at(&buf[..len], off).map_err(io)?;
    }
    report(who, "seq-write", size, n, t.elapsed());

    let t = Instant::now();
    file.sync_data().map_err(io)?;
    report(who, "flush", 0, 1, t.elapsed());

    let blocks = size / BLOCK as u64;
    let mut lcg = Lcg(1);
    let t = Instant::now();
    for _ in 0..o.rand {
        let off = lcg.next_block(blocks) * BLOCK as u64;
        file.read_exact_at(&mut buf[..BLOCK], off).map_err(io)?;
    }
    report(who, "rand-read", o.rand * BLOCK as u64, o.rand, t.elapsed());
    Ok(())
}

// ---- the device model, driven directly ----------------------------------------------------

const DESC_TABLE: u64 = 0x1000;
const AVAIL_RING: u64 = 0x2000;
const USED_RING: u64 = 0x3000;
const HEADER: u64 = 0x6000;
const STATUS: u64 = 0x6100;
/// The 1 MiB data buffer, page-aligned like the test guest's.
const DATA: u64 = 0x10_0000;
const MEM_SIZE: usize = 0x40_0000;

/// A split queue in `mem` and the driver's view of it, one chain in flight at a time.
struct Driver {
    mem: GuestMemoryMmap,
    block: Block,
    avail_idx: u16,
    used_idx: u16,
}

impl Driver {
    fn new(image: &std::path::Path, overlay: Option<OverlayConfig>) -> Result<Self> {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE)])
            .map_err(|e| e.to_string())?;
        let mut block = Block::new(&DiskConfig {
            path: image.to_path_buf(),
            readonly: false,
            id: None,
            overlay,
        })
        .map_err(|e| e.to_string())?;
        let mut q = Queue::new(QUEUE_SIZE).map_err(|e| e.to_string())?;
        q.set_size(QUEUE_SIZE);
        q.set_desc_table_address(Some(DESC_TABLE as u32), Some(0));
        q.set_avail_ring_address(Some(AVAIL_RING as u32), Some(0));
        q.set_used_ring_address(Some(USED_RING as u32), Some(0));
        q.set_ready(true);
        if !q.is_valid(&mem) {
            return Err("the queue layout is not valid".into());
        }
        // What the test guest negotiates: no EVENT_IDX, so every completion signals the irqfd.
        let features = (1u64 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_BLK_F_FLUSH);
        let interrupt = Arc::new(Interrupt::new().map_err(|e| e.to_string())?);
        block
            .activate(mem.clone(), vec![q], interrupt, features)
            .map_err(|e| e.to_string())?;
        Ok(Driver {
            mem,
            block,
            avail_idx: 0,
            used_idx: 0,
        })
    }

    fn w<T: vm_memory::ByteValued>(&self, v: T, at: u64) {
        self.mem
            .write_obj(v, GuestAddress(at))
            .expect("the driver's own rings are in guest memory");
    }

    /// Header, `bytes` of DATA in `seg`-byte descriptors, status: NEXT-linked from descriptor 0.
    fn set_chain(&self, data_flags: u16, bytes: usize, seg: usize) {
        let mut descs = vec![(HEADER, 16u32, 0u16)];
        let mut off = 0;
        while off < bytes {
            let len = (bytes - off).min(seg);
            descs.push((DATA + off as u64, len as u32, data_flags));
            off += len;
        }
        descs.push((STATUS, 1, VRING_DESC_F_WRITE as u16));
        let n = descs.len();
        for (i, (addr, len, flags)) in descs.into_iter().enumerate() {
            let at = DESC_TABLE + 16 * i as u64;
            let next = if i + 1 < n {
                VRING_DESC_F_NEXT as u16
            } else {
                0
            };
            self.w(addr.to_le(), at);
            self.w(len.to_le(), at + 8);
            self.w((flags | next).to_le(), at + 12);
            self.w((i as u16 + 1).to_le(), at + 14);
        }
    }

    fn set_header(&self, request_type: u32, sector: u64) {
        self.w(request_type.to_le(), HEADER);
        self.w(0u32, HEADER + 4);
        self.w(sector.to_le(), HEADER + 8);
    }

    /// Makes chain 0 available, lets the device serve it and checks its completion. Returns the
    /// time the device took.
    fn run(&mut self, want_len: u32) -> Result<Duration> {
        self.w(0xffu8, STATUS);
        let slot = AVAIL_RING + 4 + 2 * u64::from(self.avail_idx % QUEUE_SIZE);
        self.w(0u16, slot);
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.w(self.avail_idx.to_le(), AVAIL_RING + 2);
        let t = Instant::now();
        self.block.process_queue(0);
        let took = t.elapsed();
        let r = |at: u64| -> u32 { self.mem.read_obj(GuestAddress(at)).unwrap_or(u32::MAX) };
        let used = u16::from_le(self.mem.read_obj(GuestAddress(USED_RING + 2)).unwrap_or(0));
        if used != self.used_idx.wrapping_add(1) {
            return Err("the device did not complete the request".into());
        }
        let elem = USED_RING + 4 + 8 * u64::from(self.used_idx % QUEUE_SIZE);
        self.used_idx = used;
        let (len, status): (u32, u8) = (
            u32::from_le(r(elem + 4)),
            self.mem.read_obj(GuestAddress(STATUS)).unwrap_or(0xff),
        );
        if status != VIRTIO_BLK_S_OK as u8 || len != want_len {
            return Err(format!(
                "request failed: status {status}, used length {len}"
            ));
        }
        Ok(took)
    }
}

fn device(o: &Options) -> Result<()> {
    let seg = o.seg as usize;
    if seg == 0 || !seg.is_multiple_of(SECTOR as usize) || REQUEST / seg > QUEUE_SIZE as usize - 2 {
        return Err("--seg must be a multiple of 512 that splits 1 MiB into at most 254".into());
    }
    let mut d = Driver::new(&o.image, o.overlay.clone())?;
    let who = if o.overlay.is_some() {
        "device-overlay"
    } else {
        "device"
    };
    let sectors = d.block.disk().sectors();
    let size = sectors * SECTOR;
    let per = REQUEST as u64 / SECTOR;
    let n = sectors.div_ceil(per);

    for (phase, request_type, flags) in [
        ("seq-read", VIRTIO_BLK_T_IN, VRING_DESC_F_WRITE as u16),
        ("seq-write", VIRTIO_BLK_T_OUT, 0),
    ] {
        let mut bytes = REQUEST;
        d.set_chain(flags, bytes, seg);
        let mut t = Duration::ZERO;
        for i in 0..n {
            let sector = i * per;
            if sectors - sector < per {
                bytes = ((sectors - sector) * SECTOR) as usize;
                d.set_chain(flags, bytes, seg);
            }
            d.set_header(request_type, sector);
            let data_to_driver = if request_type == VIRTIO_BLK_T_IN {
                bytes
            } else {
                0
            };
            t += d.run(data_to_driver as u32 + 1)?;
        }
        report(who, phase, size, n, t);
    }

    d.set_chain(0, 0, seg);
    d.set_header(VIRTIO_BLK_T_FLUSH, 0);
    let t = d.run(1)?;
    report(who, "flush", 0, 1, t);

    let blocks = size / BLOCK as u64;
    let mut lcg = Lcg(1);
    d.set_chain(VRING_DESC_F_WRITE as u16, BLOCK, BLOCK);
    let mut t = Duration::ZERO;
    for _ in 0..o.rand {
        let sector = lcg.next_block(blocks) * (BLOCK as u64 / SECTOR);
        d.set_header(VIRTIO_BLK_T_IN, sector);
        t += d.run(BLOCK as u32 + 1)?;
    }
    report(who, "rand-read", o.rand * BLOCK as u64, o.rand, t);
    Ok(())
}

// ---- the TSC rate -------------------------------------------------------------------------

fn tsc_hz() -> f64 {
    // SAFETY: RDTSC has no preconditions on x86_64.
    let tsc = || unsafe { core::arch::x86_64::_rdtsc() };
    let (t0, c0) = (Instant::now(), tsc());
    std::thread::sleep(Duration::from_millis(200));
    let (t1, c1) = (Instant::now(), tsc());
    (c1 - c0) as f64 / (t1 - t0).as_secs_f64()
}
