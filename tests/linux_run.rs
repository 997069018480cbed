//! Linux level, `evmm run` and the exit device (issue #16), with Debian's stock kernel
//! in the nested host (where this host's /dev/kvm cannot boot Linux), all cases in one
//! run of the route:
//! - `evmm run -- sh -c 'cat /etc/os-release; exit 7'` prints the host's os-release
//!   and exits 7; a file the command writes under the read-only share's overlay does
//!   not reach the host;
//! - with `--share DIR` (read-write) a 1 MiB file the guest writes lands in DIR with
//!   the guest's sha256, and 1,000 files are created, listed and removed;
//! - a kernel without virtio-fs (the stock kernel without its modules): one `error:`
//!   line, exit 1;
//! - the exit device: the guest images' init with `evmm.end=exit` makes evmm exit with
//!   the guest test's status (0, 1, 255), and without `--exit-device` the guest
//!   reboots and evmm exits 0;
//! - QEMU as a peer: QEMU microvm's `vhost-user-fs-device` on Debian's virtiofsd boots
//!   the initramfs `evmm run --write-initramfs` made and reads the same files.
//!
//! And on this host, whatever its KVM: a missing share, kernel or virtiofsd gives one
//! `error:` line and exit 1; `evmm run` on a KVM that cannot boot Linux says so.

mod common;

use common::run_script;
use evmm_testhost::guest::all_marker_fields;
use evmm_testhost::images::target_dir;
use evmm_testhost::{Route, RunOutput};
use std::collections::BTreeMap;
use std::process::Command;
use std::sync::OnceLock;

/// The virtio-fs tag `evmm run` uses.
const TAG: &str = "evmm-root";

/// The guest's command line for the exit-device cases, before the test's words.
const CMDLINE: &str = "console=ttyS0 reboot=k panic=-1 quiet";

