//! The virtio-blk device model: features, config space (spec 5.2.4), and serving the request
//! queue. The serving side (`BlockServer`) is shared with the disk's own thread and has its own
//! lock, so that register accesses through the transport never wait for a request's I/O.

use std::io;
use std::mem::{offset_of, size_of, MaybeUninit};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_blk::{
    virtio_blk_config, VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH,
    VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_WRITE_ZEROES, VIRTIO_BLK_S_IOERR,
    VIRTIO_BLK_S_OK,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VRING_AVAIL_F_NO_INTERRUPT};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueOwnedT, QueueState, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use super::backend::{BlockError, Direction, DiskImage, SECTOR_SIZE};
use super::overlay::OVERLAY_BLOCK;
use super::request::{
    collect_chain_into, parse_descriptors, DiskLimits, ParseError, Request, RequestKind, Segment,
};
use super::{DiskConfig, OverlayConfig};
use crate::state::{to_bytes, Persist, StateError};
use crate::virtio::{
    ActivateError, GuestLog, Interrupt, QueueServer, VirtioDevice, VIRTIO_MMIO_INT_VRING,
};

/// The request queue's size. SEG_MAX leaves room for the header and status descriptors.
pub const QUEUE_SIZE: u16 = 256;
const SEG_MAX: u32 = QUEUE_SIZE as u32 - 2;
/// iovecs per preadv/pwritev: a whole request's segments (at most SEG_MAX, more only where one
/// crosses a guest memory region boundary) in one call, on the stack. Below IOV_MAX (1024).
const IOV_BATCH: usize = QUEUE_SIZE as usize;
/// The most one DISCARD or WRITE_ZEROES may cover: 32 MiB, which the disk thread zeroes in tens of
/// milliseconds even where the image cannot punch holes (a single request could once ask for the
/// whole image, holding its queue for as long as that took).
const MAX_DISCARD_SECTORS: u32 = 1 << 16;

pub struct Block {
    /// The id as the user gave it (GET_ID answers the image's name without one), to open the
    /// image the same way on restore.
    id: Option<String>,
    features: u64,
    config: Vec<u8>,
    queue_sizes: [u16; 1],
    server: Arc<BlockServer>,
    /// Config-space complaints (register side); requests log through the server's.
    log: GuestLog,
    /// Where the snapshot being taken keeps a copy of a tmp overlay (`<prefix>.overlay`).
    capture_to: Mutex<Option<PathBuf>>,
}

/// The request side: the image, and the queue once the driver has activated the device.
pub struct BlockServer {
    disk: DiskImage,
    serving: Mutex<Serving>,
    /// Set when the driver corrupted the queue itself; nothing more is served until a reset.
    /// Apart from the lock, so that the transport can report it while a request runs.
    broken: AtomicBool,
}

pub(crate) struct Serving {
    active: Option<Active>,
    log: GuestLog,
}

struct Active {
    mem: GuestMemoryMmap,
    queue: Queue,
    interrupt: Arc<Interrupt>,
    limits: DiskLimits,
    /// The chain being served, kept to spare an allocation per request.
    descs: Vec<Descriptor>,
}

impl Block {
    /// Opens and locks the image named by `config`.
    pub fn new(config: &DiskConfig) -> Result<Self, BlockError> {
        let disk = DiskImage::open(config)?;
        let features = offered_features(&disk);
        let config_space = config_space(&disk);
        Ok(Self::with(
            disk,
            config.id.clone(),
            features,
            config_space,
            false,
        ))
    }

    fn with(
        disk: DiskImage,
        id: Option<String>,
        features: u64,
        config: Vec<u8>,
        broken: bool,
    ) -> Self {
        Block {
            id,
            features,
            config,
            queue_sizes: [QUEUE_SIZE],
            server: Arc::new(BlockServer {
                disk,
                serving: Mutex::new(Serving {
                    active: None,
                    log: GuestLog::new("virtio-blk"),
                }),
                broken: AtomicBool::new(broken),
            }),
            log: GuestLog::new("virtio-blk"),
            capture_to: Mutex::new(None),
        }
    }

