//! The virtio-vsock device model: features, the config space (the guest's CID), and the two
//! sides that serve it on the device's I/O thread, the queue handler's (`VsockServer`) and the
//! host sockets' (`HostEvents`), over one shared `Muxer`. Register accesses from vCPUs take
//! neither: the config space never changes, and a broken queue is an atomic flag.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ids::VIRTIO_ID_VSOCK;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;

use super::muxer::{Active, Muxer};
use super::{VsockConfig, MAX_GUEST_CID, MAX_UDS_PATH, MIN_GUEST_CID};
use crate::state::{to_bytes, Persist, StateError};
use crate::virtio::{ActivateError, GuestLog, Interrupt, QueueServer, VirtioDevice};
use serde::{Deserialize, Serialize};
use std::os::unix::ffi::OsStrExt;
use virtio_queue::QueueState;

/// rx, tx and event queues, each this large at most.
pub const QUEUE_SIZE: u16 = 256;
/// VIRTIO_VSOCK_F_STREAM (virtio 1.2): stream sockets, the only kind the device has. A driver
/// that does not know the bit (Linux 6.1) assumes streams without it.
const VIRTIO_VSOCK_F_STREAM: u32 = 0;
const OFFERED_FEATURES: u64 =
    (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_RING_F_EVENT_IDX) | (1 << VIRTIO_VSOCK_F_STREAM);

#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    #[error(
        "--vsock cid={0}: a guest CID is {MIN_GUEST_CID} to {MAX_GUEST_CID} (0-2 are reserved)"
    )]
    Cid(u64),
    #[error(
        "--vsock uds={}: the path exists already (another Ember's socket, or a stale one to \
         remove)",
        .0.display()
    )]
    Exists(PathBuf),
    #[error(
        "--vsock uds={}: {len} bytes is too long; at most {MAX_UDS_PATH}, so that \
         <uds>_<port> fits a Unix socket address",
        path.display()
    )]
    PathTooLong { path: PathBuf, len: usize },
    #[error("--vsock uds={}: cannot listen there: {source}", path.display())]
    Listen {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("virtio-vsock: cannot create its {what}: {source}")]
    Create {
        what: &'static str,
        #[source]
        source: io::Error,
    },
}

/// The listener's socket file: removed when this is dropped (at Ember's exit, or when a VM that
/// failed to build is dropped), as the API socket's is.
#[derive(Debug)]
pub struct ListenerFile(PathBuf);

impl ListenerFile {
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for ListenerFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

pub struct Vsock {
    cid: u64,
    uds: PathBuf,
    features: u64,
    queue_sizes: [u16; 3],
    server: Arc<VsockServer>,
    epoll_fd: RawFd,
    log: GuestLog,
    /// A restored device's socket file, until the VMM takes it.
    restored_file: Option<ListenerFile>,
}

/// The device's serving side, shared by the queue handler and the host sockets' events.
pub struct VsockServer {
    muxer: Mutex<Muxer>,
    /// The driver broke a queue; nothing is served until it resets the device. Apart from the
    /// lock, so that the transport reads it without waiting.
    broken: AtomicBool,
    log: GuestLog,
}

impl VsockServer {
    fn lock(&self) -> MutexGuard<'_, Muxer> {
        self.muxer.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn broke(&self, e: virtio_queue::Error) {
        // Limited: a guest can break its queues again after every reset.
        self.log.warn(format_args!(
            "a queue is broken, serving nothing until the driver resets the device: {e}"
        ));
        self.broken.store(true, Ordering::SeqCst);
    }
}

impl VsockServer {
    fn host_events(&self) {
        // A broken device still accepts and closes host clients, but touches no queue.
        let usable = !self.broken.load(Ordering::SeqCst);
        let result = self.lock().host_events(usable);
        if let Err(e) = result {
            self.broke(e);
        }
    }
}

impl QueueServer for VsockServer {
    fn serve(&self, index: usize) -> bool {
        if self.broken.load(Ordering::SeqCst) {
            return false;
        }
        match self.lock().serve_queue(index) {
            Ok(more) => more,
            Err(e) => {
                self.broke(e);
                false
            }
        }
    }