/// The shell script of every nested case; each prints `EVMM-RUN-CASE` markers.
fn script() -> String {
    format!(
        r#"
set +e
img=guest-images/out
probe=evmm-run-overlay-probe
rm -f "$probe"

# A: the host's files, the command's status, the overlay.
evmm run -- sh -c "cat /etc/os-release; echo written > $probe; cat $probe; exit 7"
echo "EVMM-RUN-CASE name=status status=$? leaked=$([ -e "$probe" ] && echo yes || echo no)"
rm -f "$probe"

# B: a writable share: a root of busybox links in $D/root.
r="$D/root"
mkdir -p "$r/bin" "$r/dev" "$r/proc" "$r/sys" "$r/tmp" "$r/data"
cp "$(readlink -f /bin/busybox)" "$r/bin/busybox"
for a in sh head sha256sum cut seq ls rm wc mkdir cat; do ln -s busybox "$r/bin/$a"; done
evmm run --share "$r" -- sh -c 'head -c 1048576 /dev/urandom > /data/blob &&
    echo "EVMM-RUN-GUEST sha=$(sha256sum /data/blob | cut -c1-64)";
    mkdir /data/many && for i in $(seq 1000); do echo $i > /data/many/f$i || exit 9; done;
    echo "EVMM-RUN-GUEST listed=$(ls /data/many | wc -l)";
    rm /data/many/f* && echo "EVMM-RUN-GUEST left=$(ls /data/many | wc -l)"'
s=$?
echo "EVMM-RUN-CASE name=share status=$s sha=$(sha256sum "$r/data/blob" | cut -c1-64) left=$(ls "$r/data/many" | wc -l)"

# C: a kernel without virtio-fs: the stock kernel without its modules.
mkdir "$D/k" && cp "$img/vmlinuz" "$D/k/vmlinuz"
evmm run --kernel "$D/k/vmlinuz" -- true > "$D/c.out" 2>&1
s=$?
cat "$D/c.out"
echo "EVMM-RUN-CASE name=no-virtiofs status=$s errors=$(grep -c '^error:' "$D/c.out")"

# D: the exit device.
for want in 0 1 255; do
    evmm --kernel "$img/vmlinuz" --initramfs "$img/initramfs.cpio.gz" --exit-device \
        --cmdline "{CMDLINE} evmm.test=fail evmm.args=$want evmm.end=exit" > "$D/d.out" 2>&1
    echo "EVMM-RUN-CASE name=exit-device want=$want status=$?"
done
evmm --kernel "$img/vmlinuz" --initramfs "$img/initramfs.cpio.gz" \
    --cmdline "{CMDLINE} evmm.test=fail evmm.args=5 evmm.end=exit" > "$D/d.out" 2>&1
echo "EVMM-RUN-CASE name=no-exit-device status=$? result=$(grep -c 'EVMM-TEST-RESULT name=fail status=5' "$D/d.out")"

# E: QEMU microvm with vhost-user-fs-device on Debian's virtiofsd, booting the same
# initramfs: its isa-debug-exit reports (3 << 1) | 1 = 7.
evmm run --write-initramfs "$D/q.cpio" -- sh -c 'cat /etc/os-release; exit 3'
mkdir "$D/qshare"
/usr/lib/qemu/virtiofsd --socket-path="$D/vfs.sock" -o source=/ -o sandbox=chroot \
    -o cache=auto -o log_level=warn &
vfs=$!
i=0; while [ ! -S "$D/vfs.sock" ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
evmm-qemu -nodefaults -no-user-config -nographic -no-reboot -serial stdio \
    -L /usr/share/qemu -M microvm,accel=kvm -m 512 -smp 1 \
    -global virtio-mmio.force-legacy=false \
    -object memory-backend-memfd,id=mem,size=512M,share=on -machine memory-backend=mem \
    -kernel "$img/vmlinuz" -initrd "$D/q.cpio" \
    -append "console=ttyS0 quiet loglevel=1 panic=-1 reboot=t" \
    -chardev socket,id=vfs,path="$D/vfs.sock" \
    -device vhost-user-fs-device,chardev=vfs,tag={TAG} \
    -device isa-debug-exit,iobase=0xf4,iosize=1
echo "EVMM-RUN-CASE name=qemu status=$?"
kill $vfs; wait $vfs
true
"#
    )
}

/// The one run of every case, shared by the tests.
fn shared_run() -> &'static RunOutput {
    static RUN: OnceLock<RunOutput> = OnceLock::new();
    RUN.get_or_init(|| {
        let out = run_script(&script());
        eprintln!("{}", out.output);
        out
    })
}

/// The `EVMM-RUN-CASE` marker of case `name` (with `want=` when given).
fn case(name: &str, want: Option<&str>) -> BTreeMap<String, String> {
    let out = shared_run();
    all_marker_fields(&out.output, "EVMM-RUN-CASE")
        .into_iter()
        .find(|f| {
            f.get("name").map(String::as_str) == Some(name)
                && want.is_none_or(|w| f.get("want").map(String::as_str) == Some(w))
        })
        .unwrap_or_else(|| panic!("no EVMM-RUN-CASE name={name}; output:\n{}", out.output))
}

/// The output between the marker of the case before `name` and `name`'s own.
fn case_output(name: &str) -> String {
    let out = &shared_run().output;
    let end = out
        .find(&format!("EVMM-RUN-CASE name={name} "))
        .unwrap_or_else(|| panic!("no case {name}:\n{out}"));
    let start = out[..end].rfind("EVMM-RUN-CASE").map_or(0, |i| i);
    out[start..end].to_string()
}

#[test]
fn run_prints_the_hosts_files_and_exits_with_the_commands_status() {
    let c = case("status", None);
    assert_eq!(c["status"], "7", "{c:?}");
    let os_release = std::fs::read_to_string("/etc/os-release").unwrap();
    let output = case_output("status");
    for line in os_release.lines().filter(|l| !l.is_empty()) {
        assert!(
            output.lines().any(|l| l.trim_end() == line),
            "the guest did not print the host's os-release line {line:?}:\n{output}"
        );
    }
    assert!(
        output.lines().any(|l| l.trim_end() == "written"),
        "the command could not write under the overlay:\n{output}"
    );
    assert_eq!(c["leaked"], "no", "the overlay's file reached the host");
}

