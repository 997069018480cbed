//! Test harness: the nested test host: boots L1, runs commands there, returns their output and
//! status, and stops commands that exceed their time limit.

use evmm_testhost::{Error, NestedHost};
use std::time::Duration;

fn host() -> NestedHost {
    NestedHost::new()
        .unwrap_or_else(|e| panic!("cannot prepare the nested host: {e}"))
        .on_line(|l| eprintln!("  L1| {l}"))
}

#[test]
fn runs_cpuinfo_and_a_kvm_guest_in_l1() {
    let out = host()
        .timeout(Duration::from_secs(120))
        .run(&["sh", "-c", "cat /proc/cpuinfo && evmm-kvm-probe"])
        .unwrap_or_else(|e| panic!("nested run failed: {e}"));
    eprintln!("{}", out.timing());
    assert_eq!(out.status, 0, "output:\n{}", out.output);
    assert!(
        out.output.contains("AuthenticAMD"),
        "no cpuinfo:\n{}",
        out.output
    );
    let flags = out
        .output
        .lines()
        .find(|l| l.starts_with("flags"))
        .expect("a flags line");
    assert!(
        flags.split_whitespace().any(|f| f == "svm"),
        "L1 has no SVM: {flags}"
    );
    // The long-mode guest loop ran on L1's KVM, and ring 0 runs natively there.
    let probe = out.output.lines().last().unwrap_or_default();
    assert!(
        probe.starts_with("ring 0 native"),
        "probe in L1 said: {probe}"
    );
}

#[test]
fn a_failing_command_returns_its_status() {
    let out = host()
        .timeout(Duration::from_secs(60))
        .run(&["sh", "-c", "echo before; exit 7"])
        .unwrap_or_else(|e| panic!("nested run failed: {e}"));
    assert_eq!(out.status, 7);
    assert_eq!(out.output, "before");
}

#[test]
fn a_missing_command_returns_127() {
    let out = host()
        .timeout(Duration::from_secs(60))
        .run(&["no-such-command-here"])
        .unwrap_or_else(|e| panic!("nested run failed: {e}"));
    assert_eq!(out.status, 127, "output: {}", out.output);
}

#[test]
fn a_command_over_its_limit_is_stopped_and_reported() {
    let parent = tempfile::tempdir().unwrap();
    let err = host()
        .temp_parent(parent.path())
        .attempts(1)
        .timeout(Duration::from_secs(5))
        .run(&["sh", "-c", "echo sleeping; sleep 600"])
        .expect_err("a 600 s sleep must not finish within 5 s");
    match &err {
        Error::TimedOut { limit, output, .. } => {
            assert_eq!(*limit, Duration::from_secs(5));
            assert_eq!(output, "sleeping");
        }
        other => panic!("expected a time-limit error, got: {other}"),
    }
    assert!(err.to_string().contains("time limit"), "{err}");
    // QEMU was stopped and the run's temporary folder removed.
    let qemu = std::process::Command::new("pgrep")
        .arg("-f")
        .arg(parent.path())
        .output()
        .expect("pgrep (procps) is needed by this test");
    assert!(
        qemu.stdout.is_empty(),
        "QEMU still runs: {}",
        String::from_utf8_lossy(&qemu.stdout)
    );
    let left: Vec<_> = std::fs::read_dir(parent.path()).unwrap().collect();
    assert!(left.is_empty(), "the run left files behind: {left:?}");
}

#[test]
fn a_run_that_loses_l1_is_made_again_then_reported() {
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let sink = seen.clone();
    let err = host()
        .on_line(move |l| sink.lock().unwrap().push(l.to_string()))
        .attempts(2)
        .timeout(Duration::from_secs(60))
        // Crashes L1's kernel: QEMU ends without the command's status.
        .run(&[
            "sh",
            "-c",
            "echo crashing; echo c > /proc/sysrq-trigger; sleep 60",
        ])
        .expect_err("a crashed L1 cannot report a status");
    assert!(
        matches!(err, Error::L1Died { .. }),
        "expected the nested host to be lost, got: {err}"
    );
    assert!(err.lost_the_nested_host());
    let seen = seen.lock().unwrap();
    let attempts = seen.iter().filter(|l| *l == "crashing").count();
    assert_eq!(attempts, 2, "the command ran {attempts} times: {seen:?}");
    assert!(
        seen.iter()
            .any(|l| l.contains("attempt 1 of 2 lost the nested host")),
        "the lost attempt was not reported: {seen:?}"
    );
}