    fn needs_reset(&self) -> bool {
        self.broken.load(Ordering::SeqCst)
    }
}

/// The host sockets' epoll set as one event source of the I/O thread's loop.
struct HostEvents {
    server: Arc<VsockServer>,
    epoll_fd: RawFd,
}

/// A descriptor the server owns (the epoll set lives as long as the server): only its number is
/// needed to register it.
struct Fd(RawFd);

impl AsRawFd for Fd {
    fn as_raw_fd(&self) -> RawFd {
        self.0
    }
}

impl MutEventSubscriber for HostEvents {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&Fd(self.epoll_fd), EventSet::IN)) {
            log::error!("virtio-vsock: cannot watch the host sockets: {e:?}");
        }
    }

    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        self.server.host_events();
    }
}

impl Vsock {
    /// Listens on `config.uds` (which must not exist) for host clients. The returned file guard
    /// removes the socket file when dropped.
    pub fn new(config: &VsockConfig) -> Result<(Vsock, ListenerFile), VsockError> {
        Self::with_features(config, OFFERED_FEATURES)
    }

    fn with_features(
        config: &VsockConfig,
        features: u64,
    ) -> Result<(Vsock, ListenerFile), VsockError> {
        if !(MIN_GUEST_CID..=MAX_GUEST_CID).contains(&config.cid) {
            return Err(VsockError::Cid(config.cid));
        }
        let path = &config.uds;
        let len = path.as_os_str().len();
        if len > MAX_UDS_PATH {
            return Err(VsockError::PathTooLong {
                path: path.clone(),
                len,
            });
        }
        if path.symlink_metadata().is_ok() {
            return Err(VsockError::Exists(path.clone()));
        }
        let listener = UnixListener::bind(path).map_err(|source| VsockError::Listen {
            path: path.clone(),
            source,
        })?;
        let file = ListenerFile(path.clone());
        listener
            .set_nonblocking(true)
            .map_err(|source| VsockError::Create {
                what: "listener",
                source,
            })?;
        let muxer = Muxer::new(config.cid, path.clone(), listener).map_err(|source| {
            VsockError::Create {
                what: "epoll set",
                source,
            }
        })?;
        let epoll_fd = muxer.epoll_fd();
        let vsock = Vsock {
            cid: config.cid,
            uds: path.clone(),
            features,
            queue_sizes: [QUEUE_SIZE; 3],
            server: Arc::new(VsockServer {
                muxer: Mutex::new(muxer),
                broken: AtomicBool::new(false),
                log: GuestLog::new("virtio-vsock"),
            }),
            epoll_fd,
            log: GuestLog::new("virtio-vsock"),
            restored_file: None,
        };
        Ok((vsock, file))
    }

    pub fn cid(&self) -> u64 {
        self.cid
    }

    /// How many connections are open, and the bytes held for host sockets that have not taken
    /// them yet.
    pub fn usage(&self) -> (usize, usize) {
        let m = self.server.lock();
        (m.connections(), m.queued_bytes())
    }

    /// The host sockets' epoll set, for tests that look at what it reports.
    #[cfg(test)]
    pub(crate) fn epoll_fd(&self) -> RawFd {
        self.epoll_fd
    }

