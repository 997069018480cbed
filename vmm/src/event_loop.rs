//! The main thread's loop while the vCPUs run: console input from stdin to
//! the UART, stop signals, and the VM exit event.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::Mutex;

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use crate::devices::serial::SerialDevice;
use crate::exit::{ExitReason, VmExit};
use crate::signals::StopSignals;

const STDIN_FD: i32 = libc::STDIN_FILENO;
/// How often to retry stdin while the UART's receive FIFO is full (ms).
const FIFO_FULL_RETRY_MS: i32 = 20;

/// Event sources of the loop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Token {
    Exit = 1,
    Signal = 2,
    Stdin = 3,
}

impl Token {
    fn from_data(data: u64) -> Option<Self> {
        [Token::Exit, Token::Signal, Token::Stdin]
            .into_iter()
            .find(|t| *t as u64 == data)
    }
}

fn add(epoll: &Epoll, fd: i32, token: Token) -> io::Result<()> {
    epoll.ctl(
        ControlOperation::Add,
        fd,
        EpollEvent::new(EventSet::IN, token as u64),
    )
}

fn remove_stdin(epoll: &Epoll) {
    let _ = epoll.ctl(ControlOperation::Delete, STDIN_FD, EpollEvent::default());
}

/// Runs until the VM is asked to stop. `console_input` says whether stdin
/// is forwarded to the guest's UART.
pub fn run(
    exit: &VmExit,
    serial: &Mutex<SerialDevice>,
    signals: &mut StopSignals,
    console_input: bool,
) -> io::Result<()> {
    let epoll = Epoll::new()?;
    add(&epoll, exit.eventfd().as_raw_fd(), Token::Exit)?;
    add(&epoll, signals.as_raw_fd(), Token::Signal)?;
    let mut stdin_polled = false;
    if console_input {
        match add(&epoll, STDIN_FD, Token::Stdin) {
            Ok(()) => stdin_polled = true,
            // Regular files and /dev/null cannot be polled: no input then.
            Err(e) => log::debug!("stdin not forwarded to the guest: {e}"),
        }
    }
    let mut stdin_paused = false;
    let mut events = vec![EpollEvent::default(); 8];

    while !exit.is_stopping() {
        if stdin_paused && lock(serial).input_capacity() > 0 {
            add(&epoll, STDIN_FD, Token::Stdin)?;
            stdin_paused = false;
            stdin_polled = true;
        }
        let timeout = if stdin_paused { FIFO_FULL_RETRY_MS } else { -1 };
        let n = match epoll.wait(timeout, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        for ev in &events[..n] {
            match Token::from_data(ev.data()) {
                Some(Token::Exit) => {
                    let _ = exit.eventfd().read();
                }
                Some(Token::Signal) => {
                    while let Some(signo) = signals.read()? {
                        exit.request(ExitReason::Signal(signo));
                    }
                }
                Some(Token::Stdin) if stdin_polled => match forward_stdin(serial) {
                    StdinState::Open => {}
                    StdinState::FifoFull => {
                        remove_stdin(&epoll);
                        stdin_polled = false;
                        stdin_paused = true;
                    }
                    StdinState::Closed => {
                        remove_stdin(&epoll);
                        stdin_polled = false;
                    }
                },
                _ => {}
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
