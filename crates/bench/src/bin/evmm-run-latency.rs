//! `evmm-run-latency [--rounds R] [--file-mib M] [--memory MiB]`: wall time of
//! `evmm run -- true` and of `evmm run` reading an M MiB host file through virtio-fs,
//! against QEMU `-M microvm` booting the same kernel and the same initramfs (the one
//! `evmm run --write-initramfs` makes) on the same virtiofsd, started the same way;
//! rows alternate within each round. QEMU's time runs from starting virtiofsd to
//! QEMU's exit and virtiofsd's, as `evmm run`'s does. The read rate is the guest's
//! own timing of `cat FILE > /dev/null` (the data path is virtiofsd's; a gap between
//! the rows is the frontend's). Runs itself in the nested test host where this host's
//! /dev/kvm cannot boot Linux (every row in the same L1).

use clap::Parser;
use evmm::run_command::virtiofsd::{self, Virtiofsd};
use evmm_testhost::boottime::summary;
use evmm_testhost::guest::all_marker_fields;
use evmm_testhost::nested::shell_quote;
use evmm_testhost::process::run_with_limit;
use evmm_testhost::qemu::kvm_base_argv;
use evmm_testhost::qemu_cpu::kvm_cpu_model;
use evmm_testhost::route::bench_main;
use evmm_testhost::GuestImages;
use std::io::Write;
use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

/// Compare `evmm run` with QEMU microvm on the same virtiofsd.
#[derive(Parser)]
struct Cli {
    /// Rounds (each runs every row once).
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Size of the host file the guest reads, in MiB.
    #[arg(long, default_value_t = 64)]
    file_mib: u64,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 512)]
    memory: u32,
}

/// The whole run's limit where it goes to the nested host.
const NESTED_LIMIT: Duration = Duration::from_secs(2400);
/// Longest one guest may take (a run takes well under a minute; L2 guests in the
/// nested host sometimes stall, under either VMM: README "Known problems").
const RUN_LIMIT: Duration = Duration::from_secs(120);
/// Attempts at one sample before the benchmark gives up.
const ATTEMPTS: usize = 3;

fn main() -> ExitCode {
    let cli = Cli::parse();
    bench_main(Some(NESTED_LIMIT), || run(&cli))
}

/// One measured run.
struct Sample {
    wall: Duration,
    /// The guest's own time for reading the file, when it read one.
    read: Option<Duration>,
}

