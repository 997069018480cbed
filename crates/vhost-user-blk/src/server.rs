//! The accept loop: one frontend at a time, each with a fresh vhost-user daemon and
//! backend, until shutdown.

use crate::backend::BlkBackend;
use crate::device::BlockDevice;
use crate::error::Error;
use crate::gate::{peer_uid, spawn_relay, Relay};
use crate::shutdown::{Shutdown, Wake};
use crate::socket::SocketFile;
use crate::GateConfig;
use std::os::unix::io::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::Duration;
use vhost::vhost_user::Error as VhostUserError;
use vhost_user_backend::{Error as DaemonError, VhostUserDaemon};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;

/// The name of each connection's request thread.
const THREAD_NAME: &str = "evmm-vu-blk";
/// How long the end of a connection waits for vhost-user-backend's threads to let go
/// of its backend.
const RELEASE_WAIT: Duration = Duration::from_secs(2);
/// Pause after a failed accept, so a persistent failure (e.g. EMFILE) does not spin.
const ACCEPT_RETRY: Duration = Duration::from_millis(100);

/// Serves a disk on a socket.
pub struct Server {
    device: BlockDevice,
    socket: SocketFile,
    shutdown: Arc<Shutdown>,
    gate: GateConfig,
}

impl Server {
    /// A server of `device` on `socket` for the frontends `gate` admits, stopped by
    /// `shutdown`.
    pub fn new(
        device: BlockDevice,
        socket: SocketFile,
        shutdown: Arc<Shutdown>,
        gate: GateConfig,
    ) -> Self {
        Self {
            device,
            socket,
            shutdown,
            gate,
        }
    }

    /// Serves frontends one after the other until shutdown is requested; then
    /// fdatasyncs the disk and removes the socket file.
    pub fn run(mut self) -> Result<(), Error> {
        log::info!(
            "serving {} sectors on {} with {} queue(s)",
            self.device.disk().capacity_sectors(),
            self.socket.path().display(),
            self.device.queues()
        );
        let served = self.serve_until_shutdown();
        let flushed = self.device.disk().sync_data().map_err(Error::Flush);
        log::info!(
            "stopping; counters: {}",
            counters_line(&self.device.metrics_snapshot())
        );
        drop(self.socket);
        served.and(flushed)
    }

    fn serve_until_shutdown(&mut self) -> Result<(), Error> {
        loop {
            let wake = self
                .shutdown
                .wait_for_connection(self.socket.as_raw_fd())
                .map_err(Error::Wait)?;
            match wake {
                Wake::Shutdown => return Ok(()),
                Wake::Connection => {
                    if let Some(frontend) = self.admit() {
                        self.serve_connection(frontend)?;
                    }
                }
            }
        }
    }

    /// Accepts the frontend that is connecting if its user is admitted.
    fn admit(&self) -> Option<UnixStream> {
        let stream = match self.socket.accept() {
            Ok(Some(stream)) => stream,
            Ok(None) => return None,
            Err(e) => {
                log::warn!("cannot accept a frontend: {e}");
                std::thread::sleep(ACCEPT_RETRY);
                return None;
            }
        };
        match peer_uid(&stream) {
            Ok(uid) if self.gate.admitted.admits(uid) => Some(stream),
            Ok(uid) => {
                evmm_virtio::guest_warn!(
                    "refused a frontend of uid {uid}: the daemon serves {} (--frontend-uid)",
                    self.gate.admitted
                );
                None
            }
            Err(e) => {
                log::warn!("refused a frontend whose credentials cannot be read: {e}");
                None
            }
        }
    }

