//! Process level (the evmm binary, no guest): the evmm binary rejects bad input with one `error: ...` line and a
//! non-zero status, before touching KVM where possible.

use std::process::{Command, Output};

fn evmm(args: &[&str], env: &[(&str, &str)]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_evmm"))
        .args(args)
        .envs(env.iter().copied())
        .output()
        .expect("run evmm")
}

/// A file with a valid bzImage header magic but nothing behind it.
fn fake_bzimage(dir: &tempfile::TempDir) -> String {
    let mut img = vec![0u8; 0x1000];
    img[0x1f1] = 4; // setup_sects
    img[0x202..0x206].copy_from_slice(b"HdrS");
    let path = dir.path().join("bz");
    std::fs::write(&path, img).unwrap();
    path.to_string_lossy().into_owned()
}

/// The smallest ELF evmm loads: a header and one 1-byte PT_LOAD (`hlt`)
/// at 1 MiB.
fn tiny_elf(dir: &tempfile::TempDir) -> String {
    let mut f = Vec::new();
    f.extend_from_slice(b"\x7fELF\x02\x01\x01\0\0\0\0\0\0\0\0\0");
    f.extend_from_slice(&2u16.to_le_bytes());
    f.extend_from_slice(&0x3eu16.to_le_bytes());
    f.extend_from_slice(&1u32.to_le_bytes());
    f.extend_from_slice(&0x10_0000u64.to_le_bytes());
    f.extend_from_slice(&64u64.to_le_bytes());
    f.extend_from_slice(&0u64.to_le_bytes());
    f.extend_from_slice(&0u32.to_le_bytes());
    for v in [64u16, 56, 1, 64, 0, 0] {
        f.extend_from_slice(&v.to_le_bytes());
    }
    f.extend_from_slice(&1u32.to_le_bytes());
    f.extend_from_slice(&5u32.to_le_bytes());
    for v in [0x1000u64, 0x10_0000, 0x10_0000, 1, 1, 0x1000] {
        f.extend_from_slice(&v.to_le_bytes());
    }
    f.resize(0x1001, 0xf4);
    let path = dir.path().join("tiny-elf");
    std::fs::write(&path, f).unwrap();
    path.to_string_lossy().into_owned()
}

fn assert_error(out: &Output, status: i32, needle: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(status), "stderr: {stderr}");
    assert!(stderr.starts_with("error: "), "stderr: {stderr}");
    assert!(stderr.contains(needle), "{needle:?} not in {stderr:?}");
    assert!(!stderr.contains("panicked"), "stderr: {stderr}");
    if status == 1 {
        assert_eq!(stderr.lines().count(), 1, "stderr: {stderr}");
    }
    assert!(out.stdout.is_empty());
}

#[test]
fn missing_kernel() {
    let out = evmm(&["--kernel", "/nonexistent/vmlinuz"], &[]);
    assert_error(&out, 1, "cannot read kernel /nonexistent/vmlinuz");
}

#[test]
fn unreadable_kernel_is_a_directory() {
    let out = evmm(&["--kernel", "/"], &[]);
    assert_error(&out, 1, "cannot read kernel /");
}

#[test]
fn file_that_is_no_kernel() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notes.txt");
    std::fs::write(&path, "just text\n").unwrap();
    let out = evmm(&["--kernel", path.to_str().unwrap()], &[]);
    assert_error(&out, 1, "is not a kernel image");
}

#[test]
fn truncated_bzimage() {
    let dir = tempfile::tempdir().unwrap();
    let out = evmm(&["--kernel", &fake_bzimage(&dir)], &[]);
    assert_error(&out, 1, "kernel");
}

#[test]
fn initramfs_that_does_not_fit() {
    let dir = tempfile::tempdir().unwrap();
    let elf = tiny_elf(&dir);
    let initrd = dir.path().join("initrd");
    let file = std::fs::File::create(&initrd).unwrap();
    file.set_len(40 << 20).unwrap();
    let out = evmm(
        &[
            "--kernel",
            &elf,
            "--initramfs",
            initrd.to_str().unwrap(),
            "--memory",
            "32",
        ],
        &[],
    );
    assert_error(&out, 1, "does not fit in guest memory");
}

