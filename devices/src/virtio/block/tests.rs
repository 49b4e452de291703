//! The device model driven the way a driver would: descriptor chains written into guest memory,
//! the queue notified, the used ring and status bytes read back. Every hostile chain must get an
//! error status (or be returned unanswered) and leave the device serving later requests.

use std::os::unix::fs::FileExt;
use std::sync::Arc;

use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{
    VIRTIO_RING_F_EVENT_IDX, VRING_AVAIL_F_NO_INTERRUPT, VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT,
    VRING_DESC_F_WRITE,
};
use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::tempfile::TempFile;

use super::*;
use crate::virtio::{Interrupt, VirtioDevice, VIRTIO_MMIO_INT_VRING};

const MEM_SIZE: usize = 0x10_0000;
const QSIZE: u16 = 16;
const HDR: u64 = 0x8000;
const STATUS: u64 = 0x9000;
const DATA: u64 = 0x1_0000;
const OUTSIDE: u64 = 0x40_0000;
const R: u16 = 0;
const W: u16 = VRING_DESC_F_WRITE as u16;
const IMAGE_SECTORS: u64 = 64;
const ALL_FEATURES: u64 = (1 << VIRTIO_F_VERSION_1)
    | (1 << VIRTIO_BLK_F_FLUSH)
    | (1 << VIRTIO_BLK_F_DISCARD)
    | (1 << VIRTIO_BLK_F_WRITE_ZEROES);

struct Driver {
    mem: GuestMemoryMmap,
    /// The image of a plain disk; None over an overlay, whose files the test keeps.
    image: Option<TempFile>,
    block: Block,
    interrupt: Arc<Interrupt>,
    rings: Rings,
    avail_idx: u16,
    used_seen: u16,
    next_desc: u16,
}

/// Where the split queue's parts are. (virtio-queue's MockSplitQueue is not used: it places the
/// used ring over the second half of the available ring.)
#[derive(Clone, Copy)]
struct Rings {
    desc: u64,
    avail: u64,
    used: u64,
}

impl Rings {
    fn avail_slot(&self, i: u16) -> GuestAddress {
        GuestAddress(self.avail + 4 + 2 * u64::from(i % QSIZE))
    }
    fn avail_idx(&self) -> GuestAddress {
        GuestAddress(self.avail + 2)
    }
    fn used_event(&self) -> GuestAddress {
        GuestAddress(self.avail + 4 + 2 * u64::from(QSIZE))
    }
    fn used_idx(&self) -> GuestAddress {
        GuestAddress(self.used + 2)
    }
    fn used_elem(&self, i: u16) -> GuestAddress {
        GuestAddress(self.used + 4 + 8 * u64::from(i % QSIZE))
    }
}

/// A queue as the transport hands it over, with the rings zeroed as a driver starts them.
fn new_queue(mem: &GuestMemoryMmap) -> (Queue, Rings) {
    let rings = Rings {
        desc: 0x1000,
        avail: 0x2000,
        used: 0x3000,
    };
    mem.write_slice(&[0u8; 0x3000], GuestAddress(0x1000))
        .unwrap();
    let mut q = Queue::new(QSIZE).unwrap();
    q.set_size(QSIZE);
    q.set_desc_table_address(Some(rings.desc as u32), Some(0));
    q.set_avail_ring_address(Some(rings.avail as u32), Some(0));
    q.set_used_ring_address(Some(rings.used as u32), Some(0));
    q.set_ready(true);
    assert!(q.is_valid(mem));
    (q, rings)
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 9) as u8)
        .collect()
}

fn image(sectors: u64) -> TempFile {
    let t = TempFile::new_with_prefix("/tmp/ember-blk-dev").unwrap();
    t.as_file()
        .write_all_at(&pattern((sectors * 512) as usize, 7), 0)
        .unwrap();
    t
}

impl Driver {
    fn new(readonly: bool, id: Option<&str>, features: u64) -> Self {
        let image = image(IMAGE_SECTORS);
        Self::with_image(image, readonly, id, features)
    }

    fn with_image(image: TempFile, readonly: bool, id: Option<&str>, features: u64) -> Self {
        Self::with_memory(
            image,
            &[(GuestAddress(0), MEM_SIZE)],
            readonly,
            id,
            features,
        )
    }

    /// Guest RAM made of `ranges`; the first must hold the rings, HDR, STATUS and DATA.
    fn with_memory(
        image: TempFile,
        ranges: &[(GuestAddress, usize)],
        readonly: bool,
        id: Option<&str>,
        features: u64,
    ) -> Self {
        let config = DiskConfig {
            path: image.as_path().to_path_buf(),
            readonly,
            id: id.map(String::from),
            overlay: None,
        };
        Self::with_config(Some(image), ranges, &config, features)
    }

    /// A copy-on-write disk: `base` under `overlay`.
    fn over(base: &std::path::Path, overlay: OverlayConfig) -> Self {
        let config = DiskConfig {
            path: base.to_path_buf(),
            readonly: false,
            id: None,
            overlay: Some(overlay),
        };
        Self::with_config(None, &[(GuestAddress(0), MEM_SIZE)], &config, ALL_FEATURES)
    }

    fn with_config(
        image: Option<TempFile>,
        ranges: &[(GuestAddress, usize)],
        config: &DiskConfig,
        features: u64,
    ) -> Self {
        let mem = GuestMemoryMmap::<()>::from_ranges(ranges).unwrap();
        let mut block = Block::new(config).unwrap();
        let interrupt = Arc::new(Interrupt::new().unwrap());
        let (mut queue, rings) = new_queue(&mem);
        queue.set_event_idx(features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0);
        block
            .activate(mem.clone(), vec![queue], interrupt.clone(), features)
            .unwrap();
        Driver {
            mem,
            image,
            block,
            interrupt,
            rings,
            avail_idx: 0,
            used_seen: 0,
            next_desc: 0,
        }
    }

    fn store_desc(&self, index: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let raw = RawDescriptor::from(Descriptor::new(addr, len, flags, next));
        let at = GuestAddress(self.rings.desc + 16 * u64::from(index));
        self.mem.write_obj(raw, at).unwrap();
    }

    fn set_avail_idx(&self, idx: u16) {
        self.mem
            .write_obj(u16::to_le(idx), self.rings.avail_idx())
            .unwrap();
    }

    fn make_available(&mut self, head: u16) {
        self.mem
            .write_obj(u16::to_le(head), self.rings.avail_slot(self.avail_idx))
            .unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.set_avail_idx(self.avail_idx);
    }

    /// Writes `descs` (addr, len, flags) as one chain, NEXT-linked in order, and makes it available.
    fn push_chain(&mut self, descs: &[(u64, u32, u16)]) -> u16 {
        let head = self.next_desc;
        for (i, &(addr, len, flags)) in descs.iter().enumerate() {
            let index = (head + i as u16) % QSIZE;
            let last = i + 1 == descs.len();
            let flags = if last {
                flags
            } else {
                flags | VRING_DESC_F_NEXT as u16
            };
            self.store_desc(index, addr, len, flags, (index + 1) % QSIZE);
        }
        self.next_desc = (head + descs.len() as u16) % QSIZE;
        self.make_available(head);
        head
    }

    fn header(&self, addr: u64, request_type: u32, sector: u64) {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&request_type.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        self.mem.write_slice(&h, GuestAddress(addr)).unwrap();
    }

    /// Processes the queue and returns the next used element: (head, len).
    fn complete(&mut self) -> (u32, u32) {
        self.block.process_queue(0);
        self.next_used()
            .expect("the chain was not returned to the used ring")
    }

    fn next_used(&mut self) -> Option<(u32, u32)> {
        let used_idx = u16::from_le(self.mem.read_obj(self.rings.used_idx()).unwrap());
        if used_idx == self.used_seen {
            return None;
        }
        let at = self.rings.used_elem(self.used_seen);
        let id: u32 = self.mem.read_obj(at).unwrap();
        let len: u32 = self.mem.read_obj(at.unchecked_add(4)).unwrap();
        self.used_seen = self.used_seen.wrapping_add(1);
        Some((u32::from_le(id), u32::from_le(len)))
    }

