//! Linux level: virtio-blk through virtio-mmio, driven by ioeventfd and irqfd, in Debian's stock
//! guest: disks seen with their size and read-only flag, data integrity both ways,
//! read-only disks refusing writes, a verified random workload, and the notify
//! counters of both notify paths. Runs on the route the capability probe picks.

mod common;

use common::{
    dd_zero, evmm_cmd, evmm_line, guest_passed, marker, metrics, queue_sum, run_script, MIB,
};
use evmm_testhost::guest::all_marker_fields;
use evmm_testhost::RunOutput;

#[test]
fn guest_sees_disks_with_their_size_and_readonly_flag() {
    let body = [
        dd_zero("a.img", 64),
        dd_zero("b.img", 16),
        evmm_cmd(
            "disks",
            &[],
            &[
                "--disk",
                "path=$D/a.img",
                "--disk",
                "path=$D/b.img,readonly=on",
            ],
        ),
    ]
    .join("\n");
    let out = run_script(&body);
    guest_passed(&out, "disks");
    let disks = all_marker_fields(&out.output, "EVMM-DISK");
    assert_eq!(disks.len(), 2, "output:\n{}", out.output);
    assert_eq!(disks[0]["name"], "vda");
    assert_eq!(disks[0]["sectors"], (64 * MIB / 512).to_string());
    assert_eq!(disks[0]["ro"], "0");
    assert_eq!(disks[1]["name"], "vdb");
    assert_eq!(disks[1]["sectors"], (16 * MIB / 512).to_string());
    assert_eq!(disks[1]["ro"], "1");
}

#[test]
fn guest_writes_land_exactly_in_the_file() {
    let body = [
        dd_zero("a.img", 64),
        evmm_cmd(
            "blk",
            &["write-pattern", "/dev/vda"],
            &["--disk", "path=$D/a.img"],
        ),
        "evmm-guest-blk host-verify-pattern \"$D/a.img\"".into(),
    ]
    .join("\n");
    let out = run_script(&body);
    guest_passed(&out, "blk");
    assert_eq!(marker(&out, "EVMM-BLK-HOST-VERIFY")["bad_bytes"], "0");
}

#[test]
fn host_writes_read_back_in_the_guest() {
    let body = [
        dd_zero("a.img", 64),
        "evmm-guest-blk host-write-pattern \"$D/a.img\"".into(),
        evmm_cmd(
            "blk",
            &["read-pattern", "/dev/vda"],
            &["--disk", "path=$D/a.img"],
        ),
    ]
    .join("\n");
    let out = run_script(&body);
    guest_passed(&out, "blk");
    assert_eq!(marker(&out, "EVMM-BLK-READ-PATTERN")["bad_bytes"], "0");
}

#[test]
fn a_readonly_disk_refuses_writes_and_stays_byte_identical() {
    let body = [
        dd_zero("a.img", 64),
        "evmm-guest-blk host-write-pattern \"$D/a.img\"".into(),
        "evmm-guest-blk checksum \"$D/a.img\"".into(),
        evmm_cmd(
            "blk",
            &["readonly", "/dev/vda"],
            &["--disk", "path=$D/a.img,readonly=on"],
        ),
        "evmm-guest-blk checksum \"$D/a.img\"".into(),
    ]
    .join("\n");
    let out = run_script(&body);
    guest_passed(&out, "blk");
    // The guest kernel knows the disk is read-only (VIRTIO_BLK_F_RO) and refuses the
    // write itself (EPERM) or at open; the device's own IOERR answer to a write that
    // reaches it is covered by evmm-virtio's unit tests.
    let ro = marker(&out, "EVMM-BLK-READONLY");
    let refused = ro["open_errno"] != "0" || ["1", "5", "30"].contains(&ro["write_errno"].as_str());
    assert!(
        refused,
        "the write to a read-only disk was not refused: {ro:?}"
    );
    let sums = all_marker_fields(&out.output, "EVMM-BLK-CHECKSUM");
    assert_eq!(sums.len(), 2);
    assert_eq!(
        sums[0]["checksum"], sums[1]["checksum"],
        "the read-only file changed"
    );
}

/// The verified random workload under each of `configs` (engine, polling), one
/// after the other in one nested run, `threads` of the guest at once (each on its own
/// part of the disk: that many requests in flight, which an asynchronous engine may
/// complete in any order); returns each configuration's metrics.
fn random_workload(
    notify: &str,
    configs: &[(&str, &str)],
    ops: u32,
    threads: u32,
) -> Vec<serde_json::Value> {
    let mut body = Vec::new();
    for (i, (engine, poll)) in configs.iter().enumerate() {
        let disk = format!("path=$D/w{i}.img,engine={engine},poll={poll}");
        body.push(format!(
            "echo 'EVMM-WORKLOAD-CONFIG engine={engine} poll={poll}'"
        ));
        body.push(dd_zero(&format!("w{i}.img"), 64));
        body.push(evmm_cmd(
            "blk",
            &[
                "random",
                "/dev/vda",
                &ops.to_string(),
                "7",
                &threads.to_string(),
            ],
            &["--disk", &disk, "--notify", notify],
        ));
        body.push(format!("evmm-guest-blk checksum \"$D/w{i}.img\""));
    }
    let out = run_script(&body.join("\n"));
    // One part of the output per configuration, each checked on its own.
    let parts: Vec<&str> = out.output.split("EVMM-WORKLOAD-CONFIG ").skip(1).collect();
    assert_eq!(parts.len(), configs.len(), "output:\n{}", out.output);
    configs
        .iter()
        .zip(parts)
        .map(|(&(engine, poll), text)| check_workload(&out, text, notify, engine, poll, ops))
        .collect()
}

