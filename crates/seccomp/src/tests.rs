use super::*;
use crate::rules::allows;

#[test]
fn every_kind_compiles_in_both_modes_and_off_installs_nothing() {
    for kind in ThreadKind::ALL {
        for mode in [Mode::Log, Mode::Kill] {
            let program = compile(kind, mode).unwrap().expect("a program");
            assert!(!program.is_empty(), "{kind:?}");
            assert!(program.len() < u16::MAX as usize, "{kind:?}");
        }
        assert!(compile(kind, Mode::Off).unwrap().is_none());
    }
}

#[test]
fn modes_parse_and_print() {
    for mode in [Mode::Off, Mode::Log, Mode::Kill] {
        assert_eq!(mode.to_string().parse::<Mode>(), Ok(mode));
    }
    assert!("strict".parse::<Mode>().is_err());
    assert_eq!(Mode::default(), Mode::Kill);
}

#[test]
fn workers_get_their_jobs_and_no_more() {
    use libc::*;
    // Disk I/O for block workers only.
    assert!(allows(ThreadKind::BlockWorker, SYS_pwritev, 0));
    assert!(allows(ThreadKind::BlockWorker, SYS_fdatasync, 0));
    assert!(!allows(ThreadKind::BlockWorker, SYS_io_uring_enter, 0));
    assert!(allows(ThreadKind::BlockWorkerUring, SYS_io_uring_enter, 0));
    assert!(!allows(ThreadKind::NetWorker, SYS_pwritev, 0));
    assert!(!allows(ThreadKind::Takeover, SYS_pwritev, 0));
    // No worker opens files, makes sockets or starts threads or processes.
    for kind in [
        ThreadKind::BlockWorker,
        ThreadKind::BlockWorkerUring,
        ThreadKind::NetWorker,
        ThreadKind::Takeover,
        ThreadKind::Vcpu,
        ThreadKind::DaemonQueue,
        ThreadKind::DaemonRelay,
        ThreadKind::DaemonSignals,
    ] {
        for nr in [
            SYS_openat, SYS_socket, SYS_execve, SYS_clone, SYS_clone3, SYS_ptrace,
        ] {
            assert!(!allows(kind, nr, 0), "{kind:?} allows {nr}");
        }
    }
    // ioctl is pinned: KVM_RUN for a vCPU, not for a worker; no KVM_CREATE_VM anywhere.
    let kvm_run = 0xae80;
    let kvm_create_vm = 0xae01;
    assert!(allows(ThreadKind::Vcpu, SYS_ioctl, kvm_run));
    assert!(!allows(ThreadKind::BlockWorker, SYS_ioctl, kvm_run));
    for kind in ThreadKind::ALL {
        assert!(!allows(kind, SYS_ioctl, kvm_create_vm), "{kind:?}");
    }
    // The tap's offload ioctl for the net worker, the terminal's for the main thread.
    assert!(allows(ThreadKind::NetWorker, SYS_ioctl, TUNSETOFFLOAD));
    assert!(!allows(ThreadKind::NetWorker, SYS_ioctl, TUNSETIFF));
    assert!(allows(ThreadKind::Main, SYS_ioctl, TCSETS));
    assert!(!allows(ThreadKind::NetWorker, SYS_ioctl, TCSETS));
    // Asking whether stderr is a terminal is allowed everywhere (the logger may).
    for kind in ThreadKind::ALL {
        assert!(allows(kind, SYS_ioctl, TCGETS), "{kind:?}");
    }
}

#[test]
fn a_spawner_allows_everything_its_workers_need() {
    use libc::*;
    let worker_calls = [
        (SYS_pwritev, 0),
        (SYS_io_uring_enter, 0),
        (SYS_writev, 0),
        (SYS_ioctl, TUNSETOFFLOAD),
        (SYS_epoll_pwait, 0),
        (SYS_seccomp, SECCOMP_SET_MODE_FILTER as u64),
    ];
    for (nr, arg) in worker_calls {
        assert!(allows(ThreadKind::Spawner, nr, arg), "{nr}");
    }
    assert!(allows(ThreadKind::Spawner, SYS_clone3, 0));
    assert!(allows(ThreadKind::DaemonMain, SYS_io_uring_setup, 0));
    assert!(allows(ThreadKind::DaemonMain, SYS_recvmsg, 0));
}

/// Runs `child` in a forked process and returns its wait status.
fn in_child(child: impl FnOnce() -> i32) -> i32 {
    // SAFETY: the child only runs `child`, which makes async-signal-safe calls
    // (the filter is compiled before the fork), and then _exits.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork: {}", std::io::Error::last_os_error());
    if pid == 0 {
        let code = child();
        // SAFETY: ends the child without running the parent's atexit handlers.
        unsafe { libc::_exit(code) };
    }
    let mut status = 0;
    // SAFETY: `pid` is our child; `status` is a valid out pointer.
    assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
    status
}

#[test]
fn a_forbidden_syscall_ends_the_process_with_the_kill_status() {
    let program = compile(ThreadKind::Takeover, Mode::Kill).unwrap().unwrap();
    handler::install().unwrap();
    let status = in_child(move || {
        handler::set_thread_kind(ThreadKind::Takeover);
        if seccompiler::apply_filter(&program).is_err() {
            return 2;
        }
        // SAFETY: a plain syscall with no pointers; the filter forbids it.
        unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0) };
        3
    });
    assert!(libc::WIFEXITED(status), "status {status:#x}");
    assert_eq!(libc::WEXITSTATUS(status), KILLED_STATUS);
}

#[test]
fn allowed_syscalls_run_under_the_filter() {
    let program = compile(ThreadKind::Takeover, Mode::Kill).unwrap().unwrap();
    handler::install().unwrap();
    let status = in_child(move || {
        if seccompiler::apply_filter(&program).is_err() {
            return 2;
        }
        // SAFETY: creates an epoll instance, which the takeover may, and closes it.
        let ep = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if ep < 0 {
            return 4;
        }
        // SAFETY: closes the descriptor just created.
        unsafe { libc::close(ep) };
        0
    });
    assert!(libc::WIFEXITED(status), "status {status:#x}");
    assert_eq!(libc::WEXITSTATUS(status), 0);
}

#[test]
fn in_log_mode_a_forbidden_syscall_runs() {
    let program = compile(ThreadKind::Takeover, Mode::Log).unwrap().unwrap();
    let status = in_child(move || {
        if seccompiler::apply_filter(&program).is_err() {
            return 2;
        }
        // SAFETY: a plain syscall; the log filter lets it run.
        let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0) };
        if fd < 0 {
            5
        } else {
            0
        }
    });
    assert!(libc::WIFEXITED(status), "status {status:#x}");
    assert_eq!(libc::WEXITSTATUS(status), 0);
}