    fn status(&self) -> u8 {
        self.mem.read_obj(GuestAddress(STATUS)).unwrap()
    }

    /// A request with a header at HDR, `data` in between and the status byte at STATUS.
    /// Returns (status, used length).
    fn request(&mut self, request_type: u32, sector: u64, data: &[(u64, u32, u16)]) -> (u8, u32) {
        self.header(HDR, request_type, sector);
        self.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
        let mut chain = vec![(HDR, 16, R)];
        chain.extend_from_slice(data);
        chain.push((STATUS, 1, W));
        let head = self.push_chain(&chain);
        let (id, len) = self.complete();
        assert_eq!(id, u32::from(head));
        (self.status(), len)
    }

    fn file_bytes(&self, offset: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.image()
            .as_file()
            .read_exact_at(&mut v, offset)
            .unwrap();
        v
    }

    fn image(&self) -> &TempFile {
        self.image.as_ref().expect("a plain disk's driver")
    }

    fn guest_bytes(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
        v
    }

    /// A valid one-sector read still works after whatever came before.
    fn assert_still_serving(&mut self) {
        self.mem
            .write_slice(&[0u8; 512], GuestAddress(DATA + 0x4000))
            .unwrap();
        let (status, len) = self.request(VIRTIO_BLK_T_IN, 5, &[(DATA + 0x4000, 512, W)]);
        assert_eq!((status, len), (VIRTIO_BLK_S_OK as u8, 513));
        assert_eq!(
            self.guest_bytes(DATA + 0x4000, 512),
            self.file_bytes(5 * 512, 512)
        );
    }
}

/// (address, length, flags) of each descriptor, in chain order.
type Chain = Vec<(u64, u32, u16)>;

const OK: u8 = VIRTIO_BLK_S_OK as u8;
const IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
const UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;

#[test]
fn offers_flush_seg_max_discard_and_reports_capacity() {
    let d = Driver::new(false, None, ALL_FEATURES);
    let f = d.block.features();
    for bit in [
        VIRTIO_F_VERSION_1,
        VIRTIO_BLK_F_FLUSH,
        VIRTIO_BLK_F_SEG_MAX,
        VIRTIO_BLK_F_DISCARD,
        VIRTIO_BLK_F_WRITE_ZEROES,
        VIRTIO_RING_F_EVENT_IDX,
    ] {
        assert_ne!(f & (1 << bit), 0, "feature {bit} not offered");
    }
    assert_eq!(f & (1 << VIRTIO_BLK_F_RO), 0);
    let mut cap = [0u8; 8];
    d.block.read_config(0, &mut cap);
    assert_eq!(u64::from_le_bytes(cap), IMAGE_SECTORS);
    let mut seg_max = [0u8; 4];
    d.block.read_config(12, &mut seg_max);
    assert_eq!(u32::from_le_bytes(seg_max), u32::from(QUEUE_SIZE) - 2);
    // DISCARD and WRITE_ZEROES are capped at 32 MiB a request (virtio 1.2 5.2.4 offsets).
    for offset in [36u64, 48] {
        let mut max = [0u8; 4];
        d.block.read_config(offset, &mut max);
        assert_eq!(u32::from_le_bytes(max), 1 << 16, "config offset {offset}");
    }
    // Past the end of the config space reads as zero rather than failing.
    let mut far = [0xaau8; 4];
    d.block.read_config(0xefc, &mut far);
    assert_eq!(far, [0; 4]);
}

#[test]
fn multi_segment_read_returns_the_image_bytes() {
    let mut d = Driver::new(false, None, ALL_FEATURES);
    let (status, len) = d.request(
        VIRTIO_BLK_T_IN,
        3,
        &[
            (DATA, 1024, W),
            (DATA + 0x2000, 512, W),
            (DATA + 0x3000, 1536, W),
        ],
    );
    assert_eq!(status, OK);
    assert_eq!(len, 3072 + 1);
    let want = d.file_bytes(3 * 512, 3072);
    assert_eq!(d.guest_bytes(DATA, 1024), want[..1024]);
    assert_eq!(d.guest_bytes(DATA + 0x2000, 512), want[1024..1536]);
    assert_eq!(d.guest_bytes(DATA + 0x3000, 1536), want[1536..]);
    assert_ne!(d.interrupt.status() & VIRTIO_MMIO_INT_VRING, 0);
    assert_eq!(d.interrupt.eventfd().read().unwrap(), 1);
}

/// One segment over hundreds of guest memory regions: the device moves it piece by piece, more
/// pieces than it hands the kernel in one preadv/pwritev, and every byte lands where it belongs.
#[test]
fn a_segment_across_many_memory_regions_reads_and_writes_every_byte() {
    const REGIONS: u64 = 300;
    const PIECE: u64 = 0x1000;
    let sectors = 4096;
    let mut ranges = vec![(GuestAddress(0), MEM_SIZE)];
    ranges
        .extend((0..REGIONS).map(|i| (GuestAddress(MEM_SIZE as u64 + i * PIECE), PIECE as usize)));
    let mut d = Driver::with_memory(image(sectors), &ranges, false, None, ALL_FEATURES);
    // Starts inside the first small region and ends inside the last one.
    let addr = MEM_SIZE as u64 + 0x200;
    let len = (REGIONS - 1) * PIECE;
    let (status, used) = d.request(VIRTIO_BLK_T_IN, 8, &[(addr, len as u32, W)]);
    assert_eq!((status, used), (OK, len as u32 + 1));
    assert_eq!(
        d.guest_bytes(addr, len as usize),
        d.file_bytes(8 * 512, len as usize)
    );

    let data = pattern(len as usize, 42);
    d.mem.write_slice(&data, GuestAddress(addr)).unwrap();
    let (status, used) = d.request(VIRTIO_BLK_T_OUT, 1000, &[(addr, len as u32, R)]);
    assert_eq!((status, used), (OK, 1));
    assert_eq!(d.file_bytes(1000 * 512, len as usize), data);
    assert_eq!(
        d.file_bytes(999 * 512, 512),
        pattern((sectors * 512) as usize, 7)[999 * 512..1000 * 512],
        "the sector before the write"
    );
}

/// Another process truncating the image under a running VM: the read comes up short, and the
/// driver gets an I/O error rather than a success with stale bytes.
#[test]
fn the_image_shrinking_under_a_read_is_an_io_error() {
    let mut d = Driver::new(false, None, ALL_FEATURES);
    d.image().as_file().set_len(40 * 512 + 256).unwrap();
    let (status, used) = d.request(
        VIRTIO_BLK_T_IN,
        36,
        &[(DATA, 2048, W), (DATA + 0x1000, 2048, W)],
    );
    assert_eq!((status, used), (IOERR, 1));
    d.assert_still_serving();
}

#[test]
fn write_lands_in_the_image_and_flush_completes() {
    let mut d = Driver::new(false, None, ALL_FEATURES);
    let data = pattern(1536, 99);
    d.mem.write_slice(&data[..512], GuestAddress(DATA)).unwrap();
    d.mem
        .write_slice(&data[512..], GuestAddress(DATA + 0x1000))
        .unwrap();
    let (status, len) = d.request(
        VIRTIO_BLK_T_OUT,
        10,
        &[(DATA, 512, R), (DATA + 0x1000, 1024, R)],
    );
    assert_eq!((status, len), (OK, 1));
    assert_eq!(d.file_bytes(10 * 512, 1536), data);
    // Neighbouring sectors are untouched.
    assert_eq!(
        d.file_bytes(9 * 512, 512),
        pattern(64 * 512, 7)[9 * 512..10 * 512]
    );
    assert_eq!(d.request(VIRTIO_BLK_T_FLUSH, 0, &[]), (OK, 1));
}

