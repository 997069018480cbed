//! Block-device checks for evmm's tests. In the guest:
//!   evmm-guest-blk write-pattern DEV      the known pattern, O_DIRECT + fsync
//!   evmm-guest-blk read-pattern DEV       verify the host's pattern
//!   evmm-guest-blk readonly DEV           a write to a read-only disk must fail
//!   evmm-guest-blk random DEV OPS SEED [THREADS]
//!                                         a verified random workload (THREADS at once,
//!                                         each on its own part of the disk)
//!   evmm-guest-blk qd DEV DEPTH N SEED    N timed random 4 KiB reads, DEPTH in flight
//!   evmm-guest-blk flush-and-keep-writing DEV BLOCKS
//!                                         BLOCKS 4 KiB writes, a flush, a marker line, then
//!                                         writes without end (the VMM is killed meanwhile)
//!   evmm-guest-blk durable DEV SEED       seeded extents, a flush, a marker line with
//!                                         their SHA-256, then writes without end
//!   evmm-guest-blk fault-probe DEV GOOD BAD
//!                                         writes, flushes and reads on a disk whose
//!                                         range at byte offset BAD fails; the errno of each
//! On the host, on the disk file:
//!   evmm-guest-blk host-write-pattern FILE
//!   evmm-guest-blk host-verify-pattern FILE
//!   evmm-guest-blk checksum FILE
//!   evmm-guest-blk host-verify-flushed FILE BLOCKS
//!   evmm-guest-blk host-durable FILE SEED  the file's copy of `durable`'s extents
//! Each prints one `EVMM-BLK...` line; the exit status is 0 when the check passed.

use evmm_guest_tools::{blk, faults};
use std::path::Path;
use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    match run(&argv) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("evmm-guest-blk: {e}");
            ExitCode::from(2)
        }
    }
}

fn run(argv: &[&str]) -> Result<bool, Box<dyn std::error::Error>> {
    match argv {
        ["write-pattern", dev] => {
            blk::write_guest_pattern(Path::new(dev))?;
            println!("EVMM-BLK-WRITE-PATTERN ok=1");
            Ok(true)
        }
        ["read-pattern", dev] => {
            let bad = blk::verify_host_pattern(Path::new(dev))?;
            println!("EVMM-BLK-READ-PATTERN bad_bytes={bad}");
            Ok(bad == 0)
        }
        ["readonly", dev] => {
            let o = blk::try_readonly_write(Path::new(dev))?;
            let errno = |e: &Option<std::io::Error>| e.as_ref().and_then(|e| e.raw_os_error()).unwrap_or(0);
            println!(
                "EVMM-BLK-READONLY open_errno={} write_errno={}",
                errno(&o.open_error),
                errno(&o.write_error)
            );
            Ok(o.refused())
        }
        ["random", dev, ops, seed, rest @ ..] if rest.len() <= 1 => {
            let threads = rest.first().map(|t| t.parse()).transpose()?.unwrap_or(1);
            let f = blk::open_direct(Path::new(dev), true)?;
            let len = blk::device_len(&f)?;
            let report =
                blk::random_workload_parallel(&f, len, ops.parse()?, seed.parse()?, threads)?;
            println!("{}", report.line());
            Ok(report.mismatches == 0)
        }
        ["qd", dev, depth, n, seed] => {
            let f = blk::open_direct(Path::new(dev), false)?;
            let len = blk::device_len(&f)?;
            let report = blk::random_reads(&f, len, depth.parse()?, n.parse()?, seed.parse()?)?;
            println!("{}", report.line());
            Ok(true)
        }
        ["flush-and-keep-writing", dev, blocks] => {
            let blocks: u64 = blocks.parse()?;
            blk::write_flush_and_keep_writing(Path::new(dev), blocks, || {
                println!("EVMM-BLK-FLUSHED blocks={blocks}");
                use std::io::Write;
                let _ = std::io::stdout().flush();
            })?;
            Ok(false)
        }
        ["durable", dev, seed] => {
            faults::write_durable_and_keep_writing(Path::new(dev), seed.parse()?, |sum| {
                println!(
                    "EVMM-BLK-DURABLE bytes={} sha256={}",
                    sum.bytes, sum.sha256
                );
                use std::io::Write;
                let _ = std::io::stdout().flush();
            })?;
            Ok(false)
        }
        ["fault-probe", dev, good, bad] => {
            let probe = faults::probe_failing_disk(Path::new(dev), good.parse()?, bad.parse()?)?;
            println!("{}", probe.line(dev));
            Ok(true)
        }
        ["host-durable", file, seed] => {
            let check = faults::check_durable_file(Path::new(file), seed.parse()?)?;
            println!("{}", check.line());
            Ok(check.bad_extents == 0 && check.found == check.expected)
        }
        ["host-verify-flushed", file, blocks] => {
            let bad = blk::verify_flushed_file(Path::new(file), blocks.parse()?)?;
            println!("EVMM-BLK-FLUSH-VERIFY bad_blocks={bad}");
            Ok(bad == 0)
        }
        ["host-write-pattern", file] => {
            blk::write_host_pattern(Path::new(file))?;
            Ok(true)
        }
        ["host-verify-pattern", file] => {
            let bad = blk::verify_guest_pattern_file(Path::new(file))?;
            println!("EVMM-BLK-HOST-VERIFY bad_bytes={bad}");
            Ok(bad == 0)
        }
        ["checksum", file] => {
            println!("EVMM-BLK-CHECKSUM checksum={:016x}", blk::fnv1a(&std::fs::read(file)?));
            Ok(true)
        }
        _ => Err("usage: see the top of src/bin/evmm-guest-blk.rs (write-pattern DEV | read-pattern DEV | readonly DEV | random DEV OPS SEED [THREADS] | qd DEV DEPTH N SEED | flush-and-keep-writing DEV BLOCKS | durable DEV SEED | fault-probe DEV GOOD BAD | host-write-pattern FILE | host-verify-pattern FILE | checksum FILE | host-verify-flushed FILE BLOCKS | host-durable FILE SEED)".into()),
    }
}
