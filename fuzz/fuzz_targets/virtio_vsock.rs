//! virtio-vsock over arbitrary guest memory: the transmit and receive queues' descriptor tables
//! and avail rings, the packets' bytes (raw, or headers built from fuzzed fields with the
//! guest's CID so that they get past the first checks) all come from the fuzzer, as do the
//! host's side (a client's CONNECT line, bytes host peers write) and the order in which queues
//! and host sockets are served. A host listener waits at `<uds>_<port>` for the guest's
//! connections. Besides not panicking or hanging: the device never holds more than its limits.
#![no_main]

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};

use arbitrary::Arbitrary;
use ember_devices::virtio::vsock::packet::{Header, HOST_CID, TYPE_STREAM};
use ember_devices::virtio::vsock::{ListenerFile, BUF_ALLOC, MAX_CONNECTIONS, QUEUE_SIZE};
use ember_devices::virtio::{Interrupt, VirtioDevice, Vsock, VsockConfig};
use libfuzzer_sys::fuzz_target;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const MEM_SIZE: usize = 0x10_0000;
const CID: u64 = 3;
/// Host ports with a listener behind them.
const PORTS: [u32; 2] = [52, 1 << 30];
/// Each queue's descriptor table; its avail ring is 0x1000 above, its used ring 0x2000 above.
const RINGS: [u64; 3] = [0x1000, 0x5000, 0x9000];
const BUFFERS: u64 = 0x1_0000;

#[derive(Arbitrary, Debug)]
struct Desc {
    addr: u32,
    far: bool,
    len: u32,
    flags: u16,
    next: u16,
}

/// A packet header, mostly valid: the guest's CID and a port the host listens on unless the
/// fuzzer says otherwise.
#[derive(Arbitrary, Debug)]
struct Packet {
    at: u16,
    raw_cids: Option<(u64, u64)>,
    src_port: u32,
    to_listener: bool,
    dst_port: u32,
    len: u32,
    type_: Option<u16>,
    op: u8,
    flags: u32,
    buf_alloc: u32,
    fwd_cnt: u32,
}

#[derive(Arbitrary, Debug)]
enum Step {
    /// Sets the avail ring's index of queue 0 (rx) or 1 (tx), then the device serves it.
    Notify { queue: u8, avail_idx: u16 },
    /// Serves the host sockets.
    HostEvents,
    /// A host client connects and writes this (a CONNECT line, or not).
    Client(Vec<u8>),
    /// Every host peer writes these bytes.
    HostWrite(Vec<u8>),
    /// Every host peer reads what it has.
    HostRead,
    /// Every host peer goes away.
    HostClose,
}

#[derive(Arbitrary, Debug)]
struct Input {
    size_log2: u8,
    event_idx: bool,
    /// Guest memory from 0x1000 on; the structured fields below are written over it.
    memory: Vec<u8>,
    /// Descriptor tables of rx, then tx.
    descs: [Vec<Desc>; 2],
    avail: [Vec<u16>; 2],
    packets: Vec<Packet>,
    steps: Vec<Step>,
}

struct Fixture {
    dev: Vsock,
    _file: ListenerFile,
    listeners: Vec<UnixListener>,
    uds: PathBuf,
}

fn fixture() -> &'static Mutex<Fixture> {
    static F: OnceLock<Mutex<Fixture>> = OnceLock::new();
    F.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("ember-fuzz-vsock-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let uds = dir.join("v.sock");
        let (dev, file) = Vsock::new(&VsockConfig {
            cid: CID,
            uds: uds.clone(),
        })
        .unwrap();
        let listeners = PORTS
            .iter()
            .map(|p| {
                let l = UnixListener::bind(format!("{}_{p}", uds.display())).unwrap();
                l.set_nonblocking(true).unwrap();
                l
            })
            .collect();
        Mutex::new(Fixture {
            dev,
            _file: file,
            listeners,
            uds,
        })
    })
}

fn write_descs(mem: &GuestMemoryMmap, table: u64, descs: &[Desc]) {
    for (i, d) in descs.iter().take(256).enumerate() {
        let addr = if d.far {
            u64::from(d.addr) << 8
        } else {
            BUFFERS + u64::from(d.addr % 0x8_0000)
        };
        let len = if d.far { d.len } else { d.len % 0x2_0000 };
        let mut raw = [0u8; 16];
        raw[0..8].copy_from_slice(&addr.to_le_bytes());
        raw[8..12].copy_from_slice(&len.to_le_bytes());
        raw[12..14].copy_from_slice(&(d.flags & 0x7).to_le_bytes());
        raw[14..16].copy_from_slice(&d.next.to_le_bytes());
        let _ = mem.write_slice(&raw, GuestAddress(table + 16 * i as u64));
    }
}

