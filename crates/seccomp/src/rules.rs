//! The allow list of each kind of thread.
//!
//! The lists are built from groups (what every Rust thread needs, epoll, disk I/O,
//! ...); ioctl and a few other multiplexed calls are allowed only with the request
//! numbers (or commands) the thread uses.

use std::collections::BTreeMap;

use seccompiler::{BackendError, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompRule};

/// A kind of thread, each with its own filter.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ThreadKind {
    /// evmm's main thread once the VM is built: the event loop (signals, console
    /// input, the exit event), stopping the vCPUs, writing `--metrics`, tearing down.
    Main,
    /// A vCPU: KVM_RUN and the exits it handles, which include a device's activation
    /// and reset (vhost-user messages, vhost-net and tap ioctls).
    Vcpu,
    /// The thread that starts device workers: thread creation, plus everything the
    /// workers it starts need (they inherit its filter, then narrow themselves).
    Spawner,
    /// A virtio-blk worker with the synchronous engine.
    BlockWorker,
    /// A virtio-blk worker with the io_uring engine.
    BlockWorkerUring,
    /// A virtio-net worker: its tap and its eventfds.
    NetWorker,
    /// The stand-in that fails a lost vhost-user backend's requests.
    Takeover,
    /// The watcher of a vhost-user backend's socket, which starts the takeover.
    BackendMonitor,
    /// The thread that runs a vhost-user device's activations (the messages that
    /// hand the backend guest memory and the rings), and the takeover if they fail.
    BackendControl,
    /// evmm-vhost-user-blk's main thread: accepting frontends and starting the
    /// threads that serve them (so it allows what they need), flushing the disk.
    DaemonMain,
    /// evmm-vhost-user-blk's signal thread.
    DaemonSignals,
    /// evmm-vhost-user-blk's relay between a frontend and the protocol thread.
    DaemonRelay,
    /// evmm-vhost-user-blk's vhost-user protocol thread (memory tables, vrings).
    DaemonFrontend,
    /// A thread serving one of evmm-vhost-user-blk's queues (either engine).
    DaemonQueue,
}

impl ThreadKind {
    /// The kind's name in reports.
    pub fn name(self) -> &'static str {
        match self {
            ThreadKind::Main => "main",
            ThreadKind::Vcpu => "vCPU",
            ThreadKind::Spawner => "worker spawner",
            ThreadKind::BlockWorker => "virtio-blk worker",
            ThreadKind::BlockWorkerUring => "virtio-blk worker (io_uring)",
            ThreadKind::NetWorker => "virtio-net worker",
            ThreadKind::Takeover => "vhost-user takeover",
            ThreadKind::BackendMonitor => "vhost-user backend monitor",
            ThreadKind::BackendControl => "vhost-user backend control",
            ThreadKind::DaemonMain => "daemon main",
            ThreadKind::DaemonSignals => "daemon signal",
            ThreadKind::DaemonRelay => "daemon relay",
            ThreadKind::DaemonFrontend => "daemon vhost-user protocol",
            ThreadKind::DaemonQueue => "daemon queue",
        }
    }

    /// Every kind.
    pub const ALL: [ThreadKind; 14] = [
        ThreadKind::Main,
        ThreadKind::Vcpu,
        ThreadKind::Spawner,
        ThreadKind::BlockWorker,
        ThreadKind::BlockWorkerUring,
        ThreadKind::NetWorker,
        ThreadKind::Takeover,
        ThreadKind::BackendMonitor,
        ThreadKind::BackendControl,
        ThreadKind::DaemonMain,
        ThreadKind::DaemonSignals,
        ThreadKind::DaemonRelay,
        ThreadKind::DaemonFrontend,
        ThreadKind::DaemonQueue,
    ];
}

/// One allowed syscall: always, or only with one of these values of an argument.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Allow {
    Always(i64),
    /// The syscall, the argument index, the values allowed.
    ArgIn(i64, u8, Vec<u64>),
    /// The syscall, the argument index, a mask and the value the masked argument must have.
    ArgMasked(i64, u8, u64, u64),
}

use libc::*;