#[test]
fn run_writes_into_a_writable_share() {
    let c = case("share", None);
    assert_eq!(c["status"], "0", "{c:?}");
    let guest = all_marker_fields(&case_output("share"), "EVMM-RUN-GUEST");
    let field = |k: &str| {
        guest
            .iter()
            .find_map(|f| f.get(k).cloned())
            .unwrap_or_else(|| panic!("no {k} from the guest: {guest:?}"))
    };
    assert_eq!(field("sha").len(), 64);
    assert_eq!(field("sha"), c["sha"], "the file on the host differs");
    assert_eq!(field("listed"), "1000");
    assert_eq!(field("left"), "0");
    assert_eq!(
        c["left"], "0",
        "files the guest removed are still on the host"
    );
}

#[test]
fn a_kernel_without_virtio_fs_is_one_error_and_exit_1() {
    let c = case("no-virtiofs", None);
    assert_eq!(c["status"], "1", "{c:?}");
    assert_eq!(c["errors"], "1", "{}", case_output("no-virtiofs"));
    assert!(
        case_output("no-virtiofs").contains("has no virtio-fs"),
        "{}",
        case_output("no-virtiofs")
    );
}

#[test]
fn the_exit_device_gives_the_guests_status() {
    for want in ["0", "1", "255"] {
        assert_eq!(case("exit-device", Some(want))["status"], want);
    }
    let c = case("no-exit-device", None);
    assert_eq!(c["status"], "0", "without --exit-device the guest reboots");
    assert_eq!(c["result"], "1", "the guest test did not run: {c:?}");
}

#[test]
fn qemu_boots_the_same_guest_on_virtiofsd() {
    let c = case("qemu", None);
    assert_eq!(c["status"], "7", "QEMU's isa-debug-exit: (3 << 1) | 1");
    let os_release = std::fs::read_to_string("/etc/os-release").unwrap();
    let first = os_release.lines().next().unwrap();
    assert!(
        case_output("qemu").lines().any(|l| l.trim_end() == first),
        "{}",
        case_output("qemu")
    );
}

/// `evmm run` with `args` on this host: (status, stderr).
fn run_here(args: &[&str]) -> (i32, String) {
    let out = Command::new(target_dir().join("release/evmm"))
        .arg("run")
        .args(args)
        .output()
        .expect("target/release/evmm (cargo build --release)");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn bad_input_is_one_error_line_and_exit_1() {
    for (args, says) in [
        (
            &["--share", "/nonexistent-share", "--", "true"][..],
            "--share /nonexistent-share: no such directory",
        ),
        (
            &["--kernel", "/nonexistent/bzImage", "--", "true"][..],
            "--kernel /nonexistent/bzImage: no such file",
        ),
        (
            &["--virtiofsd", "/nonexistent/virtiofsd", "--", "true"][..],
            "virtiofsd /nonexistent/virtiofsd: no such executable",
        ),
    ] {
        let (status, stderr) = run_here(args);
        assert_eq!(status, 1, "{args:?}: {stderr}");
        assert_eq!(stderr.trim_end(), format!("error: {says}"), "{args:?}");
    }
    let (status, stderr) = run_here(&["--memory", "lots", "--", "true"]);
    assert_eq!(status, 2, "a bad flag is a usage error: {stderr}");
}

#[test]
fn run_says_when_this_kvm_cannot_boot_linux() {
    let route = Route::detect().unwrap();
    eprintln!("{route}");
    let (status, stderr) = run_here(&["--", "true"]);
    match route {
        Route::Nested { .. } => {
            assert_eq!(status, 1, "{stderr}");
            assert_eq!(stderr.lines().count(), 1, "{stderr}");
            assert!(
                stderr.starts_with("error: this host's /dev/kvm cannot boot Linux")
                    && stderr.contains("evmm-kvm-probe"),
                "{stderr}"
            );
        }
        // Where Linux boots, the command runs (as root with virtiofsd, which the test
        // hosts have).
        Route::Direct { .. } => assert_eq!(status, 0, "{stderr}"),
    }
}