    /// Serves the host sockets that are ready, as the I/O thread does on their event.
    pub fn host_events(&self) {
        self.server.host_events();
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_VSOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn features(&self) -> u64 {
        self.features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // struct virtio_vsock_config: the guest's CID, 64-bit.
        crate::virtio::read_config_space(&self.cid.to_le_bytes(), offset, data);
    }

    fn write_config(&mut self, offset: u64, _data: &[u8]) {
        self.log.warn(format_args!(
            "ignored config write at offset {offset:#x} (the guest CID is read-only)"
        ));
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        queues: Vec<Queue>,
        interrupt: Arc<Interrupt>,
        _acked_features: u64,
    ) -> Result<(), ActivateError> {
        let got = queues.len();
        let Ok([rx, tx, event]) = <[Queue; 3]>::try_from(queues) else {
            return Err(ActivateError::QueueCount { expected: 3, got });
        };
        self.server.lock().activate(Active {
            mem,
            rx,
            tx,
            event,
            interrupt,
        });
        Ok(())
    }

    fn process_queue(&mut self, index: usize) {
        while self.server.serve(index) {}
    }

    fn needs_reset(&self) -> bool {
        self.server.needs_reset()
    }

    fn reset(&mut self) {
        self.server.lock().reset();
        self.server.broken.store(false, Ordering::SeqCst);
    }

    fn queue_server(&self) -> Arc<dyn QueueServer> {
        self.server.clone()
    }

    fn io_subscribers(&self) -> Vec<Arc<Mutex<dyn MutEventSubscriber + Send>>> {
        vec![Arc::new(Mutex::new(HostEvents {
            server: self.server.clone(),
            epoll_fd: self.epoll_fd,
        }))]
    }

    fn save_device_state(&self) -> Result<Vec<u8>, StateError> {
        to_bytes(&self.save_state())
    }

    fn queue_states(&self) -> Option<Vec<QueueState>> {
        self.server.lock().queue_states()
    }
}

impl Vsock {
    fn save_state(&self) -> VsockState {
        VsockState {
            cid: self.cid,
            uds: self.uds.as_os_str().as_bytes().to_vec(),
            features: self.features,
            next_port: self.server.lock().next_port(),
            broken: self.server.needs_reset(),
        }
    }

    /// The socket file guard of a restored device (see [`Persist::restore`]).
    pub fn take_listener_file(&mut self) -> Option<ListenerFile> {
        self.restored_file.take()
    }

    /// Whether the TRANSPORT_RESET event owed after a restore is still waiting for an event
    /// buffer from the driver.
    pub fn reset_event_pending(&self) -> bool {
        self.server.lock().reset_event_pending()
    }
}

/// What the guest sees of the device: its CID, the features it was offered, whether the driver
/// broke a queue; and the host side's listening path and next port. Connections are not here:
/// their other ends are host sockets, which end with the Ember that had them. A restored device
/// has none, and tells the driver so with a TRANSPORT_RESET event (virtio 1.2 section 5.10.6.7).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VsockState {
    pub cid: u64,
    /// The Unix socket path it listened on, as bytes (a Linux path need not be UTF-8).
    pub uds: Vec<u8>,
    pub features: u64,
    pub next_port: u32,
    pub broken: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum VsockStateError {
    #[error(transparent)]
    Listen(#[from] VsockError),
    #[error("saved features {saved:#x} are not all offered by this Ember ({offered:#x})")]
    Features { saved: u64, offered: u64 },
}

impl Persist for Vsock {
    type State = VsockState;
    /// Where to listen instead of the saved path: each VM restored from one snapshot needs a
    /// socket of its own.
    type Args = Option<PathBuf>;
    type Error = VsockStateError;

    fn save(&self) -> Result<VsockState, VsockStateError> {
        Ok(self.save_state())
    }

    /// The new socket file's guard is kept in the device; the VMM takes it with
    /// [`Vsock::take_listener_file`] to remove the file at exit.
    fn restore(uds: Option<PathBuf>, state: &VsockState) -> Result<Self, VsockStateError> {
        if state.features & !OFFERED_FEATURES != 0 {
            return Err(VsockStateError::Features {
                saved: state.features,
                offered: OFFERED_FEATURES,
            });
        }
        let uds = uds.unwrap_or_else(|| std::ffi::OsStr::from_bytes(&state.uds).into());
        let (vsock, file) = Self::with_features(
            &VsockConfig {
                cid: state.cid,
                uds,
            },
            state.features,
        )?;
        let mut vsock = vsock;
        vsock.server.lock().restored(state.next_port);
        vsock.server.broken.store(state.broken, Ordering::SeqCst);
        vsock.restored_file = Some(file);
        Ok(vsock)
    }
}