/// The checks of one configuration's part `text` of the run `out`.
fn check_workload(
    out: &RunOutput,
    text: &str,
    notify: &str,
    engine: &str,
    poll: &str,
    ops: u32,
) -> serde_json::Value {
    let part = RunOutput {
        output: text.to_string(),
        lost_attempts: Vec::new(),
        ..*out
    };
    let label = format!("engine={engine} poll={poll}");
    guest_passed(&part, "blk");
    let report = marker(&part, "EVMM-BLK-RANDOM");
    assert_eq!(report["mismatches"], "0", "{label}");
    let reads: u64 = report["reads"].parse().unwrap();
    let writes: u64 = report["writes"].parse().unwrap();
    assert_eq!(reads + writes, u64::from(ops), "{label}");
    // The file holds exactly what the guest's shadow of the disk says.
    assert_eq!(
        marker(&part, "EVMM-BLK-CHECKSUM")["checksum"],
        report["checksum"],
        "{label}"
    );
    let m = metrics(&part);
    assert_eq!(m["notify"], notify, "metrics: {m}");
    assert_eq!(
        m["devices"][0]["transport"]["device"]["engine"], engine,
        "metrics: {m}"
    );
    assert_eq!(
        m["devices"][0]["transport"]["device"]["poll"], poll,
        "metrics: {m}"
    );
    let kicks = queue_sum(&m, 0, "/kicks");
    let wakeups = queue_sum(&m, 0, "/wakeups");
    let requests_in = queue_sum(&m, 0, "/req_in");
    let requests_out = queue_sum(&m, 0, "/req_out");
    eprintln!(
        "notify={notify} {label}: kicks={kicks} wakeups={wakeups} in={requests_in} out={requests_out}"
    );
    assert!(kicks >= wakeups, "kicks {kicks} < wake-ups {wakeups}");
    assert!(wakeups > 0);
    // Requests of the workload (the guest kernel adds its own, e.g. partition probing).
    assert!(
        requests_in >= reads && requests_out >= writes,
        "metrics: {m}"
    );
    m
}

#[test]
fn random_workload_with_ioeventfd_never_exits_on_queue_notify_with_either_engine_polling() {
    let configs = [("io_uring", "adaptive"), ("sync", "adaptive")];
    for m in random_workload("ioeventfd", &configs, 10_000, 4) {
        assert_eq!(
            m["devices"][0]["transport"]["notify_exits"], 0,
            "metrics: {m}"
        );
    }
}

#[test]
fn random_workload_with_notify_exit_takes_every_kick_as_an_exit_with_either_engine_sleeping() {
    let configs = [("sync", "off"), ("io_uring", "off")];
    for m in random_workload("exit", &configs, 10_000, 1) {
        let exits = m["devices"][0]["transport"]["notify_exits"]
            .as_u64()
            .unwrap();
        let kicks = queue_sum(&m, 0, "/kicks");
        assert!(exits > 0, "metrics: {m}");
        assert_eq!(
            exits, kicks,
            "every kick must have come through a QueueNotify exit: {m}"
        );
    }
}

/// The shell lines that boot the guest writing and flushing `blocks` blocks under evmm
/// with `engine`, kill evmm with SIGKILL once the guest reports the flush done (and
/// has gone on writing for a second), and check the file.
fn flush_then_kill(engine: &str, blocks: u32) -> String {
    let disk = format!("path=$D/a.img,engine={engine}");
    let evmm = evmm_line(
        "blk",
        &["flush-and-keep-writing", "/dev/vda", &blocks.to_string()],
        &["--disk", &disk],
    );
    format!(
        "{evmm} > \"$D/console-{engine}\" 2>&1 &\n\
         PID=$!\n\
         i=0; until grep -q EVMM-BLK-FLUSHED \"$D/console-{engine}\"; do\n\
           i=$((i+1)); [ $i -lt 1500 ] || {{ cat \"$D/console-{engine}\"; echo 'no flush reported'; exit 1; }}\n\
           kill -0 $PID || {{ cat \"$D/console-{engine}\"; echo 'evmm ended early'; exit 1; }}\n\
           sleep 0.2\n\
         done\n\
         sleep 1\n\
         kill -KILL $PID\n\
         wait $PID || true\n\
         echo \"EVMM-FLUSH-KILL engine={engine}\"\n\
         evmm-guest-blk host-verify-flushed \"$D/a.img\" {blocks}"
    )
}

#[test]
fn flush_then_sigkill_leaves_every_acknowledged_write_in_the_file() {
    const BLOCKS: u32 = 2048;
    let body = [
        dd_zero("a.img", 64),
        flush_then_kill("io_uring", BLOCKS),
        dd_zero("a.img", 64),
        flush_then_kill("sync", BLOCKS),
    ]
    .join("\n");
    let out = run_script(&body);
    let verdicts = all_marker_fields(&out.output, "EVMM-BLK-FLUSH-VERIFY");
    assert_eq!(verdicts.len(), 2, "output:\n{}", out.output);
    for (v, engine) in verdicts.iter().zip(["io_uring", "sync"]) {
        assert_eq!(
            v["bad_blocks"], "0",
            "{engine}: acknowledged writes are missing after SIGKILL; output:\n{}",
            out.output
        );
    }
    let killed: Vec<String> = all_marker_fields(&out.output, "EVMM-FLUSH-KILL")
        .iter()
        .map(|f| f["engine"].clone())
        .collect();
    assert_eq!(killed, ["io_uring", "sync"], "output:\n{}", out.output);
}