    /// The state, after making an overlay's writes durable: the restored guest goes on from a
    /// disk that holds every write it saw complete, flushed or not.
    fn state(&self) -> Result<BlockState, BlockStateError> {
        let disk = self.disk();
        let mut captured = None;
        let overlay = match disk.overlay() {
            None => None,
            Some(o) => match o.path() {
                Some(path) => {
                    disk.flush().map_err(|source| BlockStateError::Persist {
                        path: path.to_path_buf(),
                        source,
                    })?;
                    Some(path.to_path_buf())
                }
                // An overlay without a name goes into the snapshot: a copy of it, next to the
                // state file.
                None => {
                    let taken = self
                        .capture_to
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .take();
                    let Some(prefix) = taken else {
                        return Err(BlockStateError::TmpOverlay {
                            path: disk.path().to_path_buf(),
                        });
                    };
                    let mut to = prefix.into_os_string();
                    to.push(".overlay");
                    let to = PathBuf::from(to);
                    disk.capture_overlay(&to)
                        .map_err(|source| BlockStateError::Capture {
                            path: to.clone(),
                            source,
                        })?;
                    captured = Some(to.file_name().map(PathBuf::from).unwrap_or(to));
                    None
                }
            },
        };
        Ok(BlockState {
            path: disk.path().to_path_buf(),
            readonly: disk.readonly(),
            id: self.id.clone(),
            overlay,
            captured,
            sectors: disk.sectors(),
            features: self.features,
            config: self.config.clone(),
            broken: self.server.needs_reset(),
        })
    }

    pub fn disk(&self) -> &DiskImage {
        &self.server.disk
    }

    pub fn is_active(&self) -> bool {
        self.server.lock().active.is_some()
    }

    /// The request side, for tests that stand in for a request in flight.
    #[cfg(test)]
    pub(crate) fn server_for_tests(&self) -> Arc<BlockServer> {
        self.server.clone()
    }
}