#[test]
fn the_last_sector_is_reachable_and_one_past_it_is_not() {
    let mut d = Driver::new(false, None, ALL_FEATURES);
    let (status, _) = d.request(VIRTIO_BLK_T_IN, IMAGE_SECTORS - 1, &[(DATA, 512, W)]);
    assert_eq!(status, OK);
    let (status, len) = d.request(VIRTIO_BLK_T_IN, IMAGE_SECTORS - 1, &[(DATA, 1024, W)]);
    assert_eq!((status, len), (IOERR, 1));
    let (status, _) = d.request(VIRTIO_BLK_T_OUT, IMAGE_SECTORS, &[(DATA, 512, R)]);
    assert_eq!(status, IOERR);
    // sector + count overflowing u64 is past the end too.
    let (status, _) = d.request(VIRTIO_BLK_T_IN, u64::MAX, &[(DATA, 512, W)]);
    assert_eq!(status, IOERR);
    d.assert_still_serving();
}

#[test]
fn get_id_returns_the_file_name_or_the_given_id() {
    let mut d = Driver::new(false, None, ALL_FEATURES);
    let (status, len) = d.request(VIRTIO_BLK_T_GET_ID, 0, &[(DATA, 20, W)]);
    assert_eq!((status, len), (OK, 21));
    let name = d.image().as_path().file_name().unwrap().as_encoded_bytes();
    let n = name.len().min(20);
    assert_eq!(d.guest_bytes(DATA, n), name[..n]);

    let mut d = Driver::new(false, Some("scratch"), ALL_FEATURES);
    d.mem.write_slice(&[0xee; 20], GuestAddress(DATA)).unwrap();
    assert_eq!(d.request(VIRTIO_BLK_T_GET_ID, 0, &[(DATA, 20, W)]).0, OK);
    assert_eq!(
        d.guest_bytes(DATA, 20),
        b"scratch\0\0\0\0\0\0\0\0\0\0\0\0\0"
    );
}

fn discard_segment(d: &Driver, addr: u64, sector: u64, sectors: u32, flags: u32) {
    let mut s = [0u8; 16];
    s[0..8].copy_from_slice(&sector.to_le_bytes());
    s[8..12].copy_from_slice(&sectors.to_le_bytes());
    s[12..16].copy_from_slice(&flags.to_le_bytes());
    d.mem.write_slice(&s, GuestAddress(addr)).unwrap();
}

#[test]
fn discard_and_write_zeroes_read_back_as_zeros() {
    let mut d = Driver::new(false, None, ALL_FEATURES);
    let size = d.image().as_file().metadata().unwrap().len();
    discard_segment(&d, DATA, 8, 4, 0);
    assert_eq!(
        d.request(VIRTIO_BLK_T_DISCARD, 0, &[(DATA, 16, R)]),
        (OK, 1)
    );
    assert_eq!(d.file_bytes(8 * 512, 4 * 512), vec![0u8; 2048]);
    assert_ne!(d.file_bytes(12 * 512, 512), vec![0u8; 512]);

    discard_segment(&d, DATA, 20, 2, 0);
    assert_eq!(
        d.request(VIRTIO_BLK_T_WRITE_ZEROES, 0, &[(DATA, 16, R)]).0,
        OK
    );
    assert_eq!(d.file_bytes(20 * 512, 1024), vec![0u8; 1024]);
    discard_segment(&d, DATA, 30, 1, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP);
    assert_eq!(
        d.request(VIRTIO_BLK_T_WRITE_ZEROES, 0, &[(DATA, 16, R)]).0,
        OK
    );
    assert_eq!(d.file_bytes(30 * 512, 512), vec![0u8; 512]);
    assert_eq!(d.image().as_file().metadata().unwrap().len(), size);

    // Discard with UNMAP is undefined by the spec: unsupported. Past the end: an I/O error.
    discard_segment(&d, DATA, 0, 1, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP);
    assert_eq!(
        d.request(VIRTIO_BLK_T_DISCARD, 0, &[(DATA, 16, R)]).0,
        UNSUPP
    );
    discard_segment(&d, DATA, IMAGE_SECTORS - 1, 2, 0);
    assert_eq!(
        d.request(VIRTIO_BLK_T_DISCARD, 0, &[(DATA, 16, R)]).0,
        IOERR
    );
    // Two segments where max_discard_seg is 1.
    discard_segment(&d, DATA + 16, 1, 1, 0);
    assert_eq!(
        d.request(VIRTIO_BLK_T_DISCARD, 0, &[(DATA, 32, R)]).0,
        IOERR
    );
    d.assert_still_serving();
}

#[test]
fn zero_sector_discard_and_write_zeroes_succeed_and_change_nothing() {
    let mut d = Driver::new(false, None, ALL_FEATURES);
    let before = d.file_bytes(0, (IMAGE_SECTORS * 512) as usize);
    // Anywhere on the disk, the end included, with or without UNMAP.
    for (request_type, sector, flags) in [
        (VIRTIO_BLK_T_DISCARD, 3, 0),
        (VIRTIO_BLK_T_DISCARD, IMAGE_SECTORS, 0),
        (VIRTIO_BLK_T_WRITE_ZEROES, 3, 0),
        (
            VIRTIO_BLK_T_WRITE_ZEROES,
            3,
            VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
        ),
        (VIRTIO_BLK_T_WRITE_ZEROES, IMAGE_SECTORS, 0),
    ] {
        discard_segment(&d, DATA, sector, 0, flags);
        assert_eq!(
            d.request(request_type, 0, &[(DATA, 16, R)]),
            (OK, 1),
            "type {request_type} at sector {sector} flags {flags}"
        );
    }
    assert_eq!(d.file_bytes(0, before.len()), before);
    // Past the end is still an error, even for nothing.
    discard_segment(&d, DATA, IMAGE_SECTORS + 1, 0, 0);
    assert_eq!(
        d.request(VIRTIO_BLK_T_DISCARD, 0, &[(DATA, 16, R)]).0,
        IOERR
    );
}

#[test]
fn discard_is_unsupported_unless_negotiated() {
    let mut d = Driver::new(false, None, 1 << VIRTIO_F_VERSION_1);
    discard_segment(&d, DATA, 8, 4, 0);
    assert_eq!(
        d.request(VIRTIO_BLK_T_DISCARD, 0, &[(DATA, 16, R)]).0,
        UNSUPP
    );
    assert_ne!(d.file_bytes(8 * 512, 512), vec![0u8; 512]);
}

#[test]
fn read_only_disk_refuses_writes_and_keeps_its_bytes() {
    let mut d = Driver::new(true, None, 1 << VIRTIO_F_VERSION_1);
    assert_ne!(d.block.features() & (1 << VIRTIO_BLK_F_RO), 0);
    assert_eq!(d.block.features() & (1 << VIRTIO_BLK_F_DISCARD), 0);
    let before = d.file_bytes(0, (IMAGE_SECTORS * 512) as usize);
    d.mem.write_slice(&[0x55; 512], GuestAddress(DATA)).unwrap();
    assert_eq!(
        d.request(VIRTIO_BLK_T_OUT, 0, &[(DATA, 512, R)]),
        (IOERR, 1)
    );
    discard_segment(&d, DATA, 0, 1, 0);
    assert_eq!(
        d.request(VIRTIO_BLK_T_DISCARD, 0, &[(DATA, 16, R)]).0,
        UNSUPP
    );
    assert_eq!(
        d.request(VIRTIO_BLK_T_WRITE_ZEROES, 0, &[(DATA, 16, R)]).0,
        UNSUPP
    );
    assert_eq!(d.request(VIRTIO_BLK_T_FLUSH, 0, &[]).0, OK);
    assert_eq!(d.file_bytes(0, (IMAGE_SECTORS * 512) as usize), before);
    d.assert_still_serving();
}