#[test]
fn missing_initramfs() {
    let dir = tempfile::tempdir().unwrap();
    let out = evmm(
        &[
            "--kernel",
            &tiny_elf(&dir),
            "--initramfs",
            "/nonexistent/initrd",
        ],
        &[],
    );
    assert_error(&out, 1, "cannot read initramfs /nonexistent/initrd");
}

#[test]
fn zero_memory() {
    let out = evmm(&["--kernel", "/k", "--memory", "0"], &[]);
    assert_error(&out, 1, "--memory 0 MiB is too small");
}

#[test]
fn memory_beyond_the_host() {
    let out = evmm(&["--kernel", "/k", "--memory", "100000000"], &[]);
    assert_error(&out, 1, "more than the host's physical memory");
}

#[test]
fn zero_vcpus() {
    let out = evmm(&["--kernel", "/k", "--cpus", "0"], &[]);
    assert_error(&out, 1, "--cpus must be at least 1");
}

#[test]
fn unknown_flag() {
    let out = evmm(&["--kernel", "/k", "--frobnicate"], &[]);
    assert_error(&out, 2, "unexpected argument '--frobnicate'");
}

#[test]
fn no_kvm_device() {
    let dir = tempfile::tempdir().unwrap();
    let k = tiny_elf(&dir);
    let out = evmm(
        &["--kernel", &k],
        &[("EVMM_KVM_DEVICE", "/nonexistent/kvm")],
    );
    assert_error(&out, 1, "cannot open /nonexistent/kvm");
    // No permission on the real /dev/kvm (mode 0600, owned by root): run evmm as
    // the unprivileged user "nobody", through setpriv when this test runs as root.
    // SAFETY: geteuid has no preconditions and touches no memory.
    let euid = unsafe { libc::geteuid() };
    let mut cmd = if euid == 0 {
        let mut c = Command::new("setpriv");
        c.args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(env!("CARGO_BIN_EXE_evmm"));
        c
    } else {
        Command::new(env!("CARGO_BIN_EXE_evmm"))
    };
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&k, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = cmd
        .args(["--kernel", &k])
        .output()
        .expect("setpriv (util-linux) runs evmm as an unprivileged user");
    assert_error(&out, 1, "Permission denied");
}

#[test]
fn command_line_too_long() {
    let dir = tempfile::tempdir().unwrap();
    let long = "x".repeat(3000);
    let out = evmm(&["--kernel", &tiny_elf(&dir), "--cmdline", &long], &[]);
    assert_error(
        &out,
        1,
        "--cmdline is 3000 bytes; this kernel accepts at most 2047",
    );
}

#[test]
fn help_exits_0() {
    let out = evmm(&["--help"], &[]);
    assert_eq!(out.status.code(), Some(0));
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(
        help.contains("Usage: evmm [OPTIONS] --kernel <PATH>"),
        "{help}"
    );
    assert!(help.contains("[default: 512]"), "{help}");
}

#[test]
fn vhost_user_blk_socket_missing() {
    let dir = tempfile::tempdir().unwrap();
    let out = evmm(
        &[
            "--kernel",
            &tiny_elf(&dir),
            "--vhost-user-blk",
            "socket=/nonexistent",
        ],
        &[],
    );
    assert_error(
        &out,
        1,
        "--vhost-user-blk socket=/nonexistent: cannot connect to /nonexistent: \
         No such file or directory (os error 2) (no such socket: is the backend running?)",
    );
}

#[test]
fn vhost_user_blk_socket_nobody_listens_on() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&sock).unwrap());
    let spec = format!("socket={}", sock.display());
    let out = evmm(
        &["--kernel", &tiny_elf(&dir), "--vhost-user-blk", &spec],
        &[],
    );
    assert_error(&out, 1, "Connection refused");
    assert_error(&out, 1, "nobody listens on it");
}

#[test]
fn vhost_user_blk_bad_spec() {
    let out = evmm(
        &["--kernel", "/k", "--vhost-user-blk", "socket=/s,queues=0"],
        &[],
    );
    assert_error(
        &out,
        1,
        "--vhost-user-blk socket=/s,queues=0: queues=0: expected a number from 1 to 16",
    );
    let out = evmm(&["--kernel", "/k", "--vhost-user-blk", "path=/s"], &[]);
    assert_error(&out, 1, "unknown key 'path' (known: socket, queues)");
}