/// What the guest runs: `true`, or reading the file with its own timing. The
/// guest's root is the host's, whose `date` may be busybox's (no `%N`): the clock is
/// the guest kernel's `/proc/uptime`, in hundredths of a second (`1$2 - 100` keeps
/// a fraction such as `05` from being read as octal).
fn commands(file: &Path) -> [(&'static str, Vec<String>); 2] {
    let read = format!(
        "cs() {{ set -- ${{1%.*}} ${{1#*.}}; echo $(($1 * 100 + 1$2 - 100)); }}; \
         read a _ < /proc/uptime; cat {} > /dev/null || exit 1; read b _ < /proc/uptime; \
         echo \"EVMM-RUN-READ ns=$((($(cs $b) - $(cs $a)) * 10000000))\"",
        shell_quote(&file.display().to_string())
    );
    [
        ("true", vec!["true".into()]),
        ("cat", vec!["sh".into(), "-c".into(), read]),
    ]
}

fn run(cli: &Cli) -> Result<(), Box<dyn std::error::Error>> {
    let images = GuestImages::existing()?;
    let dir = tempfile::Builder::new()
        .prefix("evmm-run-bench.")
        .tempdir()?;
    let file = dir.path().join("data.bin");
    eprintln!("writing the {} MiB file the guest reads", cli.file_mib);
    write_file(&file, cli.file_mib << 20)?;
    let commands = commands(&file);
    // QEMU boots the initramfs evmm run would generate for each command.
    let mut initramfs = Vec::new();
    for (name, argv) in &commands {
        let path = dir.path().join(format!("{name}.cpio"));
        let mut args = vec![
            "evmm".to_string(),
            "run".into(),
            "--write-initramfs".into(),
            path.display().to_string(),
            "--".into(),
        ];
        args.extend(argv.iter().cloned());
        let out = run_with_limit(&args, RUN_LIMIT)?;
        if out.status.is_none_or(|s| !s.success()) {
            return Err(format!("evmm run --write-initramfs failed: {}", out.stdout).into());
        }
        initramfs.push(path);
    }
    let exe = virtiofsd::find(None)?;
    eprintln!("finding the CPU model QEMU starts with");
    let qemu_name = format!("QEMU -M microvm (-cpu {})", kvm_cpu_model()?.model);
    let rows = ["evmm run".to_string(), qemu_name];

    // results[row][command]
    let mut results: Vec<Vec<Vec<Sample>>> = (0..rows.len())
        .map(|_| commands.iter().map(|_| Vec::new()).collect())
        .collect();
    for round in 1..=cli.rounds {
        for (c, (cname, argv)) in commands.iter().enumerate() {
            for (r, rname) in rows.iter().enumerate() {
                let mut attempt = 1;
                let sample = loop {
                    let sample = if r == 0 {
                        time_evmm_run(argv, cli.memory)
                    } else {
                        time_qemu(&exe, &images, &initramfs[c], cli.memory, dir.path())
                    };
                    match sample {
                        Ok(s) => break s,
                        Err(e) if attempt < ATTEMPTS => {
                            eprintln!("round {round}: {rname} -- {cname}: attempt {attempt} failed, made again: {e}");
                            attempt += 1;
                        }
                        Err(e) => return Err(e),
                    }
                };
                eprintln!(
                    "round {round}/{}: {rname} -- {cname}: {:.2} s{}",
                    cli.rounds,
                    sample.wall.as_secs_f64(),
                    sample.read.map_or(String::new(), |d| format!(
                        ", read {:.0} MB/s",
                        rate(cli.file_mib, d)
                    ))
                );
                results[r][c].push(sample);
            }
        }
    }

    println!(
        "| VMM ({} MiB, 1 vCPU, {} rounds; median (min–max)) | `run -- true` | `run -- cat` of {} MiB | read rate in the guest |",
        cli.memory, cli.rounds, cli.file_mib
    );
    println!("| --- | --- | --- | --- |");
    let mut medians = Vec::new();
    for (name, per_command) in rows.iter().zip(&results) {
        let walls: Vec<(f64, f64, f64)> = per_command
            .iter()
            .map(|s| summary(&s.iter().map(|x| x.wall).collect::<Vec<_>>()))
            .collect();
        let reads: Vec<Duration> = per_command[1].iter().filter_map(|s| s.read).collect();
        let (read, _, _) = summary(&reads);
        let mbs = cli.file_mib as f64 / read;
        println!(
            "| {name} | {:.2} s ({:.2}–{:.2}) | {:.2} s ({:.2}–{:.2}) | {mbs:.0} MB/s |",
            walls[0].0, walls[0].1, walls[0].2, walls[1].0, walls[1].1, walls[1].2
        );
        medians.push((walls[0].0, mbs));
    }
    println!();
    println!(
        "evmm / QEMU: `run -- true` {:.2}×, read rate {:.2}×",
        medians[0].0 / medians[1].0,
        medians[0].1 / medians[1].1
    );
    Ok(())
}

/// MB/s for `mib` MiB in `d`.
fn rate(mib: u64, d: Duration) -> f64 {
    mib as f64 / d.as_secs_f64()
}

/// A file of `len` bytes that does not compress (a counter pattern).
fn write_file(path: &Path, len: u64) -> std::io::Result<()> {
    let mut f = std::io::BufWriter::new(std::fs::File::create(path)?);
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for _ in 0..len / 8 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        f.write_all(&x.to_le_bytes())?;
    }
    f.flush()
}