#[test]
fn header_and_data_may_be_split_anywhere() {
    // Spec 2.6.4: the device may not assume how bytes are split into descriptors.
    let mut d = Driver::new(false, None, ALL_FEATURES);
    d.header(HDR, VIRTIO_BLK_T_IN, 2);
    d.mem.write_obj(0xffu8, GuestAddress(STATUS + 511)).unwrap();
    let head = d.push_chain(&[
        (HDR, 10, R),
        (HDR + 10, 6, R),
        (DATA, 300, W),
        // The second buffer carries the rest of the sector and then the status byte.
        (STATUS, 213, W),
    ]);
    let (id, len) = d.complete();
    assert_eq!((id, len), (u32::from(head), 513));
    let want = d.file_bytes(2 * 512, 512);
    assert_eq!(d.guest_bytes(DATA, 300), want[..300]);
    assert_eq!(d.guest_bytes(STATUS, 212), want[300..]);
    assert_eq!(
        d.mem.read_obj::<u8>(GuestAddress(STATUS + 212)).unwrap(),
        OK
    );
}

#[test]
fn hostile_chains_get_error_status_and_the_device_keeps_serving() {
    let mut d = Driver::new(false, None, ALL_FEATURES);
    let image_before = d.file_bytes(0, (IMAGE_SECTORS * 512) as usize);
    let hostile: Vec<(&str, u32, u64, Chain, u8)> = vec![
        (
            "data outside guest memory",
            VIRTIO_BLK_T_IN,
            0,
            vec![(OUTSIDE, 512, W)],
            IOERR,
        ),
        (
            "data straddling the end of guest memory",
            VIRTIO_BLK_T_IN,
            0,
            vec![(MEM_SIZE as u64 - 256, 512, W)],
            IOERR,
        ),
        (
            "read-only buffer for a read",
            VIRTIO_BLK_T_IN,
            0,
            vec![(DATA, 512, R)],
            IOERR,
        ),
        (
            "writable buffer for a write",
            VIRTIO_BLK_T_OUT,
            0,
            vec![(DATA, 512, W)],
            IOERR,
        ),
        (
            "absurd length",
            VIRTIO_BLK_T_IN,
            0,
            vec![(DATA, 0xffff_fe00, W)],
            IOERR,
        ),
        (
            "sector past the end",
            VIRTIO_BLK_T_IN,
            IMAGE_SECTORS,
            vec![(DATA, 512, W)],
            IOERR,
        ),
        (
            "length not a multiple of 512",
            VIRTIO_BLK_T_IN,
            0,
            vec![(DATA, 500, W)],
            IOERR,
        ),
        (
            "write of 100 bytes",
            VIRTIO_BLK_T_OUT,
            0,
            vec![(DATA, 100, R)],
            IOERR,
        ),
        ("unknown request type", 0x77, 0, vec![], UNSUPP),
        (
            "flush carrying data",
            VIRTIO_BLK_T_FLUSH,
            0,
            vec![(DATA, 512, R)],
            IOERR,
        ),
        (
            "get-id with a read-only buffer",
            VIRTIO_BLK_T_GET_ID,
            0,
            vec![(DATA, 20, R)],
            IOERR,
        ),
    ];
    for (what, t, sector, data, want) in hostile {
        let (status, len) = d.request(t, sector, &data);
        assert_eq!((status, len), (want, 1), "{what}");
    }
    assert_eq!(d.file_bytes(0, image_before.len()), image_before);
    d.assert_still_serving();
}

#[test]
fn malformed_framing_gets_an_error_status() {
    let mut d = Driver::new(false, None, ALL_FEATURES);
    let cases: Vec<(&str, Chain)> = vec![
        (
            "device-writable header",
            vec![(HDR, 16, W), (DATA, 512, W), (STATUS, 1, W)],
        ),
        (
            "short header",
            vec![(HDR, 8, R), (DATA, 512, W), (STATUS, 1, W)],
        ),
        (
            "header outside memory",
            vec![(OUTSIDE, 16, R), (STATUS, 1, W)],
        ),
        (
            "readable descriptor after a writable one",
            vec![
                (HDR, 16, R),
                (DATA, 512, W),
                (DATA + 0x1000, 512, R),
                (STATUS, 1, W),
            ],
        ),
        (
            "header length wrapping the address space",
            vec![(u64::MAX - 7, 16, R), (STATUS, 1, W)],
        ),
    ];
    for (what, chain) in cases {
        d.header(HDR, VIRTIO_BLK_T_IN, 0);
        d.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
        let head = d.push_chain(&chain);
        let (id, len) = d.complete();
        assert_eq!(id, u32::from(head), "{what}");
        assert_eq!((d.status(), len), (IOERR, 1), "{what}");
    }
    d.assert_still_serving();
}

#[test]
fn chains_without_a_usable_status_byte_are_returned_unanswered() {
    let mut d = Driver::new(false, None, ALL_FEATURES);
    let cases: Vec<(&str, Chain)> = vec![
        (
            "read-only status",
            vec![(HDR, 16, R), (DATA, 512, W), (STATUS, 1, R)],
        ),
        (
            "empty status descriptor",
            vec![(HDR, 16, R), (DATA, 512, W), (STATUS, 0, W)],
        ),
        (
            "status outside memory",
            vec![(HDR, 16, R), (DATA, 512, W), (OUTSIDE, 1, W)],
        ),
        ("header only", vec![(HDR, 16, R)]),
    ];
    for (what, chain) in cases {
        d.header(HDR, VIRTIO_BLK_T_IN, 0);
        d.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
        d.mem.write_slice(&[0xcc; 512], GuestAddress(DATA)).unwrap();
        let head = d.push_chain(&chain);
        let (id, len) = d.complete();
        assert_eq!((id, len), (u32::from(head), 0), "{what}");
        assert_eq!(d.status(), 0xff, "{what}: status byte written");
        assert_eq!(
            d.guest_bytes(DATA, 512),
            vec![0xcc; 512],
            "{what}: data moved"
        );
    }
    d.assert_still_serving();
}

#[test]
fn chain_loops_and_bad_next_indices_are_returned_unanswered() {
    let mut d = Driver::new(false, None, ALL_FEATURES);
    d.header(HDR, VIRTIO_BLK_T_IN, 0);
    // 0 -> 1 -> 2 -> 1 -> ...
    let next = VRING_DESC_F_NEXT as u16;
    d.store_desc(0, HDR, 16, R | next, 1);
    d.store_desc(1, DATA, 512, W | next, 2);
    d.store_desc(2, STATUS, 1, W | next, 1);
    d.make_available(0);
    assert_eq!(d.complete(), (0, 0));
    // A next index outside the descriptor table.
    d.store_desc(3, HDR, 16, R | next, QSIZE + 3);
    d.make_available(3);
    assert_eq!(d.complete(), (3, 0));
    // A chain of the whole table whose last descriptor still says NEXT.
    for i in 0..QSIZE {
        d.store_desc(i, DATA, 512, W | next, (i + 1) % QSIZE);
    }
    d.make_available(5);
    assert_eq!(d.complete(), (5, 0));
    d.next_desc = 0;
    d.assert_still_serving();
}

#[test]
fn indirect_tables_are_followed_safely() {
    let mut d = Driver::new(false, None, ALL_FEATURES);
    // A well-formed indirect request works (the driver never got the feature, but following the
    // table is harmless and is what the descriptors say).
    let table = 0x2_0000u64;
    let next = VRING_DESC_F_NEXT as u16;
    d.header(HDR, VIRTIO_BLK_T_IN, 1);
    for (i, (addr, len, flags)) in [(HDR, 16, R | next), (DATA, 512, W | next), (STATUS, 1, W)]
        .into_iter()
        .enumerate()
    {
        let raw = RawDescriptor::from(Descriptor::new(addr, len, flags, i as u16 + 1));
        d.mem
            .write_obj(raw, GuestAddress(table + 16 * i as u64))
            .unwrap();
    }
    d.store_desc(0, table, 48, VRING_DESC_F_INDIRECT as u16, 0);
    d.make_available(0);
    assert_eq!(d.complete(), (0, 513));
    assert_eq!(d.status(), OK);
    // A table outside memory, one of odd length, and an empty one: returned unanswered.
    for (i, (addr, len)) in [(OUTSIDE, 48u32), (table, 47), (table, 0)]
        .into_iter()
        .enumerate()
    {
        let i = i as u16 + 1;
        d.store_desc(i, addr, len, VRING_DESC_F_INDIRECT as u16, 0);
        d.make_available(i);
        assert_eq!(d.complete(), (u32::from(i), 0));
    }
    d.next_desc = 4;
    d.assert_still_serving();
}