impl BlockServer {
    pub(crate) fn lock(&self) -> MutexGuard<'_, Serving> {
        self.serving.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl QueueServer for BlockServer {
    fn serve(&self, index: usize) -> bool {
        let mut serving = self.lock();
        let Serving { active, log } = &mut *serving;
        let Some(active) = active.as_mut() else {
            return false;
        };
        if index != 0 || self.broken.load(Ordering::SeqCst) {
            return false;
        }
        match serve(&self.disk, active, log) {
            Ok(turn) => {
                if turn.notify {
                    active.interrupt.trigger(VIRTIO_MMIO_INT_VRING);
                }
                turn.more
            }
            Err(e) => {
                // Limited: a guest can break the queue again after every reset.
                log.warn(format_args!(
                    "{}: request queue is broken, serving nothing until the driver resets the \
                     device: {e}",
                    self.disk.path().display()
                ));
                self.broken.store(true, Ordering::SeqCst);
                false
            }
        }
    }

    fn needs_reset(&self) -> bool {
        self.broken.load(Ordering::SeqCst)
    }
}

fn offered_features(disk: &DiskImage) -> u64 {
    let mut features = (1u64 << VIRTIO_F_VERSION_1)
        | (1 << VIRTIO_RING_F_EVENT_IDX)
        | (1 << VIRTIO_BLK_F_FLUSH)
        | (1 << VIRTIO_BLK_F_SEG_MAX)
        | (1 << VIRTIO_BLK_F_BLK_SIZE);
    if disk.readonly() {
        features |= 1 << VIRTIO_BLK_F_RO;
    } else {
        features |= (1 << VIRTIO_BLK_F_DISCARD) | (1 << VIRTIO_BLK_F_WRITE_ZEROES);
    }
    features
}

fn config_space(disk: &DiskImage) -> Vec<u8> {
    let mut c = vec![0u8; size_of::<virtio_blk_config>()];
    let mut put =
        |offset: usize, bytes: &[u8]| c[offset..offset + bytes.len()].copy_from_slice(bytes);
    put(
        offset_of!(virtio_blk_config, capacity),
        &disk.sectors().to_le_bytes(),
    );
    put(
        offset_of!(virtio_blk_config, seg_max),
        &SEG_MAX.to_le_bytes(),
    );
    put(
        offset_of!(virtio_blk_config, blk_size),
        &(SECTOR_SIZE as u32).to_le_bytes(),
    );
    put(
        offset_of!(virtio_blk_config, num_queues),
        &1u16.to_le_bytes(),
    );
    if !disk.readonly() {
        put(
            offset_of!(virtio_blk_config, max_discard_sectors),
            &MAX_DISCARD_SECTORS.to_le_bytes(),
        );
        put(
            offset_of!(virtio_blk_config, max_discard_seg),
            &1u32.to_le_bytes(),
        );
        // Over an overlay, discards of whole blocks need no copy-up from the base; Linux takes
        // this as its discard granularity.
        let discard_alignment = if disk.overlay().is_some() {
            (OVERLAY_BLOCK / SECTOR_SIZE) as u32
        } else {
            1
        };
        put(
            offset_of!(virtio_blk_config, discard_sector_alignment),
            &discard_alignment.to_le_bytes(),
        );
        put(
            offset_of!(virtio_blk_config, max_write_zeroes_sectors),
            &MAX_DISCARD_SECTORS.to_le_bytes(),
        );
        put(
            offset_of!(virtio_blk_config, max_write_zeroes_seg),
            &1u32.to_le_bytes(),
        );
        put(offset_of!(virtio_blk_config, write_zeroes_may_unmap), &[1]);
    }
    c
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn features(&self) -> u64 {
        self.features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        crate::virtio::read_config_space(&self.config, offset, data);
    }

    fn write_config(&mut self, offset: u64, _data: &[u8]) {
        // Only `wce` is writable, and only with VIRTIO_BLK_F_CONFIG_WCE, which is not offered.
        self.log
            .warn(format_args!("ignored config write at offset {offset:#x}"));
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        mut queues: Vec<Queue>,
        interrupt: Arc<Interrupt>,
        acked_features: u64,
    ) -> Result<(), ActivateError> {
        if queues.len() != 1 {
            return Err(ActivateError::QueueCount {
                expected: 1,
                got: queues.len(),
            });
        }
        let Some(queue) = queues.pop() else {
            return Err(ActivateError::QueueCount {
                expected: 1,
                got: 0,
            });
        };
        let disk = &self.server.disk;
        let limits = DiskLimits {
            sectors: disk.sectors(),
            readonly: disk.readonly(),
            discard: acked_features & (1 << VIRTIO_BLK_F_DISCARD) != 0,
            write_zeroes: acked_features & (1 << VIRTIO_BLK_F_WRITE_ZEROES) != 0,
            max_discard_sectors: MAX_DISCARD_SECTORS,
            max_write_zeroes_sectors: MAX_DISCARD_SECTORS,
        };
        let mut serving = self.server.lock();
        serving.active = Some(Active {
            mem,
            queue,
            interrupt,
            limits,
            descs: Vec::with_capacity(usize::from(QUEUE_SIZE)),
        });
        // Not cleared here: a reset already did, and a restored device starts again as broken
        // as it was saved.
        Ok(())
    }

    fn process_queue(&mut self, index: usize) {
        while self.server.serve(index) {}
    }

    fn needs_reset(&self) -> bool {
        self.server.needs_reset()
    }

    fn reset(&mut self) {
        // Waits for a request in flight on the disk's thread: none survives the reset.
        self.server.lock().active = None;
        self.server.broken.store(false, Ordering::SeqCst);
    }

    fn queue_server(&self) -> Arc<dyn QueueServer> {
        self.server.clone()
    }

    fn snapshot_files(&self, prefix: &Path) {
        *self.capture_to.lock().unwrap_or_else(|e| e.into_inner()) = Some(prefix.to_path_buf());
    }

    fn save_device_state(&self) -> Result<Vec<u8>, StateError> {
        let state = self.state().map_err(|e| StateError::Failed {
            what: "virtio-blk",
            reason: e.to_string(),
        })?;
        to_bytes(&state)
    }

    fn queue_states(&self) -> Option<Vec<QueueState>> {
        // Taking the request side's lock waits for a request in flight: every chain the queue
        // has taken is complete in the used ring.
        let serving = self.server.lock();
        serving.active.as_ref().map(|a| vec![a.queue.state()])
    }
}

/// What the guest sees of the disk: its features and config space as they were offered, and
/// whether the driver broke the queue. The image itself (and its overlay) is opened again by path
/// (and locked again); the queue's positions are the transport's part of the state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockState {
    #[serde(with = "path_bytes")]
    pub path: PathBuf,
    pub readonly: bool,
    pub id: Option<String>,
    /// The overlay file of a copy-on-write disk, reopened by a restore and written on.
    #[serde(with = "path_bytes::option")]
    pub overlay: Option<PathBuf>,
    /// The copy of a tmp overlay captured into the snapshot, as a file name beside the state
    /// file: a restore copies it into a tmp overlay of its own and never writes it.
    #[serde(with = "path_bytes::option")]
    pub captured: Option<PathBuf>,
    /// The image's size when saved: the guest's filesystem was laid out for it.
    pub sectors: u64,
    pub features: u64,
    pub config: Vec<u8>,
    pub broken: bool,
}

