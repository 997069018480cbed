//! What the notify-guest benchmarks set up alike: the guest and the disk file.

use evmm_testhost::images::notify_guest;
use std::path::{Path, PathBuf};

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
