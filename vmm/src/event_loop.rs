//! The main thread's loop while the vCPUs run: console input from stdin to
//! the UART, stop signals, and the VM exit event.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::Mutex;
use std::time::Duration;

use evmm_virtio::epoll::{EpollHelper, FixedToken};

use crate::devices::serial::SerialDevice;
use crate::signals::StopSignals;
use crate::vstate::exit::{ExitReason, VmExit};

const STDIN_FD: i32 = libc::STDIN_FILENO;
/// How often a full UART receive FIFO is looked at again.
const FIFO_FULL_RETRY: Duration = Duration::from_millis(20);

/// What woke the main loop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Token {
    Exit,
    Signal,
    Stdin,
}

impl FixedToken for Token {
    const ALL: &'static [Self] = &[Token::Exit, Token::Signal, Token::Stdin];
}

/// Runs until a stop is requested: forwards stdin to the UART (when
/// `console_input`), turns stop signals into an exit request, and wakes on the
/// VM's exit event.
pub fn run(
    exit: &VmExit,
    serial: &Mutex<SerialDevice>,
    signals: &mut StopSignals,
    console_input: bool,
) -> io::Result<()> {
    let mut epoll = EpollHelper::new(8)?;
    epoll.add(exit.eventfd().as_raw_fd(), Token::Exit)?;
    epoll.add(signals.as_raw_fd(), Token::Signal)?;
    let mut stdin_polled = false;
    if console_input {
        match epoll.add(STDIN_FD, Token::Stdin) {
            Ok(()) => stdin_polled = true,
            Err(e) => log::debug!("stdin not forwarded to the guest: {e}"),
        }
    }
    let mut stdin_paused = false;
    let mut ready = Vec::with_capacity(3);

    while !exit.is_stopping() {
        if stdin_paused && lock(serial).input_capacity() > 0 {
            epoll.add(STDIN_FD, Token::Stdin)?;
            stdin_paused = false;
            stdin_polled = true;
        }
        let timeout = stdin_paused.then_some(FIFO_FULL_RETRY);
        epoll.wait(timeout, &mut ready)?;
        for &token in &ready {
            match token {
                Token::Exit => {
                    let _ = exit.eventfd().read();
                }
                Token::Signal => {
                    while let Some(signo) = signals.read()? {
                        exit.request(ExitReason::Signal(signo));
                    }
                }
                Token::Stdin if stdin_polled => match forward_stdin(serial) {
                    StdinState::Open => {}
                    StdinState::FifoFull => {
                        let _ = epoll.remove(STDIN_FD);
                        stdin_polled = false;
                        stdin_paused = true;
                    }
                    StdinState::Closed => {
                        let _ = epoll.remove(STDIN_FD);
                        stdin_polled = false;
                    }
                },
                Token::Stdin => {}
            }
        }
    }
    Ok(())
}

fn lock(serial: &Mutex<SerialDevice>) -> std::sync::MutexGuard<'_, SerialDevice> {
    serial.lock().unwrap_or_else(|e| e.into_inner())
}

enum StdinState {
    Open,
    FifoFull,
    Closed,
}

/// Moves as many bytes from stdin as the UART's FIFO takes.
fn forward_stdin(serial: &Mutex<SerialDevice>) -> StdinState {
    let capacity = lock(serial).input_capacity();
    if capacity == 0 {
        return StdinState::FifoFull;
    }
    let mut buf = [0u8; 64];
    let len = capacity.min(buf.len());
    // SAFETY: the buffer is valid for `len` bytes.
    let n = unsafe { libc::read(STDIN_FD, buf.as_mut_ptr().cast(), len) };
    match n {
        0 => StdinState::Closed,
        n if n > 0 => {
            lock(serial).enqueue_input(&buf[..n as usize]);
            StdinState::Open
        }
        _ => {
            let err = io::Error::last_os_error();
            match err.kind() {
                io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => StdinState::Open,
                _ => {
                    log::warn!("stdin: {err}; console input stopped");
                    StdinState::Closed
                }
            }
        }
    }
}