fuzz_target!(|input: Input| {
    let mut f = fixture().lock().unwrap_or_else(|e| e.into_inner());
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
    let n = input.memory.len().min(MEM_SIZE - 0x1000);
    mem.write_slice(&input.memory[..n], GuestAddress(0x1000))
        .unwrap();
    for q in 0..2 {
        write_descs(&mem, RINGS[q], &input.descs[q]);
        for (i, head) in input.avail[q].iter().take(256).enumerate() {
            let _ = mem.write_obj(*head, GuestAddress(RINGS[q] + 0x1000 + 4 + 2 * i as u64));
        }
    }
    for p in input.packets.iter().take(64) {
        let (src_cid, dst_cid) = p.raw_cids.unwrap_or((CID, HOST_CID));
        let h = Header {
            src_cid,
            dst_cid,
            src_port: p.src_port,
            dst_port: if p.to_listener {
                PORTS[p.dst_port as usize % PORTS.len()]
            } else {
                p.dst_port
            },
            len: p.len % 0x2_0000,
            type_: p.type_.unwrap_or(TYPE_STREAM),
            op: u16::from(p.op % 9),
            flags: p.flags % 8,
            buf_alloc: p.buf_alloc,
            fwd_cnt: p.fwd_cnt,
        };
        let at = BUFFERS + u64::from(p.at) * 8;
        let _ = mem.write_slice(&h.to_bytes(), GuestAddress(at));
    }

    let size = 1u16 << (input.size_log2 % 9).max(1);
    let mut queues = Vec::new();
    for base in RINGS {
        let mut q = Queue::new(QUEUE_SIZE).unwrap();
        q.set_size(size);
        q.set_desc_table_address(Some(base as u32), Some(0));
        q.set_avail_ring_address(Some(base as u32 + 0x1000), Some(0));
        q.set_used_ring_address(Some(base as u32 + 0x2000), Some(0));
        q.set_ready(true);
        q.set_event_idx(input.event_idx);
        if !q.is_valid(&mem) {
            return;
        }
        queues.push(q);
    }
    let interrupt = Arc::new(Interrupt::new().unwrap());
    let features = f.dev.features();
    if f.dev
        .activate(mem.clone(), queues, interrupt, features)
        .is_err()
    {
        return;
    }
    let mut peers: Vec<UnixStream> = Vec::new();
    for step in input.steps.iter().take(32) {
        match step {
            Step::Notify { queue, avail_idx } => {
                let q = usize::from(queue % 2);
                let _ = mem.write_obj(*avail_idx, GuestAddress(RINGS[q] + 0x1000 + 2));
                f.dev.process_queue(q);
            }
            Step::HostEvents => f.dev.host_events(),
            Step::Client(line) => {
                if let Ok(mut c) = UnixStream::connect(&f.uds) {
                    let _ = c.set_nonblocking(true);
                    let _ = c.write(&line[..line.len().min(256)]);
                    peers.push(c);
                }
                f.dev.host_events();
            }
            Step::HostWrite(bytes) => {
                for p in &mut peers {
                    let _ = p.write(&bytes[..bytes.len().min(64 << 10)]);
                }
                f.dev.host_events();
            }
            Step::HostRead => {
                let mut buf = [0u8; 64 << 10];
                for p in &mut peers {
                    while matches!(p.read(&mut buf), Ok(n) if n > 0) {}
                }
                f.dev.host_events();
            }
            Step::HostClose => {
                peers.clear();
                f.dev.host_events();
            }
        }
        // The guest's connections arrive at the host listeners.
        for l in &f.listeners {
            while let Ok((s, _)) = l.accept() {
                let _ = s.set_nonblocking(true);
                peers.push(s);
            }
        }
        let (conns, queued) = f.dev.usage();
        assert!(conns <= MAX_CONNECTIONS, "{conns} connections");
        assert!(
            queued <= MAX_CONNECTIONS * BUF_ALLOC as usize,
            "{queued} bytes held"
        );
    }
    // Every connection ends with the driver's reset; the next input starts afresh.
    f.dev.reset();
    assert_eq!(f.dev.usage(), (0, 0));
    drop(peers);
    for l in &f.listeners {
        while l.accept().is_ok() {}
    }
    f.dev.host_events();
});