/// Paths as their bytes: a Linux path need not be UTF-8, which serde's `PathBuf` requires.
mod path_bytes {
    use std::ffi::OsStr;
    use std::os::unix::ffi::OsStrExt;
    use std::path::{Path, PathBuf};

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(path: &Path, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(path.as_os_str().as_bytes())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<PathBuf, D::Error> {
        let bytes = Vec::<u8>::deserialize(d)?;
        Ok(OsStr::from_bytes(&bytes).into())
    }

    pub mod option {
        use super::*;

        pub fn serialize<S: Serializer>(path: &Option<PathBuf>, s: S) -> Result<S::Ok, S::Error> {
            match path {
                Some(p) => s.serialize_some(p.as_os_str().as_bytes()),
                None => s.serialize_none(),
            }
        }

        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<PathBuf>, D::Error> {
            let bytes = Option::<Vec<u8>>::deserialize(d)?;
            Ok(bytes.map(|b| OsStr::from_bytes(&b).into()))
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BlockStateError {
    #[error("cannot reopen the disk image: {0}")]
    Open(#[from] BlockError),
    #[error(
        "disk image {} has {now} sectors, but {saved} when the guest was saved",
        path.display()
    )]
    ImageSize { path: PathBuf, saved: u64, now: u64 },
    #[error(
        "disk image {}: saved features {saved:#x} are not all offered for it now ({offered:#x})",
        path.display()
    )]
    Features {
        path: PathBuf,
        saved: u64,
        offered: u64,
    },
    #[error("disk image {}: saved config space does not describe it ({reason})", path.display())]
    Config { path: PathBuf, reason: &'static str },
    #[error(
        "disk {} has overlay=tmp, which a restored VM could not reopen (it has no name): give \
         the disk an overlay file (overlay=PATH) to snapshot this VM",
        path.display()
    )]
    TmpOverlay { path: PathBuf },
    #[error("cannot make overlay {} durable for the snapshot: {source}", path.display())]
    Persist { path: PathBuf, source: io::Error },
    #[error(
        "overlay {} of the saved disk is missing or empty: the guest's writes to its disk were \
         there",
        path.display()
    )]
    OverlayMissing { path: PathBuf },
    #[error("cannot capture the disk's tmp overlay into {}: {source}", path.display())]
    Capture { path: PathBuf, source: BlockError },
}

impl Persist for Block {
    type State = BlockState;
    /// Nothing: the image is reopened from the path in the state.
    type Args = ();
    type Error = BlockStateError;

    fn save(&self) -> Result<BlockState, BlockStateError> {
        self.state()
    }

    /// The restored device offers the saved features and config space, not what this Ember
    /// would offer a new guest: the driver negotiated those.
    fn restore((): (), state: &BlockState) -> Result<Self, BlockStateError> {
        // Opening would make a new, empty overlay: the restored guest would find its disk
        // without the writes it made.
        if let Some(ov) = &state.overlay {
            if !std::fs::metadata(ov).is_ok_and(|m| m.len() > 0) {
                return Err(BlockStateError::OverlayMissing { path: ov.clone() });
            }
        }
        let overlay = match (&state.overlay, &state.captured) {
            (Some(file), _) => Some(OverlayConfig::File(file.clone())),
            (None, Some(captured)) => Some(OverlayConfig::Captured(captured.clone())),
            (None, None) => None,
        };
        let disk = DiskImage::open(&DiskConfig {
            path: state.path.clone(),
            readonly: state.readonly,
            id: state.id.clone(),
            overlay,
        })?;
        let path = || state.path.clone();
        if disk.sectors() != state.sectors {
            return Err(BlockStateError::ImageSize {
                path: path(),
                saved: state.sectors,
                now: disk.sectors(),
            });
        }
        let offered = offered_features(&disk);
        if state.features & !offered != 0 {
            return Err(BlockStateError::Features {
                path: path(),
                saved: state.features,
                offered,
            });
        }
        if state.config.len() != size_of::<virtio_blk_config>() {
            return Err(BlockStateError::Config {
                path: path(),
                reason: "wrong length",
            });
        }
        let at = offset_of!(virtio_blk_config, capacity);
        if state.config[at..at + 8] != disk.sectors().to_le_bytes() {
            return Err(BlockStateError::Config {
                path: path(),
                reason: "another capacity",
            });
        }
        Ok(Self::with(
            disk,
            state.id.clone(),
            state.features,
            state.config.clone(),
            state.broken,
        ))
    }
}

