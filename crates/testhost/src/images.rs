//! The guest images built by `guest-images/build`, and where the repository is.

use crate::error::{Error, Result};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// The repository this crate was built from.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .nth(2)
        .expect("crates/testhost lies two levels below the repository root")
        .to_path_buf()
}

/// Cargo's target directory of the repository (CARGO_TARGET_DIR when set).
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target"))
}

/// Paths of the images in `guest-images/out/`.
#[derive(Debug, Clone)]
pub struct GuestImages {
    /// The folder that holds them.
    pub dir: PathBuf,
    /// Debian's stock kernel (bzImage), for guests and for the nested host.
    pub vmlinuz: PathBuf,
    /// The guest initramfs (busybox, virtio modules, guest tests).
    pub initramfs: PathBuf,
    /// The nested test host's initramfs (kvm-amd, bundled QEMU).
    pub l1_initramfs: PathBuf,
}

impl GuestImages {
    /// The images as they are on disk; fails when the guest kernel or initramfs is
    /// missing (the nested host's initramfs is checked when a nested host starts, and
    /// is not there inside the nested host itself).
    pub fn existing() -> Result<Self> {
        let dir = repo_root().join("guest-images/out");
        let images = Self {
            vmlinuz: dir.join("vmlinuz"),
            initramfs: dir.join("initramfs.cpio.gz"),
            l1_initramfs: dir.join("l1-initramfs.cpio"),
            dir,
        };
        for path in [&images.vmlinuz, &images.initramfs] {
            if !path.is_file() {
                return Err(Error::ImagesMissing(path.clone()));
            }
        }
        Ok(images)
    }

    /// Runs `guest-images/build` (which rebuilds only what changed) and returns the images.
    /// Its progress goes to stderr.
    pub fn build() -> Result<Self> {
        let script = repo_root().join("guest-images/build");
        let status = Command::new(&script)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .status()
            .map_err(|e| Error::Spawn(script.display().to_string(), e))?;
        if !status.success() {
            return Err(Error::ImageBuild(status));
        }
        Self::existing()
    }
}

/// Builds the notify guest (`crates/notify-guest/build.sh`, a bare-metal PVH ELF) and
/// returns its path.
pub fn notify_guest() -> Result<PathBuf> {
    let script = repo_root().join("crates/notify-guest/build.sh");
    let out = Command::new(&script)
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| Error::Spawn(script.display().to_string(), e))?;
    if !out.status.success() {
        return Err(Error::GuestBuild(out.status));
    }
    Ok(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
}