/// What every thread of a Rust program needs: memory, futexes, signals returning,
/// thread exit, clocks, logging to stderr, closing what it owns.
const RUNTIME: &[i64] = &[
    SYS_read,
    SYS_write,
    SYS_close,
    SYS_futex,
    SYS_mmap,
    SYS_munmap,
    SYS_mprotect,
    SYS_madvise,
    SYS_mremap,
    SYS_brk,
    SYS_rt_sigprocmask,
    SYS_rt_sigreturn,
    SYS_sigaltstack,
    SYS_exit,
    SYS_exit_group,
    SYS_sched_yield,
    SYS_clock_gettime,
    SYS_clock_nanosleep,
    SYS_nanosleep,
    SYS_gettid,
    SYS_getpid,
    SYS_getrandom,
    SYS_restart_syscall,
    SYS_rseq,
];

const EPOLL: &[i64] = &[
    SYS_epoll_create1,
    SYS_epoll_ctl,
    SYS_epoll_wait,
    SYS_epoll_pwait,
    SYS_epoll_pwait2,
    SYS_poll,
    SYS_ppoll,
];

/// New eventfds and duplicates of descriptors.
const DESCRIPTORS: &[i64] = &[SYS_eventfd2, SYS_dup, SYS_dup3];

const DISK_IO: &[i64] = &[
    SYS_pread64,
    SYS_pwrite64,
    SYS_preadv,
    SYS_pwritev,
    SYS_preadv2,
    SYS_pwritev2,
    SYS_fdatasync,
    SYS_fsync,
    SYS_fallocate,
    SYS_lseek,
];

const URING: &[i64] = &[SYS_io_uring_enter, SYS_io_uring_register];

const PACKETS: &[i64] = &[SYS_readv, SYS_writev];

const MESSAGES: &[i64] = &[
    SYS_sendmsg,
    SYS_recvmsg,
    SYS_sendto,
    SYS_recvfrom,
    SYS_shutdown,
];

/// Files by name: `--metrics` (a temporary file renamed into place), the daemon's
/// private relay directory and socket.
const FILES: &[i64] = &[
    SYS_openat,
    SYS_fstat,
    SYS_newfstatat,
    SYS_statx,
    SYS_fchmod,
    SYS_fchmodat,
    SYS_rename,
    SYS_renameat,
    SYS_renameat2,
    SYS_linkat,
    SYS_unlink,
    SYS_unlinkat,
    SYS_mkdir,
    SYS_mkdirat,
    SYS_rmdir,
    SYS_getdents64,
    SYS_readlink,
    SYS_readlinkat,
    SYS_getcwd,
    SYS_umask,
];

const THREADS: &[i64] = &[
    SYS_clone,
    SYS_clone3,
    SYS_set_robust_list,
    SYS_sched_getaffinity,
];

/// `_IOC` of asm-generic/ioctl.h.
const fn ioc(dir: u64, ty: u64, nr: u64, size: u64) -> u64 {
    (dir << 30) | (size << 16) | (ty << 8) | nr
}
const IOC_WRITE: u64 = 1;
const IOC_READ: u64 = 2;
const KVMIO: u64 = 0xae;
const KVM_RUN: u64 = ioc(0, KVMIO, 0x80, 0);
/// With `struct kvm_regs` (144 bytes): read on a KVM internal error and a triple fault.
const KVM_GET_REGS: u64 = ioc(IOC_READ, KVMIO, 0x81, 144);
/// With `struct kvm_sregs` (312 bytes): read on a triple fault.
const KVM_GET_SREGS: u64 = ioc(IOC_READ, KVMIO, 0x83, 312);
/// With `struct kvm_vcpu_events` (64 bytes): read on a triple fault.
const KVM_GET_VCPU_EVENTS: u64 = ioc(IOC_READ, KVMIO, 0x9f, 64);
/// With `struct kvm_irqfd` (32 bytes).
const KVM_IRQFD: u64 = ioc(IOC_WRITE, KVMIO, 0x76, 32);
/// With `struct kvm_ioeventfd` (64 bytes).
const KVM_IOEVENTFD: u64 = ioc(IOC_WRITE, KVMIO, 0x79, 64);
/// The vhost ioctls' type byte (`VHOST_VIRTIO`).
const VHOST_TYPE: u64 = 0xaf;