    /// Serves one admitted frontend until it disconnects, breaks the protocol, misses
    /// the handshake timeout or shutdown is requested. Only a failure to build the
    /// daemon is an error.
    fn serve_connection(&mut self, frontend: UnixStream) -> Result<(), Error> {
        let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        let backend = Arc::new(BlkBackend::new(&self.device));
        let mut daemon = VhostUserDaemon::new(THREAD_NAME.into(), backend.clone(), mem)
            .map_err(|e| Error::Daemon(e.to_string()))?;
        let handlers = daemon.get_epoll_handlers();
        for (thread, fd) in backend.completion_listeners() {
            let handler = handlers
                .get(thread)
                .ok_or_else(|| Error::Daemon(format!("no thread for queue {thread}")))?;
            handler
                .register_listener(fd, EventSet::IN, u64::from(backend.completion_event()))
                .map_err(|e| {
                    Error::Daemon(format!("cannot watch queue {thread}'s completions: {e}"))
                })?;
        }
        // The handlers hold the backend and the connection's vrings: only the daemon's
        // threads may keep them, so that they go when the connection ends.
        drop(handlers);
        let ended = match self.start_relayed(&mut daemon, frontend) {
            Ok((frontend, relay)) => {
                log::info!("frontend connected");
                self.shutdown.track(daemon.shutdown_handle());
                let result = daemon.wait();
                self.shutdown.untrack();
                // Unblocks the relay if it is writing to a frontend that stopped reading.
                let _ = frontend.shutdown(std::net::Shutdown::Both);
                if relay.join().is_err() {
                    log::error!("the relay thread panicked");
                }
                Some(result)
            }
            Err(e) => {
                log::warn!("cannot start serving a frontend: {e}");
                None
            }
        };
        // Stops and joins the connection's worker threads.
        drop(daemon);
        backend.exit_events().close_leaked();
        // The last reference: the queues' engines (io_uring rings and their eventfds)
        // go with it, after waiting for anything still in flight.
        // vhost-user-backend's queue threads let go of the backend (and of the
        // connection's vrings: guest memory, kick and call eventfds) as they exit, which
        // may be a moment after the daemon is dropped: wait for that (bounded), so the
        // connection is wholly gone when its end is logged.
        let since = std::time::Instant::now();
        while Arc::strong_count(&backend) > 1 && since.elapsed() < RELEASE_WAIT {
            std::thread::sleep(Duration::from_millis(1));
        }
        if Arc::strong_count(&backend) > 1 {
            log::warn!("the connection's backend is still referenced {RELEASE_WAIT:?} after its daemon ended");
        }
        drop(backend);
        if let Err(e) = self.device.disk().sync_data() {
            log::error!("fdatasync after the connection failed: {e}");
        }
        // Logged once the connection is wholly gone: the next one starts afresh.
        match ended {
            Some(
                Ok(())
                | Err(DaemonError::HandleRequest(
                    VhostUserError::Disconnected | VhostUserError::PartialMessage,
                )),
            ) => log::info!("frontend disconnected"),
            Some(Err(e)) => log::warn!("frontend connection ended: {e}"),
            None => {}
        }
        Ok(())
    }
}

impl Server {
    /// Hands `frontend` to `daemon` through the relay; returns a handle on the frontend's
    /// socket (to shut it down) and the relay thread.
    fn start_relayed(
        &self,
        daemon: &mut VhostUserDaemon<Arc<BlkBackend>>,
        frontend: UnixStream,
    ) -> Result<(UnixStream, std::thread::JoinHandle<()>), String> {
        let mut private =
            Relay::new().map_err(|e| format!("cannot create the private listener: {e}"))?;
        let backend_end = private.connect().map_err(|e| e.to_string())?;
        daemon
            .start(private.listener())
            .map_err(|e| e.to_string())?;
        drop(private);
        let handle = frontend.try_clone().map_err(|e| e.to_string())?;
        let relay =
            spawn_relay(frontend, backend_end, self.gate.handshake).map_err(|e| e.to_string())?;
        Ok((handle, relay))
    }
}

/// The counters as one line of `queue:key=value` text.
fn counters_line(m: &evmm_virtio::blk::metrics::BlockMetricsSnapshot) -> String {
    m.queues
        .iter()
        .enumerate()
        .map(|(i, q)| {
            format!(
                "q{i}: wakeups={} in={} out={} flush={} interrupts={} suppressed={} malformed={}",
                q.wakeups,
                q.req_in,
                q.req_out,
                q.req_flush,
                q.interrupts,
                q.interrupts_suppressed,
                q.malformed_chains
            )
        })
        .collect::<Vec<_>>()
        .join("; ")
}