#[test]
fn avail_entries_that_are_not_descriptors_are_skipped() {
    let mut d = Driver::new(false, None, ALL_FEATURES);
    d.make_available(QSIZE + 100);
    d.block.process_queue(0);
    assert_eq!(d.next_used(), None);
    d.assert_still_serving();
}

#[test]
fn a_corrupt_avail_index_stops_the_queue_until_reset() {
    let mut d = Driver::new(false, None, ALL_FEATURES);
    // The driver claims more new entries than the queue holds.
    d.set_avail_idx(QSIZE + 1);
    d.block.process_queue(0);
    assert_eq!(d.next_used(), None);
    // Broken: even a sane index is not served any more.
    d.set_avail_idx(0);
    d.avail_idx = 0;
    d.header(HDR, VIRTIO_BLK_T_FLUSH, 0);
    d.push_chain(&[(HDR, 16, R), (STATUS, 1, W)]);
    d.block.process_queue(0);
    assert_eq!(d.next_used(), None);

    d.block.reset();
    assert!(!d.block.is_active());
    d.block.process_queue(0);
    // A fresh queue, as the transport builds one after the driver sets it up again.
    let (queue, _) = new_queue(&d.mem);
    d.block
        .activate(
            d.mem.clone(),
            vec![queue],
            d.interrupt.clone(),
            ALL_FEATURES,
        )
        .unwrap();
    (d.avail_idx, d.used_seen, d.next_desc) = (0, 0, 0);
    d.assert_still_serving();
}

#[test]
fn breaking_the_queue_after_every_reset_cannot_flood_the_log() {
    crate::test_log::start();
    let mut d = Driver::new(false, None, ALL_FEATURES);
    for _ in 0..50 {
        d.set_avail_idx(QSIZE + 1);
        d.block.process_queue(0);
        d.block.reset();
        let (queue, _) = new_queue(&d.mem);
        d.block
            .activate(
                d.mem.clone(),
                vec![queue],
                d.interrupt.clone(),
                ALL_FEATURES,
            )
            .unwrap();
    }
    let logged = crate::test_log::warnings();
    assert!(
        !logged.is_empty() && logged.len() <= crate::guest_log::GuestLog::LIMIT as usize,
        "{logged:#?}"
    );
    (d.avail_idx, d.used_seen, d.next_desc) = (0, 0, 0);
    d.assert_still_serving();
}

#[test]
fn event_idx_suppresses_interrupts_the_driver_did_not_ask_for() {
    let mut d = Driver::new(false, None, ALL_FEATURES | (1 << VIRTIO_RING_F_EVENT_IDX));
    // used_event (after the avail ring) = 1: interrupt only once the second entry is used.
    d.mem
        .write_obj(u16::to_le(1), d.rings.used_event())
        .unwrap();
    d.request(VIRTIO_BLK_T_FLUSH, 0, &[]);
    assert!(
        d.interrupt.eventfd().read().is_err(),
        "interrupt for entry 0"
    );
    d.request(VIRTIO_BLK_T_FLUSH, 0, &[]);
    assert_eq!(d.interrupt.eventfd().read().unwrap(), 1);
}

#[test]
fn without_event_idx_no_interrupt_is_honoured() {
    let mut d = Driver::new(false, None, ALL_FEATURES);
    let flags = GuestAddress(d.rings.avail);
    d.mem
        .write_obj(u16::to_le(VRING_AVAIL_F_NO_INTERRUPT as u16), flags)
        .unwrap();
    assert_eq!(d.request(VIRTIO_BLK_T_FLUSH, 0, &[]).0, OK);
    assert!(
        d.interrupt.eventfd().read().is_err(),
        "interrupt while polling"
    );
    d.mem.write_obj(0u16, flags).unwrap();
    assert_eq!(d.request(VIRTIO_BLK_T_FLUSH, 0, &[]).0, OK);
    assert_eq!(d.interrupt.eventfd().read().unwrap(), 1);
}

#[test]
fn inactive_or_reset_device_serves_nothing() {
    let mut d = Driver::new(false, None, ALL_FEATURES);
    d.block.reset();
    d.header(HDR, VIRTIO_BLK_T_FLUSH, 0);
    d.push_chain(&[(HDR, 16, R), (STATUS, 1, W)]);
    d.block.process_queue(0);
    assert_eq!(d.next_used(), None);
    // Unknown queue indices are ignored too.
    d.block.process_queue(7);
}

/// A full queue is served a bounded turn at a time, the request side let go in between (a reset
/// waits for one turn, not for the whole queue); every request is served in the end.
#[test]
fn a_full_queue_is_served_a_bounded_turn_at_a_time() {
    let mut d = Driver::new(false, None, ALL_FEATURES);
    d.header(HDR, VIRTIO_BLK_T_FLUSH, 0);
    for _ in 0..6 {
        d.push_chain(&[(HDR, 16, R), (STATUS, 1, W)]);
    }
    let server = d.block.queue_server();
    assert!(server.serve(0), "more than a turn's worth was available");
    let mut served = 0;
    while d.next_used().is_some() {
        served += 1;
    }
    assert_eq!(served, 4, "one turn");
    d.block.process_queue(0);
    while d.next_used().is_some() {
        served += 1;
    }
    assert_eq!(served, 6);
    assert!(!server.serve(0), "nothing left");
}

/// A read-only disk with its own id: the restored device opens the same image the same way and
/// shows the guest the same features and config space.
#[test]
fn block_state_round_trips_and_refuses_features_the_disk_cannot_have() {
    use crate::state::{from_bytes, to_bytes, Persist};
    let d = Driver::new(true, Some("scratch"), 1 << VIRTIO_F_VERSION_1);
    let saved = to_bytes(&d.block.save().unwrap()).unwrap();
    // Read-only images take a shared lock: both can be open at once.
    let state: BlockState = from_bytes(&saved).unwrap();
    let restored = Block::restore((), &state).unwrap();
    assert_eq!(to_bytes(&restored.save().unwrap()).unwrap(), saved);
    assert_eq!(restored.features(), d.block.features());
    assert_eq!(restored.disk().id(), b"scratch\0\0\0\0\0\0\0\0\0\0\0\0\0");
    assert!(restored.disk().readonly());
    let (mut a, mut b) = ([0u8; 64], [0u8; 64]);
    d.block.read_config(0, &mut a);
    restored.read_config(0, &mut b);
    assert_eq!(a, b);

    let mut writable = state.clone();
    writable.features |= 1 << VIRTIO_BLK_F_DISCARD;
    let err = Block::restore((), &writable).err().unwrap();
    assert!(matches!(err, BlockStateError::Features { .. }), "{err}");
    let mut short = state;
    short.config.truncate(8);
    let err = Block::restore((), &short).err().unwrap();
    assert!(matches!(err, BlockStateError::Config { .. }), "{err}");
}

/// Copy-on-write disks driven like any other: what the guest reads, and what the base and the
/// overlay files hold afterwards.
mod overlay {
    use std::mem::offset_of;
    use std::os::unix::fs::MetadataExt;
    use std::path::{Path, PathBuf};

    use super::*;
    use crate::state::{from_bytes, to_bytes, Persist};
    use crate::virtio::block::overlay::{OVERLAY_BLOCK, OVERLAY_MAGIC};
    use crate::virtio::block::{BlockError, DiskImage};