const TERMINAL: [u64; 5] = [TCGETS, TCSETS, TCSETSW, TCSETSF, TIOCGWINSZ];
const TAP: [u64; 3] = [TUNSETOFFLOAD, TUNSETVNETHDRSZ, TUNSETQUEUE];

fn always(list: &[i64]) -> impl Iterator<Item = Allow> + '_ {
    list.iter().map(|&nr| Allow::Always(nr))
}

fn ioctls(values: &[u64]) -> Allow {
    Allow::ArgIn(SYS_ioctl, 1, values.to_vec())
}

fn vhost_ioctls() -> Allow {
    Allow::ArgMasked(SYS_ioctl, 1, 0xff00, VHOST_TYPE << 8)
}

/// fcntl's descriptor-flag commands, and the ioctls that do the same (std sets a
/// socket non-blocking with FIONBIO).
fn descriptor_flags() -> [Allow; 2] {
    [
        Allow::ArgIn(
            SYS_fcntl,
            1,
            [F_DUPFD_CLOEXEC, F_GETFD, F_SETFD, F_GETFL, F_SETFL]
                .map(|c| c as u64)
                .to_vec(),
        ),
        ioctls(&[FIONBIO, FIOCLEX, FIONCLEX]),
    ]
}

/// What installing a filter on itself needs (a worker narrowing itself).
fn self_confinement() -> Vec<Allow> {
    vec![
        Allow::ArgIn(SYS_seccomp, 0, vec![SECCOMP_SET_MODE_FILTER as u64]),
        Allow::ArgIn(
            SYS_prctl,
            0,
            vec![PR_SET_NO_NEW_PRIVS as u64, PR_SET_NAME as u64],
        ),
    ]
}

/// The allow list of `kind`.
fn allowed(kind: ThreadKind) -> Vec<Allow> {
    let mut v: Vec<Allow> = always(RUNTIME).collect();
    // Whether stderr is a terminal, which the logger may ask before a line (seen from
    // a net worker whose stderr was the console).
    v.push(ioctls(&[TCGETS]));
    match kind {
        ThreadKind::Main => {
            v.extend(always(EPOLL));
            v.extend(always(DESCRIPTORS));
            v.extend(always(FILES));
            v.extend(always(MESSAGES));
            v.extend(always(&[SYS_tgkill, SYS_fdatasync, SYS_fsync]));
            v.extend(descriptor_flags());
            let mut ioctl = TERMINAL.to_vec();
            ioctl.extend([KVM_IRQFD, KVM_IOEVENTFD]);
            v.push(ioctls(&ioctl));
            v.push(vhost_ioctls());
        }
        ThreadKind::Vcpu => {
            v.extend(always(EPOLL));
            v.extend(always(DESCRIPTORS));
            v.extend(always(MESSAGES));
            v.extend(always(&[SYS_io_uring_setup, SYS_io_uring_register]));
            v.extend(descriptor_flags());
            let mut ioctl = vec![KVM_RUN, KVM_GET_REGS, KVM_GET_SREGS, KVM_GET_VCPU_EVENTS];
            ioctl.extend(TAP);
            v.push(ioctls(&ioctl));
            v.push(vhost_ioctls());
        }
        ThreadKind::Spawner => {
            v.extend(always(THREADS));
            v.extend(self_confinement());
            for worker in [
                ThreadKind::BlockWorkerUring,
                ThreadKind::NetWorker,
                ThreadKind::Takeover,
                ThreadKind::BackendMonitor,
                ThreadKind::BackendControl,
            ] {
                v.extend(allowed(worker));
            }
        }
        ThreadKind::BlockWorker | ThreadKind::BlockWorkerUring => {
            v.extend(always(EPOLL));
            v.extend(always(DISK_IO));
            if kind == ThreadKind::BlockWorkerUring {
                v.extend(always(URING));
            }
        }
        ThreadKind::NetWorker => {
            v.extend(always(EPOLL));
            v.extend(always(PACKETS));
            v.extend(descriptor_flags());
            v.push(ioctls(&TAP));
        }
        ThreadKind::Takeover => {
            v.extend(always(EPOLL));
        }
        ThreadKind::BackendMonitor | ThreadKind::BackendControl => {
            v.extend(always(EPOLL));
            v.extend(always(DESCRIPTORS));
            v.extend(always(MESSAGES));
            v.extend(descriptor_flags());
        }
        ThreadKind::DaemonMain => {
            v.extend(always(EPOLL));
            v.extend(always(DESCRIPTORS));
            v.extend(always(FILES));
            v.extend(always(THREADS));
            v.extend(always(&[
                SYS_socket,
                SYS_bind,
                SYS_listen,
                SYS_accept4,
                SYS_connect,
                SYS_getsockopt,
            ]));
            v.extend(descriptor_flags());
            v.extend(self_confinement());
            for child in [
                ThreadKind::DaemonRelay,
                ThreadKind::DaemonFrontend,
                ThreadKind::DaemonQueue,
            ] {
                v.extend(allowed(child));
            }
        }
        ThreadKind::DaemonSignals => {
            // Waits for a signal, then wakes the accept loop (an eventfd) and shuts the
            // connection's socket down.
            v.extend(always(&[SYS_rt_sigtimedwait, SYS_shutdown]));
        }
        ThreadKind::DaemonRelay => {
            v.extend(always(EPOLL));
            v.extend(always(MESSAGES));
            v.push(Allow::Always(SYS_setsockopt));
            v.extend(descriptor_flags());
        }
        ThreadKind::DaemonFrontend => {
            v.extend(always(EPOLL));
            v.extend(always(DESCRIPTORS));
            v.extend(always(MESSAGES));
            v.extend(always(&[SYS_fstat, SYS_newfstatat, SYS_statx]));
            v.push(Allow::ArgIn(
                SYS_fcntl,
                1,
                [
                    F_DUPFD_CLOEXEC,
                    F_GETFD,
                    F_SETFD,
                    F_GETFL,
                    F_SETFL,
                    F_GET_SEALS,
                ]
                .map(|c| c as u64)
                .to_vec(),
            ));
            v.extend(self_confinement());
        }
        ThreadKind::DaemonQueue => {
            v.extend(always(EPOLL));
            v.extend(always(DISK_IO));
            v.extend(always(URING));
            v.extend(always(DESCRIPTORS));
            v.push(Allow::Always(SYS_io_uring_setup));
            v.extend(self_confinement());
        }
    }
    v
}