/// Runs `evmm --kernel K ARGS...` in a network namespace of its own (nothing is
/// created in this machine's), after `setup` (shell commands) there, with `wrapper`
/// (e.g. setpriv) in front of evmm.
fn evmm_in_netns(setup: &str, wrapper: &[&str], args: &[&str]) -> Output {
    let dir = tempfile::tempdir().unwrap();
    let k = tiny_elf(&dir);
    let script = format!("set -e; {setup}; exec \"$@\"");
    Command::new("unshare")
        .args(["--net", "sh", "-c", &script, "sh"])
        .args(wrapper)
        .arg(env!("CARGO_BIN_EXE_evmm"))
        .args(["--kernel", &k])
        .args(args)
        .output()
        .expect("unshare (util-linux) runs evmm in a network namespace of its own")
}

#[test]
fn net_bad_spec() {
    for (spec, why) in [
        ("tap=t0,mac=52:54:00:12:34", "a unicast MAC"),
        ("tap=t0,queues=0", "queues=0: queue pairs, 1 to 8"),
        ("tap=t0,queues=9", "queues=9: queue pairs, 1 to 8"),
        ("fd=3,tap=t0", "tap=NAME or as fd=N"),
    ] {
        let out = evmm(&["--kernel", "/k", "--net", spec], &[]);
        assert_error(&out, 1, &format!("--net {spec}: "));
        assert_error(&out, 1, why);
    }
}

#[test]
fn net_fd_that_is_no_tap() {
    let dir = tempfile::tempdir().unwrap();
    let k = tiny_elf(&dir);
    // Descriptor 0 is /dev/null here.
    let out = Command::new(env!("CARGO_BIN_EXE_evmm"))
        .args(["--kernel", &k, "--net", "fd=0"])
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert_error(&out, 1, "--net fd=0: fd 0: not a tap");
}

#[test]
fn net_no_such_tap_and_no_right_to_create_it() {
    // Root without CAP_NET_ADMIN: /dev/net/tun opens, creating the tap is refused.
    let out = evmm_in_netns(
        "true",
        &[
            "setpriv",
            "--bounding-set=-net_admin",
            "--inh-caps=-net_admin",
        ],
        &["--net", "tap=evmm-none0"],
    );
    assert_error(&out, 1, "--net tap=evmm-none0: tap evmm-none0: ");
    assert_error(&out, 1, "no right to create it");
    // An unprivileged user cannot even open /dev/net/tun (mode 0600).
    let out = evmm_in_netns(
        "true",
        &[
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
        ],
        &["--net", "tap=evmm-none0"],
    );
    assert_error(&out, 1, "--net tap=evmm-none0: cannot open /dev/net/tun: ");
}

#[test]
fn net_single_queue_tap_with_several_queues() {
    let out = evmm_in_netns(
        "ip tuntap add dev evmm-sq0 mode tap",
        &[],
        &["--net", "tap=evmm-sq0,queues=2"],
    );
    assert_error(
        &out,
        1,
        "exists as a single-queue tap; queues > 1 needs one created with multi_queue",
    );
}

/// `vhost=on` where the kernel has no vhost-net (as on the machines this project is
/// built on, outside the nested host): one error line. Where /dev/vhost-net exists the
/// device is made, and evmm goes on to fail on the kernel file instead (the nested
/// tests run vhost-net for real).
#[test]
fn net_vhost_without_dev_vhost_net() {
    let dir = tempfile::tempdir().unwrap();
    let bad_kernel = fake_bzimage(&dir);
    let script = "set -e; exec \"$@\"";
    let out = Command::new("unshare")
        .args(["--net", "sh", "-c", script, "sh"])
        .arg(env!("CARGO_BIN_EXE_evmm"))
        .args(["--kernel", &bad_kernel, "--net", "tap=evmm-vh0,vhost=on"])
        .output()
        .expect("unshare (util-linux) runs evmm in a network namespace of its own");
    if std::path::Path::new("/dev/vhost-net").exists() {
        eprintln!("this host has /dev/vhost-net: the device is made, the kernel file fails");
        assert_error(&out, 1, "kernel");
    } else {
        assert_error(
            &out,
            1,
            "--net tap=evmm-vh0,vhost=on: cannot open /dev/vhost-net: ",
        );
        assert_error(&out, 1, "load the vhost_net module, or use vhost=off");
    }
}
