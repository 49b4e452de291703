//! The virtio-mmio register interface as a guest drives it from its vCPUs: arbitrary register
//! reads and writes of any width and offset (config space included), status sequences, queue
//! set-up, notifications and guest memory changes, interleaved with the event loop serving the
//! device. A helper op performs the standard driver initialisation with fuzzed features and queue
//! size, so the fuzzer reaches a live device and its queue quickly. Besides not panicking or
//! hanging: the identification registers never change.
#![no_main]

use std::os::unix::fs::FileExt;
use std::sync::{Arc, Mutex, OnceLock};

use arbitrary::Arbitrary;
use ember_devices::virtio::mmio::{MMIO_MAGIC, MMIO_VERSION};
use ember_devices::virtio::{Block, DiskConfig, MmioTransport};
use ember_devices::BusDevice;
use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use libfuzzer_sys::fuzz_target;
use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
use virtio_bindings::virtio_mmio::*;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const MEM_SIZE: usize = 0x4_0000;
const DESC: u32 = 0x1000;
const AVAIL: u32 = 0x2000;
const USED: u32 = 0x3000;

#[derive(Arbitrary, Debug)]
enum Op {
    Read {
        offset: u16,
        width: u8,
    },
    Write {
        offset: u16,
        data: Vec<u8>,
    },
    /// A 4-byte write at a register offset (most of the interface).
    Reg {
        index: u8,
        value: u32,
    },
    /// ACKNOWLEDGE, DRIVER, features, FEATURES_OK, queue 0 at DESC/AVAIL/USED, DRIVER_OK.
    Init {
        features: u64,
        size: u16,
        driver_ok: bool,
    },
    Memory {
        at: u16,
        data: Vec<u8>,
    },
    Avail(u16),
    Notify(u32),
    RunEventLoop,
}

type Shared = Arc<Mutex<MmioTransport<Block>>>;

fn image_path() -> &'static std::path::Path {
    static PATH: OnceLock<std::path::PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        let p = std::env::temp_dir().join(format!("ember-fuzz-mmio-{}.img", std::process::id()));
        let f = std::fs::File::create(&p).unwrap();
        f.write_all_at(&[0x5a; 32 * 512], 0).unwrap();
        p
    })
}

fn read32(dev: &Shared, offset: u32) -> u32 {
    let mut b = [0u8; 4];
    dev.lock().unwrap().read(u64::from(offset), &mut b);
    u32::from_le_bytes(b)
}

fn write32(dev: &Shared, offset: u32, value: u32) {
    dev.lock()
        .unwrap()
        .write(u64::from(offset), &value.to_le_bytes());
}

fn init(dev: &Shared, features: u64, size: u16, driver_ok: bool) {
    write32(dev, VIRTIO_MMIO_STATUS, 0);
    write32(dev, VIRTIO_MMIO_STATUS, 1);
    write32(dev, VIRTIO_MMIO_STATUS, 1 | 2);
    for sel in 0..2 {
        write32(dev, VIRTIO_MMIO_DRIVER_FEATURES_SEL, sel);
        write32(
            dev,
            VIRTIO_MMIO_DRIVER_FEATURES,
            (features >> (32 * sel)) as u32,
        );
    }
    write32(dev, VIRTIO_MMIO_STATUS, 1 | 2 | 8);
    write32(dev, VIRTIO_MMIO_QUEUE_SEL, 0);
    write32(dev, VIRTIO_MMIO_QUEUE_NUM, u32::from(size));
    write32(dev, VIRTIO_MMIO_QUEUE_DESC_LOW, DESC);
    write32(dev, VIRTIO_MMIO_QUEUE_DESC_HIGH, 0);
    write32(dev, VIRTIO_MMIO_QUEUE_AVAIL_LOW, AVAIL);
    write32(dev, VIRTIO_MMIO_QUEUE_AVAIL_HIGH, 0);
    write32(dev, VIRTIO_MMIO_QUEUE_USED_LOW, USED);
    write32(dev, VIRTIO_MMIO_QUEUE_USED_HIGH, 0);
    write32(dev, VIRTIO_MMIO_QUEUE_READY, 1);
    if driver_ok {
        write32(dev, VIRTIO_MMIO_STATUS, 1 | 2 | 8 | 4);
    }
}

fuzz_target!(|ops: Vec<Op>| {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
    let block = Block::new(&DiskConfig {
        path: image_path().to_path_buf(),
        readonly: false,
        id: Some("fuzz".into()),
        overlay: None,
    })
    .unwrap();
    let dev: Shared = Arc::new(Mutex::new(MmioTransport::new(mem.clone(), block).unwrap()));
    let mut em: EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>> =
        EventManager::new().unwrap();
    em.add_subscriber(dev.clone());

    for op in ops.into_iter().take(256) {
        match op {
            Op::Read { offset, width } => {
                let mut buf = vec![0u8; usize::from(width % 9)];
                dev.lock()
                    .unwrap()
                    .read(u64::from(offset % 0x1000), &mut buf);
            }
            Op::Write { offset, data } => {
                dev.lock()
                    .unwrap()
                    .write(u64::from(offset % 0x1000), &data[..data.len().min(8)]);
            }
            Op::Reg { index, value } => write32(&dev, u32::from(index % 0x48) * 4, value),
            Op::Init {
                features,
                size,
                driver_ok,
            } => init(&dev, features, size, driver_ok),
            Op::Memory { at, data } => {
                let _ = mem.write_slice(&data, GuestAddress(u64::from(at) * 4));
            }
            Op::Avail(idx) => {
                let _ = mem.write_obj(idx, GuestAddress(u64::from(AVAIL) + 2));
            }
            Op::Notify(q) => write32(&dev, VIRTIO_MMIO_QUEUE_NOTIFY, q),
            Op::RunEventLoop => {
                em.run_with_timeout(0).unwrap();
            }
        }
        assert_eq!(read32(&dev, VIRTIO_MMIO_MAGIC_VALUE), MMIO_MAGIC);
        assert_eq!(read32(&dev, VIRTIO_MMIO_VERSION), MMIO_VERSION);
        assert_eq!(read32(&dev, VIRTIO_MMIO_DEVICE_ID), VIRTIO_ID_BLOCK);
    }
    em.run_with_timeout(0).unwrap();
});