/// The seccompiler rules of `kind`: each syscall with no conditions (always allowed)
/// or with the alternatives its argument may take.
pub(crate) fn rules(kind: ThreadKind) -> Result<BTreeMap<i64, Vec<SeccompRule>>, BackendError> {
    let mut always_allowed = std::collections::BTreeSet::new();
    let mut conditional: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    for allow in allowed(kind) {
        match allow {
            Allow::Always(nr) => {
                always_allowed.insert(nr);
            }
            Allow::ArgIn(nr, arg, values) => {
                let rules = conditional.entry(nr).or_default();
                for value in values {
                    let cond = SeccompCondition::new(
                        arg,
                        SeccompCmpArgLen::Qword,
                        SeccompCmpOp::Eq,
                        value,
                    )?;
                    let rule = SeccompRule::new(vec![cond])?;
                    if !rules.contains(&rule) {
                        rules.push(rule);
                    }
                }
            }
            Allow::ArgMasked(nr, arg, mask, value) => {
                let cond = SeccompCondition::new(
                    arg,
                    SeccompCmpArgLen::Qword,
                    SeccompCmpOp::MaskedEq(mask),
                    value,
                )?;
                let rule = SeccompRule::new(vec![cond])?;
                let rules = conditional.entry(nr).or_default();
                if !rules.contains(&rule) {
                    rules.push(rule);
                }
            }
        }
    }
    let mut map = conditional;
    for nr in always_allowed {
        // Allowed whatever the arguments: any condition on it is moot.
        map.insert(nr, Vec::new());
    }
    Ok(map)
}

/// Whether `kind`'s list allows syscall `nr` with `arg` as the argument conditions
/// look at (for the tests: `arg` is ignored for unconditional syscalls).
#[cfg(test)]
pub(crate) fn allows(kind: ThreadKind, nr: i64, arg: u64) -> bool {
    allowed(kind).iter().any(|a| match a {
        Allow::Always(n) => *n == nr,
        Allow::ArgIn(n, _, values) => *n == nr && values.contains(&arg),
        Allow::ArgMasked(n, _, mask, value) => *n == nr && arg & mask == *value,
    })
}
