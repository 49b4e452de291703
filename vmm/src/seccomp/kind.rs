//! The kinds of Ember thread that get a system call filter. Shared with the build script, which
//! compiles each kind's filter (see `rules.rs`).

/// Which thread a filter is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThreadKind {
    /// A vCPU thread: `KVM_RUN` and the register accesses it dispatches to devices.
    Vcpu,
    /// The main thread once set-up is over: the device event loop (console, virtio queues, exit
    /// events), then stopping the vCPUs, restoring the terminal and exiting.
    Main,
    /// The console output thread: writes queued guest output to stdout or a file.
    Console,
    /// A disk's I/O thread: its event loop (queue notifications), requests on its image.
    Disk,
    /// The main thread of an Ember serving an API socket: `Main`, plus removing the socket file
    /// at exit.
    MainWithApi,
    /// The API thread: accepts connections on the API socket, reads requests, writes replies.
    Api,
    /// The vsock device's I/O thread: its event loop, the host's Unix sockets (accepting,
    /// connecting to `<uds>_<port>`, reading and writing, shutting down).
    Vsock,
    /// The main thread of an Ember with a vsock device: `Main`, plus removing the listener's
    /// socket file at exit.
    MainWithVsock,
}

/// Every kind, for the build script that compiles their filters and the test that checks them.
#[cfg_attr(not(test), allow(dead_code))]
pub const ALL: [ThreadKind; 8] = [
    ThreadKind::Vcpu,
    ThreadKind::Main,
    ThreadKind::Console,
    ThreadKind::Disk,
    ThreadKind::MainWithApi,
    ThreadKind::Api,
    ThreadKind::Vsock,
    ThreadKind::MainWithVsock,
];