/// `evmm run -- argv`, timed from start to exit.
fn time_evmm_run(argv: &[String], memory: u32) -> Result<Sample, Box<dyn std::error::Error>> {
    let mut args = vec![
        "evmm".to_string(),
        "run".into(),
        "--memory".into(),
        memory.to_string(),
        "--".into(),
    ];
    args.extend(argv.iter().cloned());
    let start = Instant::now();
    let out = run_with_limit(&args, RUN_LIMIT)?;
    let wall = start.elapsed();
    check("evmm run", out.status, &out.stdout)?;
    Ok(Sample {
        wall,
        read: read_time(&out.stdout),
    })
}

/// virtiofsd on `/` (read-only, as `evmm run` starts it) and QEMU microvm booting
/// `initramfs`, timed from virtiofsd's start to both their ends.
fn time_qemu(
    exe: &Path,
    images: &GuestImages,
    initramfs: &Path,
    memory: u32,
    dir: &Path,
) -> Result<Sample, Box<dyn std::error::Error>> {
    let socket = dir.join("vfs.sock");
    let bind_point = dir.join("share");
    std::fs::create_dir_all(&bind_point)?;
    let start = Instant::now();
    let mut daemon = Virtiofsd::start(
        exe,
        Path::new("/"),
        true,
        &socket,
        &bind_point,
        &dir.join("virtiofsd.log"),
    )?;
    let mut argv = kvm_base_argv(&["-L", "/usr/share/qemu"]);
    argv.extend(
        [
            "-M",
            "microvm,accel=kvm",
            "-m",
            &memory.to_string(),
            "-smp",
            "1",
            "-global",
            "virtio-mmio.force-legacy=false",
            "-object",
            &format!("memory-backend-memfd,id=mem,size={memory}M,share=on"),
            "-machine",
            "memory-backend=mem",
            "-kernel",
            &images.vmlinuz.display().to_string(),
            "-initrd",
            &initramfs.display().to_string(),
            "-append",
            "console=ttyS0 quiet loglevel=1 panic=-1 reboot=t",
            "-chardev",
            &format!("socket,id=vfs,path={}", socket.display()),
            "-device",
            &format!(
                "vhost-user-fs-device,chardev=vfs,tag={}",
                evmm::run_command::TAG
            ),
            "-device",
            "isa-debug-exit,iobase=0xf4,iosize=1",
        ]
        .iter()
        .map(|s| s.to_string()),
    );
    let out = run_with_limit(&argv, RUN_LIMIT)?;
    daemon.stop();
    let wall = start.elapsed();
    // isa-debug-exit: status (0 << 1) | 1.
    match out.status.and_then(|s| s.code()) {
        Some(1) => Ok(Sample {
            wall,
            read: read_time(&out.stdout),
        }),
        other => Err(format!("QEMU ended with {other:?}; console:\n{}", out.stdout).into()),
    }
}

/// Fails unless `status` is success.
fn check(
    what: &str,
    status: Option<std::process::ExitStatus>,
    console: &str,
) -> Result<(), Box<dyn std::error::Error>> {
    match status {
        Some(s) if s.success() => Ok(()),
        other => Err(format!("{what} ended with {other:?}; console:\n{console}").into()),
    }
}

/// The guest's `EVMM-RUN-READ ns=` figure.
fn read_time(console: &str) -> Option<Duration> {
    all_marker_fields(console, "EVMM-RUN-READ")
        .first()
        .and_then(|f| f.get("ns")?.parse().ok())
        .map(Duration::from_nanos)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_read_command_times_itself_with_any_sh() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("a file");
        std::fs::write(&file, vec![7u8; 1 << 20]).unwrap();
        let [_, (_, argv)] = commands(&file);
        for sh in ["sh", "busybox"] {
            let mut cmd = std::process::Command::new(sh);
            if sh == "busybox" {
                cmd.arg("sh");
            }
            let out = cmd.args(&argv[1..]).output().unwrap();
            let text = String::from_utf8_lossy(&out.stdout);
            assert!(out.status.success(), "{sh}: {out:?}");
            assert!(read_time(&text).is_some(), "{sh}: {text}");
        }
    }
}
