//! SIGTERM and SIGINT: blocked in every thread and taken by one thread with
//! sigwait(), which turns them into a [`Shutdown`] request. No async-signal-safety
//! concerns: nothing runs in a signal handler.

use crate::shutdown::Shutdown;
use std::io;
use std::sync::Arc;

/// The signals that stop the daemon.
const TERMINATING: [libc::c_int; 2] = [libc::SIGTERM, libc::SIGINT];

fn terminating_set() -> io::Result<libc::sigset_t> {
    // SAFETY: sigset_t is plain data; sigemptyset initialises it before any use.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid, writable sigset_t.
    if unsafe { libc::sigemptyset(&mut set) } != 0 {
        return Err(io::Error::last_os_error());
    }
    for sig in TERMINATING {
        // SAFETY: `set` is an initialised sigset_t and `sig` a valid signal number.
        if unsafe { libc::sigaddset(&mut set, sig) } != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(set)
}

/// Blocks SIGTERM and SIGINT in the calling thread and in every thread it starts
/// from now on. Call before any thread is spawned.
pub fn block_terminating_signals() -> io::Result<()> {
    let set = terminating_set()?;
    // SAFETY: `set` is an initialised sigset_t; the old mask is not asked for.
    let r = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if r != 0 {
        return Err(io::Error::from_raw_os_error(r));
    }
    Ok(())
}

/// Starts the thread that waits for SIGTERM/SIGINT and requests shutdown on each.
/// The thread confines itself to its seccomp filter in `seccomp` mode first.
pub fn spawn_signal_thread(shutdown: Arc<Shutdown>, seccomp: evmm_seccomp::Mode) -> io::Result<()> {
    let set = terminating_set()?;
    std::thread::Builder::new()
        .name("evmm-vu-signals".into())
        .spawn(move || {
            if let Err(e) = evmm_seccomp::confine(evmm_seccomp::ThreadKind::DaemonSignals, seccomp)
            {
                log::error!("{e}; stop signals are not handled");
                return;
            }
            signal_loop(&set, &shutdown)
        })?;
    Ok(())
}

/// Waits for the signals of `set` and requests shutdown on each.
fn signal_loop(set: &libc::sigset_t, shutdown: &Shutdown) {
    loop {
        let mut sig: libc::c_int = 0;
        // SAFETY: `set` is an initialised sigset_t and `sig` a valid out pointer;
        // both live for the whole call.
        let r = unsafe { libc::sigwait(set, &mut sig) };
        if r != 0 {
            log::error!("sigwait failed: {}", io::Error::from_raw_os_error(r));
            return;
        }
        log::info!("signal {sig} received: shutting down");
        shutdown.request();
    }
}
