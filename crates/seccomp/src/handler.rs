//! The SIGSYS handler of [`crate::Mode::Kill`]: one line on stderr naming the thread
//! and the syscall, then the process ends.

use std::cell::Cell;
use std::io;
use std::sync::Once;

use crate::rules::ThreadKind;

/// The exit status of a process ended by a forbidden syscall (128 + SIGSYS, what a
/// shell shows for a process killed by SIGSYS).
pub const KILLED_STATUS: i32 = 128 + libc::SIGSYS;

thread_local! {
    /// The kind of filter on this thread, for the report.
    static KIND: Cell<Option<ThreadKind>> = const { Cell::new(None) };
}

/// Records the calling thread's kind for the report.
pub(crate) fn set_thread_kind(kind: ThreadKind) {
    KIND.with(|k| k.set(Some(kind)));
}

static INSTALL: Once = Once::new();

/// Installs the handler once per process.
pub(crate) fn install() -> io::Result<()> {
    let mut result = Ok(());
    INSTALL.call_once(|| {
        // SAFETY: sigaction is plain data; every field the kernel reads is set below.
        let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
        action.sa_sigaction = report_and_exit as *const () as usize;
        action.sa_flags = libc::SA_SIGINFO;
        // SAFETY: `action.sa_mask` is a valid sigset_t to fill.
        unsafe { libc::sigfillset(&mut action.sa_mask) };
        // SAFETY: `action` is fully initialised and the handler only makes
        // async-signal-safe calls.
        if unsafe { libc::sigaction(libc::SIGSYS, &action, std::ptr::null_mut()) } != 0 {
            result = Err(io::Error::last_os_error());
        }
    });
    result
}

/// Where the syscall number sits in a SIGSYS siginfo on x86-64 (`si_syscall`, after
/// the three ints, the padding and `si_call_addr`).
const SI_SYSCALL_OFFSET: usize = 24;

extern "C" fn report_and_exit(
    _: libc::c_int,
    info: *mut libc::siginfo_t,
    context: *mut libc::c_void,
) {
    let nr = if info.is_null() {
        -1
    } else {
        // SAFETY: the kernel passes a full siginfo_t for SIGSYS, whose `si_syscall`
        // field is an int at SI_SYSCALL_OFFSET.
        unsafe {
            info.cast::<u8>()
                .add(SI_SYSCALL_OFFSET)
                .cast::<i32>()
                .read_unaligned()
        }
    };
    let kind = KIND
        .with(|k| k.get())
        .map_or("unconfined", ThreadKind::name);
    let mut line = Line::default();
    line.push(b"seccomp: the ");
    line.push(kind.as_bytes());
    line.push(b" thread made syscall ");
    line.push_number(nr);
    if !context.is_null() {
        // SAFETY: for a SA_SIGINFO handler the third argument is the ucontext_t of
        // the interrupted thread, whose registers hold the syscall's arguments.
        let regs = unsafe { (*context.cast::<libc::ucontext_t>()).uc_mcontext.gregs };
        line.push(b" (");
        line.push_hex(regs[libc::REG_RDI as usize] as u64);
        line.push(b", ");
        line.push_hex(regs[libc::REG_RSI as usize] as u64);
        line.push(b", ...)");
    }
    line.push(b", which its filter forbids; the process ends\n");
    // SAFETY: write and exit_group are async-signal-safe and allowed by every filter.
    unsafe {
        libc::write(libc::STDERR_FILENO, line.buf.as_ptr().cast(), line.len);
        libc::syscall(libc::SYS_exit_group, KILLED_STATUS);
    }
}

/// A fixed buffer a signal handler can format into without allocating.
struct Line {
    buf: [u8; 192],
    len: usize,
}

impl Default for Line {
    fn default() -> Self {
        Line {
            buf: [0; 192],
            len: 0,
        }
    }
}

impl Line {
    fn push(&mut self, bytes: &[u8]) {
        for &b in bytes {
            if self.len < self.buf.len() {
                self.buf[self.len] = b;
                self.len += 1;
            }
        }
    }

    fn push_hex(&mut self, v: u64) {
        self.push(b"0x");
        let digits = b"0123456789abcdef";
        let mut started = false;
        for shift in (0..16).rev() {
            let d = ((v >> (shift * 4)) & 0xf) as usize;
            if d != 0 || started || shift == 0 {
                started = true;
                self.push(&digits[d..d + 1]);
            }
        }
    }

    fn push_number(&mut self, n: i32) {
        if n < 0 {
            self.push(b"-");
        }
        let mut v = n.unsigned_abs();
        let mut digits = [0u8; 10];
        let mut i = digits.len();
        loop {
            i -= 1;
            digits[i] = b'0' + (v % 10) as u8;
            v /= 10;
            if v == 0 {
                break;
            }
        }
        self.push(&digits[i..]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_report_line_formats_numbers_without_allocating() {
        let mut l = Line::default();
        l.push_number(0);
        l.push(b" ");
        l.push_number(435);
        l.push(b" ");
        l.push_number(-1);
        l.push(b" ");
        l.push_hex(0x400454d0);
        l.push(b" ");
        l.push_hex(0);
        assert_eq!(&l.buf[..l.len], b"0 435 -1 0x400454d0 0x0");
        let mut full = Line::default();
        full.push(&[b'x'; 300]);
        assert_eq!(full.len, 192);
    }
}