/// Chains served per turn: then the request side's lock is let go (a reset or a register access
/// that needs it waits for one turn at most) before the next turn.
const CHAINS_PER_TURN: usize = if cfg!(test) { 4 } else { 32 };

/// What one turn of serving did.
struct Turn {
    /// The driver wants an interrupt for what was used.
    notify: bool,
    /// Chains are left: serve another turn.
    more: bool,
}

/// Serves up to CHAINS_PER_TURN available chains. Returns whether the driver wants an interrupt; an error means
/// the queue's rings themselves are unusable.
fn serve(
    disk: &DiskImage,
    active: &mut Active,
    log: &mut GuestLog,
) -> Result<Turn, virtio_queue::Error> {
    let Active {
        mem,
        queue,
        limits,
        descs,
        ..
    } = active;
    let mut used_any = false;
    let mut budget = CHAINS_PER_TURN;
    let mut more = false;
    'turn: loop {
        queue.disable_notification(mem)?;
        loop {
            if budget == 0 {
                // Checked before taking a chain, which `next` would consume. Notifications stay
                // off: the next turn comes without one (and finds nothing if nothing is left).
                more = true;
                break 'turn;
            }
            let Some(chain) = queue.iter(&*mem)?.next() else {
                break;
            };
            budget -= 1;
            let head = chain.head_index();
            if head >= queue.size() {
                // Nothing to return to the used ring: the driver handed over no descriptor.
                log.warn(format_args!(
                    "skipped available entry {head}: not a descriptor index"
                ));
                continue;
            }
            let chain = collect_chain_into(chain, descs).map(|()| descs.as_slice());
            let used_len = handle_chain(disk, mem, limits, log, chain);
            queue.add_used(mem, head, used_len)?;
            used_any = true;
        }
        // Re-enabling notifications races with the driver adding more: look again if it did.
        if !queue.enable_notification(mem)? {
            break;
        }
    }
    if !used_any {
        return Ok(Turn {
            notify: false,
            more,
        });
    }
    let notify = if queue.event_idx_enabled() {
        queue.needs_notification(mem)?
    } else {
        // virtio-queue ignores the driver's VRING_AVAIL_F_NO_INTERRUPT, which it sets while it
        // polls the used ring (spec 2.7.7.2: the device should not interrupt then).
        let flags: u16 = mem
            .read_obj(GuestAddress(queue.avail_ring()))
            .map_err(virtio_queue::Error::GuestMemory)?;
        u16::from_le(flags) & VRING_AVAIL_F_NO_INTERRUPT as u16 == 0
    };
    Ok(Turn { notify, more })
}

/// Parses and executes one chain, writes its status byte, and returns the used length.
fn handle_chain(
    disk: &DiskImage,
    mem: &GuestMemoryMmap,
    limits: &DiskLimits,
    log: &mut GuestLog,
    descs: Result<&[Descriptor], super::ChainError>,
) -> u32 {
    let parsed = descs
        .map_err(ParseError::from)
        .and_then(|d| parse_descriptors(mem, d, limits));
    let (status_addr, status, written) = match parsed {
        Ok(request) => {
            let (status, written) = execute(disk, mem, &request, log);
            (request.status, status, written)
        }
        Err(ParseError::Rejected { status, reason }) => {
            log.warn(format_args!("{}: {reason}", disk.path().display()));
            (status, reason.status(), 0)
        }
        Err(ParseError::Chain(e)) => {
            log.warn(format_args!(
                "{}: dropped descriptor chain: {e}",
                disk.path().display()
            ));
            return 0;
        }
    };
    if let Err(e) = mem.write_obj(status, status_addr) {
        // The parser checked the address, so this is not expected; say so rather than hide it.
        log::error!("virtio-blk: cannot write status byte: {e}");
        return written;
    }
    written.saturating_add(1)
}

