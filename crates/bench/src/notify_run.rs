//! What the notify-guest benchmarks set up alike: the guest, the disk file, and the
//! second run in the nested host for the paths that need the kernel's vhost-net.

use evmm_testhost::images::notify_guest;
use evmm_testhost::route::rerun_in_nested_host;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Where this benchmark runs: `"nested"` in the nested test host (a rerun of
/// [`rerun_with_vhost_net`]), else `"direct"`; says on stderr whose KVM runs its `what`.
pub fn host_label(what: &str) -> &'static str {
    let nested = evmm_testhost::route::running_in_nested_host();
    eprintln!(
        "{what} on {}",
        if nested {
            "the nested host (L1: its KVM on QEMU's emulated SVM)"
        } else {
            "this host's KVM"
        }
    );
    if nested {
        "nested"
    } else {
        "direct"
    }
}

/// Whether /dev/vhost-net exists here; an error when it must (in the nested host, which
/// loads vhost_net for these benchmarks).
pub fn vhost_net(required: bool) -> Result<bool, Box<dyn std::error::Error>> {
    let here = Path::new("/dev/vhost-net").exists();
    if required && !here {
        return Err("the nested host has no /dev/vhost-net (vhost_net not loaded?)".into());
    }
    Ok(here)
}

/// Runs this benchmark program (`name` when argv[0] is missing) again in the nested
/// test host, where /dev/vhost-net exists, with `args`, `--guest GUEST` and `--here`;
/// its output comes through and its files come back. An error unless it exits 0.
pub fn rerun_with_vhost_net(
    name: &str,
    args: &[String],
    guest: &Path,
    limit: Duration,
) -> Result<(), Box<dyn std::error::Error>> {
    let mut argv = vec![std::env::args().next().unwrap_or_else(|| name.into())];
    argv.extend(args.iter().cloned());
    argv.extend([
        "--guest".into(),
        guest.display().to_string(),
        "--here".into(),
    ]);
    let status = rerun_in_nested_host(&argv, limit, &[guest.to_path_buf()])?;
    if status != 0 {
        return Err(format!("the nested run exited {status}").into());
    }
    Ok(())
}

/// The notify guest: `given` if it names a file, else the one `crates/notify-guest`
/// builds.
pub fn guest_elf(given: Option<&Path>) -> Result<PathBuf, Box<dyn std::error::Error>> {
    match given {
        Some(g) if !g.is_file() => Err(format!("no notify guest at {}", g.display()).into()),
        Some(g) => Ok(g.to_path_buf()),
        None => Ok(notify_guest()?),
    }
}

/// A sparse disk file of the benchmark, on tmpfs (`/dev/shm`) where there is one so
/// that reads measure the notify path and not a disk, else in `fallback`; removed
/// on drop.
pub struct TempDisk(PathBuf);

impl TempDisk {
    /// Creates `name-PID.img` of `bytes`.
    pub fn new(name: &str, bytes: u64, fallback: &Path) -> std::io::Result<Self> {
        let shm = Path::new("/dev/shm");
        let dir = if shm.is_dir() { shm } else { fallback };
        let path = dir.join(format!("{name}-{}.img", std::process::id()));
        std::fs::File::create(&path)?.set_len(bytes)?;
        Ok(Self(path))
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDisk {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_disk_has_its_size_and_goes_away() {
        let dir = tempfile::tempdir().unwrap();
        let path = {
            let d = TempDisk::new("evmm-test-disk", 1 << 20, dir.path()).unwrap();
            assert_eq!(std::fs::metadata(d.path()).unwrap().len(), 1 << 20);
            d.path().to_path_buf()
        };
        assert!(!path.exists());
    }

    #[test]
    fn a_guest_that_is_not_there_is_an_error() {
        let e = guest_elf(Some(Path::new("/nonexistent/guest.elf"))).unwrap_err();
        assert!(e.to_string().contains("no notify guest at"), "{e}");
    }
}