    const DISK: usize = (IMAGE_SECTORS * 512) as usize;
    /// Where the guest's writes come from (reads go to DATA).
    const SRC: u64 = DATA + 0x2_0000;
    /// Where version 1 puts the data of a disk this small: after the header and one map page,
    /// on the first MiB boundary.
    const DATA_OFFSET: u64 = 1 << 20;

    /// A directory of its own, removed with everything in it.
    struct Scratch(PathBuf);

    impl Scratch {
        fn new(name: &str) -> Self {
            let dir = std::env::temp_dir().join(format!("ember-ov-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            Scratch(dir)
        }

        fn path(&self, name: &str) -> PathBuf {
            self.0.join(name)
        }

        /// A base image of IMAGE_SECTORS sectors filled from `seed`.
        fn base(&self, name: &str, seed: u8) -> PathBuf {
            let p = self.path(name);
            std::fs::write(&p, pattern(DISK, seed)).unwrap();
            p
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn fnv(bytes: &[u8]) -> u64 {
        bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        })
    }

    /// The whole disk in one request, in segments that the overlay's 4 KiB blocks cut inside.
    fn read_disk(d: &mut Driver) -> Vec<u8> {
        d.mem
            .write_slice(&vec![0xa5u8; DISK], GuestAddress(DATA))
            .unwrap();
        let segs = [
            (DATA, 1000, W),
            (DATA + 1000, 7192, W),
            (DATA + 8192, DISK as u32 - 8192, W),
        ];
        assert_eq!(d.request(VIRTIO_BLK_T_IN, 0, &segs), (OK, DISK as u32 + 1));
        d.guest_bytes(DATA, DISK)
    }

    fn write(d: &mut Driver, sector: u64, bytes: &[u8]) -> u8 {
        d.mem.write_slice(bytes, GuestAddress(SRC)).unwrap();
        d.request(VIRTIO_BLK_T_OUT, sector, &[(SRC, bytes.len() as u32, R)])
            .0
    }

    fn flush(d: &mut Driver) {
        assert_eq!(d.request(VIRTIO_BLK_T_FLUSH, 0, &[]), (OK, 1));
    }

    fn put(model: &mut [u8], sector: u64, bytes: &[u8]) {
        let at = sector as usize * 512;
        model[at..at + bytes.len()].copy_from_slice(bytes);
    }

    fn allocated(d: &Driver) -> u64 {
        d.block.disk().overlay().unwrap().allocated_blocks()
    }

    /// The first byte of the allocation map as the file holds it (blocks 0-7: the whole disk).
    fn map_on_file(ov: &Path) -> u8 {
        let mut b = [0u8; 1];
        std::fs::File::open(ov)
            .unwrap()
            .read_exact_at(&mut b, 4096)
            .unwrap();
        b[0]
    }

    fn open_err(base: &Path, overlay: OverlayConfig, readonly: bool) -> BlockError {
        Block::new(&DiskConfig {
            path: base.to_path_buf(),
            readonly,
            id: None,
            overlay: Some(overlay),
        })
        .err()
        .expect("the disk must be refused")
    }

    #[test]
    fn reads_come_from_the_base_until_written_and_partial_writes_keep_the_rest_of_the_block() {
        let s = Scratch::new("reads");
        let base = s.base("base.img", 7);
        let before = std::fs::read(&base).unwrap();
        let ov = s.path("disk.ovl");
        let mut d = Driver::over(&base, OverlayConfig::File(ov.clone()));
        assert_eq!(d.block.disk().sectors(), IMAGE_SECTORS);
        assert!(
            !d.block.disk().readonly(),
            "the guest sees a read-write disk"
        );
        assert_eq!(read_disk(&mut d), before);
        assert_eq!(allocated(&d), 0);

        let mut model = before.clone();
        // Inside block 1; across blocks 1 and 2; all of block 3; the disk's last sector.
        for (sector, sectors, seed) in [(10, 3, 1), (15, 2, 2), (24, 8, 3), (63, 1, 4)] {
            let data = pattern(sectors * 512, seed);
            assert_eq!(write(&mut d, sector, &data), OK, "sector {sector}");
            put(&mut model, sector, &data);
        }
        assert_eq!(read_disk(&mut d), model);
        assert_eq!(allocated(&d), 4, "blocks 1, 2, 3 and 7");
        // A single sector from each kind of block, as a driver usually reads.
        for sector in [0, 9, 16, 30, 62, 63] {
            let (status, _) = d.request(VIRTIO_BLK_T_IN, sector, &[(DATA, 512, W)]);
            assert_eq!(status, OK);
            let at = sector as usize * 512;
            assert_eq!(d.guest_bytes(DATA, 512), model[at..at + 512], "{sector}");
        }

        // The base is never written: byte for byte, and by hash.
        let after = std::fs::read(&base).unwrap();
        assert_eq!(fnv(&after), fnv(&before));
        assert_eq!(after, before);

        // The format as documented: the header, the guest's bytes at DATA_OFFSET + their own
        // offset, the map written by FLUSH.
        let file = std::fs::read(&ov).unwrap();
        assert_eq!(&file[..8], OVERLAY_MAGIC);
        assert_eq!(file.len() as u64, DATA_OFFSET + DISK as u64);
        let at = DATA_OFFSET as usize + 10 * 512;
        assert_eq!(file[at..at + 1536], model[10 * 512..13 * 512]);
        assert_eq!(map_on_file(&ov), 0, "the map goes to the file at FLUSH");
        flush(&mut d);
        assert_eq!(map_on_file(&ov), 0b1000_1110);

        // Discards of whole blocks need no copy-up: the driver is told 4 KiB.
        let mut align = [0u8; 4];
        d.block.read_config(
            offset_of!(virtio_blk_config, discard_sector_alignment) as u64,
            &mut align,
        );
        assert_eq!(u32::from_le_bytes(align), (OVERLAY_BLOCK / 512) as u32);
    }

    #[test]
    fn two_overlays_over_one_base_each_see_only_their_own_writes() {
        let s = Scratch::new("two");
        let base = s.base("base.img", 7);
        let before = std::fs::read(&base).unwrap();
        let mut a = Driver::over(&base, OverlayConfig::File(s.path("a.ovl")));
        let mut b = Driver::over(&base, OverlayConfig::File(s.path("b.ovl")));
        let mut t = Driver::over(&base, OverlayConfig::Tmp);
        let (mut ma, mut mb, mut mt) = (before.clone(), before.clone(), before.clone());
        let both = |d: &mut Driver, m: &mut Vec<u8>, sector, seed| {
            let data = pattern(1024, seed);
            assert_eq!(write(d, sector, &data), OK);
            put(m, sector, &data);
        };
        both(&mut a, &mut ma, 3, 11);
        both(&mut b, &mut mb, 3, 12);
        both(&mut b, &mut mb, 40, 13);
        both(&mut t, &mut mt, 20, 14);
        assert_eq!(read_disk(&mut a), ma);
        assert_eq!(read_disk(&mut b), mb);
        assert_eq!(read_disk(&mut t), mt);
        assert_eq!(std::fs::read(&base).unwrap(), before);
        // Shared by readers only: a plain read-write disk over the base is kept out meanwhile.
        let err = DiskImage::open(&DiskConfig {
            path: base.clone(),
            readonly: false,
            id: None,
            overlay: None,
        })
        .unwrap_err();
        assert!(matches!(err, BlockError::Locked { .. }), "{err}");
    }

    #[test]
    fn a_reopened_overlay_keeps_what_was_flushed_and_goes_on() {
        let s = Scratch::new("reopen");
        let base = s.base("base.img", 7);
        let before = std::fs::read(&base).unwrap();
        let ov = s.path("disk.ovl");
        let (x, y, z) = (pattern(512, 21), pattern(4096, 22), pattern(1536, 23));
        let mut model = before.clone();

        let mut d = Driver::over(&base, OverlayConfig::File(ov.clone()));
        assert_eq!(write(&mut d, 2, &x), OK);
        put(&mut model, 2, &x);
        flush(&mut d);
        // Written after the last FLUSH, then Ember stops: it never writes the map but at a FLUSH
        // (or a snapshot), as after a crash.
        assert_eq!(write(&mut d, 40, &y), OK);
        drop(d);
        assert_eq!(map_on_file(&ov), 0b0000_0001, "block 5 was never flushed");

        let mut d = Driver::over(&base, OverlayConfig::File(ov.clone()));
        assert_eq!(
            read_disk(&mut d),
            model,
            "the flushed write, and the base elsewhere"
        );
        // A partial write to the block whose unflushed bytes are still in the file copies the
        // base up again: the stale bytes never show.
        assert_eq!(write(&mut d, 41, &z), OK);
        put(&mut model, 41, &z);
        flush(&mut d);
        drop(d);

        let mut d = Driver::over(&base, OverlayConfig::File(ov.clone()));
        assert_eq!(read_disk(&mut d), model);
        assert_eq!(allocated(&d), 2);
        assert_eq!(std::fs::read(&base).unwrap(), before);
    }

    #[test]
    fn an_overlay_is_refused_over_another_base_and_when_damaged() {
        let s = Scratch::new("refused");
        let base = s.base("base.img", 7);
        let ov = s.path("disk.ovl");
        let mut d = Driver::over(&base, OverlayConfig::File(ov.clone()));
        assert_eq!(write(&mut d, 0, &pattern(512, 1)), OK);
        flush(&mut d);
        drop(d);
        let good = std::fs::read(&ov).unwrap();

        // Same size, other bytes; another size.
        let other = s.base("other.img", 8);
        let err = open_err(&other, OverlayConfig::File(ov.clone()), false);
        assert!(matches!(err, BlockError::WrongBase { .. }), "{err}");
        let msg = err.to_string();
        for part in [ov.display().to_string(), base.display().to_string()] {
            assert!(msg.contains(&part), "{msg}");
        }
        let small = s.path("small.img");
        std::fs::write(&small, pattern(DISK / 2, 7)).unwrap();
        let err = open_err(&small, OverlayConfig::File(ov.clone()), false);
        assert!(
            matches!(&err, BlockError::WrongBase { what, .. } if what.contains("bytes")),
            "{err}"
        );

        let damaged = |name: &str, change: &dyn Fn(&mut Vec<u8>)| {
            let p = s.path(name);
            let mut bytes = good.clone();
            change(&mut bytes);
            std::fs::write(&p, bytes).unwrap();
            open_err(&base, OverlayConfig::File(p), false)
        };
        let err = damaged("text", &|b| *b = b"not an overlay\n".repeat(400));
        assert!(matches!(err, BlockError::NotAnOverlay { .. }), "{err}");
        let err = damaged("tiny", &|b| b.truncate(100));
        assert!(matches!(err, BlockError::NotAnOverlay { .. }), "{err}");
        let err = damaged("flipped", &|b| b[20] ^= 1);
        assert!(matches!(err, BlockError::OverlayDamaged { .. }), "{err}");
        let err = damaged("v9", &|b| b[8] = 9);
        assert!(
            matches!(err, BlockError::OverlayVersion { version: 9, .. }),
            "{err}"
        );
        let err = damaged("cut", &|b| b.truncate(8192));
        assert!(
            matches!(&err, BlockError::OverlayDamaged { reason, .. } if reason.contains("cut short")),
            "{err}"
        );
        // Every refusal left the base alone, and the good overlay still opens.
        assert_eq!(std::fs::read(&base).unwrap(), pattern(DISK, 7));
        Driver::over(&base, OverlayConfig::File(ov));
    }

    #[test]
    fn user_errors_are_refused_before_anything_is_created() {
        let s = Scratch::new("errors");
        let base = s.base("base.img", 7);
        let ov = s.path("disk.ovl");
        let err = open_err(&base, OverlayConfig::File(ov.clone()), true);
        assert!(matches!(err, BlockError::ReadonlyOverlay { .. }), "{err}");
        assert!(err.to_string().contains("readonly=on"), "{err}");
        let err = open_err(
            &s.path("missing.img"),
            OverlayConfig::File(ov.clone()),
            false,
        );
        assert!(matches!(err, BlockError::Open { .. }), "{err}");
        assert!(!ov.exists(), "no overlay without a base");
        let err = open_err(&base, OverlayConfig::File(s.0.clone()), false);
        assert!(
            matches!(
                err,
                BlockError::OverlayOpen { .. } | BlockError::OverlayNotAFile { .. }
            ),
            "{err}"
        );

        // In use: an overlay takes one disk's writes at a time; an empty file is made an overlay.
        std::fs::write(&ov, b"").unwrap();
        let held = Driver::over(&base, OverlayConfig::File(ov.clone()));
        let err = open_err(&base, OverlayConfig::File(ov.clone()), false);
        assert!(matches!(err, BlockError::OverlayLocked { .. }), "{err}");
        assert!(
            err.to_string().contains("in use by another process"),
            "{err}"
        );
        drop(held);
        Driver::over(&base, OverlayConfig::File(ov));
    }

    #[test]
    fn a_tmp_overlay_has_no_name_and_cannot_be_snapshotted() {
        let s = Scratch::new("tmp");
        let base = s.base("base.img", 7);
        let before = std::fs::read(&base).unwrap();
        let mut d = Driver::over(&base, OverlayConfig::Tmp);
        let data = pattern(2048, 5);
        assert_eq!(write(&mut d, 6, &data), OK);
        flush(&mut d);
        let mut model = before.clone();
        put(&mut model, 6, &data);
        assert_eq!(read_disk(&mut d), model);
        let overlay = d.block.disk().overlay().unwrap();
        assert_eq!(overlay.path(), None);
        // No name in any directory, so nothing is left once Ember's descriptor is closed.
        assert_eq!(overlay.file_for_tests().metadata().unwrap().nlink(), 0);
        let leftovers = |pid: u32| {
            std::fs::read_dir(std::env::temp_dir())
                .unwrap()
                .flatten()
                .filter(|e| {
                    e.file_name()
                        .to_string_lossy()
                        .starts_with(&format!(".ember-overlay-{pid}-"))
                })
                .count()
        };
        assert_eq!(leftovers(std::process::id()), 0);

        let err = d.block.save().err().unwrap();
        assert!(matches!(err, BlockStateError::TmpOverlay { .. }), "{err}");
        let err = d.block.save_device_state().unwrap_err().to_string();
        assert!(
            err.contains("overlay=tmp") && err.contains("overlay=PATH"),
            "{err}"
        );
        drop(d);
        assert_eq!(std::fs::read(&base).unwrap(), before);
        // A new tmp overlay starts from the base again.
        let mut d = Driver::over(&base, OverlayConfig::Tmp);
        assert_eq!(read_disk(&mut d), before);
    }

    /// A snapshot of a disk with a tmp overlay captures it: a sparse overlay file beside the
    /// state, named in the state. Every disk restored from it starts with the guest's writes in
    /// a tmp overlay of its own: two at once never see each other's writes, and neither the
    /// capture nor the base is written.
    #[test]
    fn a_tmp_overlay_is_captured_and_each_restore_gets_its_own_copy() {
        use std::os::unix::fs::MetadataExt;
        let s = Scratch::new("capture");
        let base = s.base("base.img", 7);
        let before = std::fs::read(&base).unwrap();
        let mut d = Driver::over(&base, OverlayConfig::Tmp);
        let data = pattern(4096, 11);
        assert_eq!(write(&mut d, 40, &data), OK);
        let mut model = before.clone();
        put(&mut model, 40, &data);
        let prefix = s.path("vm.state.disk0");
        d.block.snapshot_files(&prefix);
        let state = d.block.save().unwrap();
        assert_eq!(state.overlay, None);
        assert_eq!(
            state.captured.as_deref(),
            Some(Path::new("vm.state.disk0.overlay"))
        );
        let captured = s.path("vm.state.disk0.overlay");
        let snap = std::fs::read(&captured).unwrap();
        assert_eq!(&snap[..8], b"EMBEROVL");
        assert!(
            std::fs::metadata(&captured).unwrap().blocks() * 512 < 64 << 10,
            "the capture holds the written blocks only"
        );
        // Asked again without a place for the copy: refused, not half saved.
        assert!(matches!(
            d.block.save().err().unwrap(),
            BlockStateError::TmpOverlay { .. }
        ));
        // Never over an existing file.
        d.block.snapshot_files(&prefix);
        assert!(matches!(
            d.block.save().err().unwrap(),
            BlockStateError::Capture { .. }
        ));
        // The guest goes on writing after the snapshot: not in the capture.
        assert_eq!(write(&mut d, 20, &pattern(512, 12)), OK);
        drop(d);

        let mut a = Driver::over(&base, OverlayConfig::Captured(captured.clone()));
        let mut b = Driver::over(&base, OverlayConfig::Captured(captured.clone()));
        assert_eq!(a.block.disk().overlay().unwrap().path(), None);
        assert_eq!(read_disk(&mut a), model);
        let ours = pattern(1024, 13);
        assert_eq!(write(&mut a, 2, &ours), OK);
        assert_eq!(read_disk(&mut b), model, "b sees a's write");
        let mut mine = model.clone();
        put(&mut mine, 2, &ours);
        assert_eq!(read_disk(&mut a), mine);
        drop((a, b));
        assert_eq!(std::fs::read(&captured).unwrap(), snap);
        assert_eq!(std::fs::read(&base).unwrap(), before);
        // Restored through the state, as a snapshot's disk is.
        let mut restored = state.clone();
        restored.captured = Some(captured.clone());
        let block = Block::restore((), &restored).unwrap();
        assert_eq!(block.disk().overlay().unwrap().allocated_blocks(), 1);
        // Over another base: the capture's header says so.
        let other = s.base("other.img", 8);
        let err = open_err(&other, OverlayConfig::Captured(captured), false).to_string();
        assert!(err.contains("other bytes"), "{err}");
    }

    #[test]
    fn discard_and_write_zeroes_hide_the_base_for_good() {
        let s = Scratch::new("zero");
        let base = s.base("base.img", 7);
        let before = std::fs::read(&base).unwrap();
        let mut d = Driver::over(&base, OverlayConfig::File(s.path("disk.ovl")));
        let mut model = before.clone();
        // Part of block 1; blocks 2 and 3 whole, with and without UNMAP; a range from inside
        // block 5 to inside block 6.
        for (request_type, sector, sectors, flags) in [
            (VIRTIO_BLK_T_DISCARD, 9, 3, 0),
            (
                VIRTIO_BLK_T_WRITE_ZEROES,
                16,
                8,
                VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
            ),
            (VIRTIO_BLK_T_WRITE_ZEROES, 24, 8, 0),
            (VIRTIO_BLK_T_DISCARD, 44, 6, 0),
        ] {
            discard_segment(&d, DATA + 0x3_0000, sector, sectors, flags);
            assert_eq!(
                d.request(request_type, 0, &[(DATA + 0x3_0000, 16, R)]),
                (OK, 1),
                "sector {sector}"
            );
            put(&mut model, sector, &vec![0; sectors as usize * 512]);
        }
        assert_eq!(read_disk(&mut d), model);
        // A partial write to a zeroed block keeps its zeros: the base is not copied up again.
        let data = pattern(512, 9);
        assert_eq!(write(&mut d, 17, &data), OK);
        put(&mut model, 17, &data);
        assert_eq!(read_disk(&mut d), model);

        // The whole disk in one discard, then past the end and over the limit.
        discard_segment(&d, DATA + 0x3_0000, 0, IMAGE_SECTORS as u32, 0);
        assert_eq!(
            d.request(VIRTIO_BLK_T_DISCARD, 0, &[(DATA + 0x3_0000, 16, R)]),
            (OK, 1)
        );
        assert_eq!(read_disk(&mut d), vec![0; DISK]);
        assert_eq!(allocated(&d), IMAGE_SECTORS * 512 / OVERLAY_BLOCK);
        for (sector, sectors) in [(IMAGE_SECTORS - 1, 2), (0, u32::MAX), (u64::MAX, 1)] {
            discard_segment(&d, DATA + 0x3_0000, sector, sectors, 0);
            assert_eq!(
                d.request(VIRTIO_BLK_T_DISCARD, 0, &[(DATA + 0x3_0000, 16, R)])
                    .0,
                IOERR
            );
        }
        assert_eq!(std::fs::read(&base).unwrap(), before);
    }

    #[test]
    fn requests_past_the_end_of_an_overlay_disk_get_errors() {
        let s = Scratch::new("hostile");
        let base = s.base("base.img", 7);
        let before = std::fs::read(&base).unwrap();
        let mut d = Driver::over(&base, OverlayConfig::File(s.path("disk.ovl")));
        for (request_type, sector, flags) in [
            (VIRTIO_BLK_T_OUT, IMAGE_SECTORS, R),
            (VIRTIO_BLK_T_OUT, IMAGE_SECTORS - 1, R),
            (VIRTIO_BLK_T_OUT, u64::MAX, R),
            (VIRTIO_BLK_T_IN, IMAGE_SECTORS - 1, W),
        ] {
            let (status, _) = d.request(request_type, sector, &[(DATA, 1024, flags)]);
            assert_eq!(status, IOERR, "type {request_type} sector {sector}");
        }
        // A write of data that is not in guest memory.
        let (status, _) = d.request(VIRTIO_BLK_T_OUT, 0, &[(OUTSIDE, 512, R)]);
        assert_eq!(status, IOERR);
        assert_eq!(allocated(&d), 0);
        assert_eq!(read_disk(&mut d), before);
        assert_eq!(std::fs::read(&base).unwrap(), before);
    }

    /// A snapshot must find every write the guest saw complete, flushed or not: saving writes the
    /// overlay's map, and the restored device reopens the overlay by path.
    #[test]
    fn a_snapshot_saves_the_map_and_restores_over_the_same_overlay() {
        let s = Scratch::new("snapshot");
        let base = s.base("base.img", 7);
        let ov = s.path("disk.ovl");
        let mut d = Driver::over(&base, OverlayConfig::File(ov.clone()));
        let data = pattern(512, 31);
        assert_eq!(write(&mut d, 33, &data), OK);
        let state = d.block.save().unwrap();
        assert_eq!(state.overlay.as_deref(), Some(ov.as_path()));
        assert!(!state.readonly);
        let bytes = to_bytes(&state).unwrap();
        assert_eq!(from_bytes::<BlockState>(&bytes).unwrap(), state);
        // The overlay is locked while its disk is open.
        assert!(matches!(
            Block::restore((), &state).err().unwrap(),
            BlockStateError::Open(BlockError::OverlayLocked { .. })
        ));
        drop(d);

        // Restoring must not make a new overlay where the saved one is gone.
        let mut gone = state.clone();
        gone.overlay = Some(s.path("gone.ovl"));
        assert!(matches!(
            Block::restore((), &gone).err().unwrap(),
            BlockStateError::OverlayMissing { .. }
        ));
        assert!(!s.path("gone.ovl").exists());

        let restored = Block::restore((), &state).unwrap();
        assert_eq!(restored.disk().overlay().unwrap().allocated_blocks(), 1);
        assert_eq!(restored.features(), state.features);
        drop(restored);
        let mut d = Driver::over(&base, OverlayConfig::File(ov));
        let mut model = pattern(DISK, 7);
        put(&mut model, 33, &data);
        assert_eq!(read_disk(&mut d), model);

        // A plain disk's state has no overlay, and round-trips as before.
        let plain = Driver::new(false, None, ALL_FEATURES);
        let state = plain.block.save().unwrap();
        assert_eq!(state.overlay, None);
        assert_eq!(
            from_bytes::<BlockState>(&to_bytes(&state).unwrap()).unwrap(),
            state
        );
    }
}