/// Runs a checked request. Returns the status and the number of data bytes written to the
/// driver's buffers.
fn execute(
    disk: &DiskImage,
    mem: &GuestMemoryMmap,
    request: &Request,
    log: &mut GuestLog,
) -> (u8, u32) {
    let result = match &request.kind {
        RequestKind::Read { sector, segments } => {
            transfer(disk, mem, *sector, segments, Direction::ToGuest)
        }
        RequestKind::Write { sector, segments } => {
            transfer(disk, mem, *sector, segments, Direction::ToDisk).map(|_| 0)
        }
        RequestKind::Flush => disk.flush().map(|_| 0),
        RequestKind::GetId { segments } => write_id(disk, mem, segments),
        RequestKind::Discard(range) => {
            let (offset, len) = range.bytes();
            disk.discard(offset, len).map(|_| 0)
        }
        RequestKind::WriteZeroes { range, unmap } => {
            let (offset, len) = range.bytes();
            disk.write_zeroes(offset, len, *unmap).map(|_| 0)
        }
    };
    match result {
        Ok(written) => (VIRTIO_BLK_S_OK as u8, written),
        Err(e) => {
            // Limited: the guest decides how often a failing disk is asked again.
            log.warn(format_args!(
                "{}: {} failed: {e}",
                disk.path().display(),
                request.kind_name()
            ));
            (VIRTIO_BLK_S_IOERR as u8, 0)
        }
    }
}

/// Moves the request's data between the disk and guest memory: preadv/pwritev straight from or
/// into guest RAM, one call for a whole request (one per IOV_BATCH pieces at most). Returns the
/// bytes written to guest memory.
fn transfer(
    disk: &DiskImage,
    mem: &GuestMemoryMmap,
    sector: u64,
    segments: &[Segment],
    direction: Direction,
) -> io::Result<u32> {
    // Left uninitialised: zeroing 4 KiB of iovecs per request showed up in profiles of 4 KiB reads.
    let mut iovs = [const { MaybeUninit::<libc::iovec>::uninit() }; IOV_BATCH];
    let mut n = 0;
    // The parser checked sector + length against the disk size.
    let mut offset = sector * SECTOR_SIZE;
    let mut moved = 0u64;
    for seg in segments {
        // The parser checked each segment lies in guest RAM; a segment crossing from one region
        // into the next comes back as two slices.
        for slice in GuestMemoryBackend::get_slices(mem, seg.addr, seg.len as usize) {
            let slice = slice.map_err(io::Error::other)?;
            if slice.is_empty() {
                continue;
            }
            if n == IOV_BATCH {
                let done = disk_transfer(disk, filled(&mut iovs, n), offset, direction)?;
                offset += done;
                moved += done;
                n = 0;
            }
            iovs[n].write(libc::iovec {
                iov_base: slice.ptr_guard_mut().as_ptr().cast(),
                iov_len: slice.len(),
            });
            n += 1;
        }
    }
    if n > 0 {
        moved += disk_transfer(disk, filled(&mut iovs, n), offset, direction)?;
    }
    Ok(match direction {
        // A request is under 4 GiB: virtio-queue stops following a chain there.
        Direction::ToGuest => u32::try_from(moved).unwrap_or(u32::MAX),
        Direction::ToDisk => 0,
    })
}

/// The first `n` entries of `iovs`, which the caller has written.
fn filled(iovs: &mut [MaybeUninit<libc::iovec>], n: usize) -> &mut [libc::iovec] {
    let n = n.min(iovs.len());
    // SAFETY: MaybeUninit<T> has T's layout, and the caller initialised the first n entries.
    unsafe { std::slice::from_raw_parts_mut(iovs.as_mut_ptr().cast(), n) }
}

/// The disk's transfer of iovecs that `transfer` built.
fn disk_transfer(
    disk: &DiskImage,
    iovs: &mut [libc::iovec],
    offset: u64,
    direction: Direction,
) -> io::Result<u64> {
    // SAFETY: every iovec is a slice of guest RAM that `transfer` got from the memory map it
    // borrows for this whole call, so the mappings stay put. Guest RAM is shared with the vCPUs
    // and is only ever accessed through volatile copies, never through Rust references.
    unsafe { disk.transfer(iovs, offset, direction) }
}

fn write_id(disk: &DiskImage, mem: &GuestMemoryMmap, segments: &[Segment]) -> io::Result<u32> {
    let id = disk.id();
    let mut done = 0usize;
    for seg in segments {
        let n = (seg.len as usize).min(id.len() - done);
        mem.write_slice(&id[done..done + n], seg.addr)
            .map_err(io::Error::other)?;
        done += n;
    }
    Ok(done as u32)
}
