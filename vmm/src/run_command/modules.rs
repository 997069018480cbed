//! The kernel modules the guest needs for `evmm run` (virtio-mmio, virtio-fs and its
//! FUSE core, overlayfs), found for the kernel's release:
//!
//! 1. `modules-RELEASE.cpio` next to the kernel (what `guest-images/build` makes for
//!    its stock kernel): appended to the initramfs as it is;
//! 2. the host's `/lib/modules/RELEASE` (a kernel the user built and installed, or the
//!    host's own): the modules and their dependencies from `modules.dep`, minus those
//!    `modules.builtin` lists;
//! 3. neither: the kernel is taken to have what it needs built in, and the guest's init
//!    says so if it has not.
//!
//! Either way the modules sit under `/lib/modules/` in the initramfs and
//! `/etc/evmm/modules` lists them in load order (paths relative to `/lib/modules/`),
//! the layout of `guest-images/build`'s images. Compressed modules (`.ko.xz`...) are
//! not supported: busybox's insmod loads plain `.ko` files.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

/// The modules `evmm run`'s guest loads, by name.
pub const NEEDED: &[&str] = &["virtio_mmio", "virtiofs", "overlay"];

/// Where the modules come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModuleSource {
    /// A ready cpio archive of the layout above.
    Archive(PathBuf),
    /// Module files (`(path relative to /lib/modules, host file)`), in load order.
    Files(Vec<(String, PathBuf)>),
    /// Nothing known about the kernel's modules.
    None,
}

/// Errors of finding the modules.
#[derive(Debug, thiserror::Error)]
pub enum ModuleError {
    /// The kernel has no virtio-fs: not built in, no module.
    #[error(
        "the kernel {release} has no virtio-fs: {dir}/modules.builtin does not list it and \
         there is no virtiofs module (CONFIG_VIRTIO_FS)"
    )]
    NoVirtioFs {
        /// The release.
        release: String,
        /// The module directory.
        dir: PathBuf,
    },
    /// A module file is compressed.
    #[error("{0}: compressed modules are not supported; install them uncompressed")]
    Compressed(PathBuf),
    /// The module directory cannot be read.
    #[error("{path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
}

/// Finds the modules of `release` for the kernel at `kernel`; `host_root` is where
/// `lib/modules` is looked for (`/` but in tests).
pub fn find(kernel: &Path, release: &str, host_root: &Path) -> Result<ModuleSource, ModuleError> {
    let archive = kernel
        .parent()
        .unwrap_or(Path::new("."))
        .join(format!("modules-{release}.cpio"));
    if archive.is_file() {
        return Ok(ModuleSource::Archive(archive));
    }
    let dir = host_root.join("lib/modules").join(release);
    let dep_file = dir.join("modules.dep");
    if !dep_file.is_file() {
        return Ok(ModuleSource::None);
    }
    let read = |path: PathBuf| {
        fs::read_to_string(&path).map_err(|source| ModuleError::Read { path, source })
    };
    let deps = parse_dep(&read(dep_file)?);
    let builtin: BTreeSet<String> = match fs::read_to_string(dir.join("modules.builtin")) {
        Ok(text) => text.lines().map(module_name).collect(),
        Err(_) => BTreeSet::new(),
    };
    let by_name: BTreeMap<String, &String> = deps.keys().map(|p| (module_name(p), p)).collect();
    if !builtin.contains("virtiofs") && !by_name.contains_key("virtiofs") {
        return Err(ModuleError::NoVirtioFs {
            release: release.to_string(),
            dir,
        });
    }
    let mut order = Vec::new();
    let mut seen = BTreeSet::new();
    for name in NEEDED {
        if let Some(path) = by_name.get(*name) {
            visit(path, &deps, &mut seen, &mut order);
        }
    }
    order
        .into_iter()
        .map(|rel| {
            if rel.ends_with(".ko") {
                let host = dir.join(&rel);
                Ok((rel, host))
            } else {
                Err(ModuleError::Compressed(dir.join(rel)))
            }
        })
        .collect::<Result<Vec<_>, _>>()
        .map(ModuleSource::Files)
}

/// `modules.dep`: each module's path and its dependencies' paths.
fn parse_dep(text: &str) -> BTreeMap<String, Vec<String>> {
    text.lines()
        .filter_map(|line| {
            let (module, deps) = line.split_once(':')?;
            Some((
                module.trim().to_string(),
                deps.split_whitespace().map(str::to_string).collect(),
            ))
        })
        .collect()
}

/// A module's name from its path: `kernel/fs/fuse/virtiofs.ko` → `virtiofs`, dashes
/// as underscores.
fn module_name(path: &str) -> String {
    let file = path.rsplit('/').next().unwrap_or(path);
    let stem = file.split(".ko").next().unwrap_or(file);
    stem.replace('-', "_")
}

/// Dependencies first, each once.
fn visit(
    module: &str,
    deps: &BTreeMap<String, Vec<String>>,
    seen: &mut BTreeSet<String>,
    order: &mut Vec<String>,
) {
    if !seen.insert(module.to_string()) {
        return;
    }
    for dep in deps.get(module).into_iter().flatten().rev() {
        visit(dep, deps, seen, order);
    }
    order.push(module.to_string());
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree(dep: &str, builtin: &str) -> tempfile::TempDir {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("lib/modules/6.1.0-test");
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join("modules.dep"), dep).unwrap();
        fs::write(dir.join("modules.builtin"), builtin).unwrap();
        root
    }

    const DEP: &str = "kernel/fs/fuse/virtiofs.ko: kernel/fs/fuse/fuse.ko\n\
                       kernel/fs/fuse/fuse.ko:\n\
                       kernel/fs/overlayfs/overlay.ko:\n\
                       kernel/drivers/virtio/virtio_mmio.ko:\n\
                       kernel/drivers/block/virtio_blk.ko:\n";

    #[test]
    fn modules_come_with_their_dependencies_first() {
        let root = tree(DEP, "");
        let kernel = root.path().join("vmlinuz");
        let ModuleSource::Files(files) = find(&kernel, "6.1.0-test", root.path()).unwrap() else {
            panic!("expected module files");
        };
        let names: Vec<&str> = files.iter().map(|(rel, _)| rel.as_str()).collect();
        assert_eq!(
            names,
            [
                "kernel/drivers/virtio/virtio_mmio.ko",
                "kernel/fs/fuse/fuse.ko",
                "kernel/fs/fuse/virtiofs.ko",
                "kernel/fs/overlayfs/overlay.ko"
            ]
        );
    }

    #[test]
    fn built_in_modules_are_left_out() {
        let dep = "kernel/fs/overlayfs/overlay.ko:\n";
        let root = tree(dep, "kernel/fs/fuse/virtiofs.ko\nkernel/fs/fuse/fuse.ko\n");
        let src = find(&root.path().join("k"), "6.1.0-test", root.path()).unwrap();
        assert!(matches!(src, ModuleSource::Files(f) if f.len() == 1));
    }

    #[test]
    fn a_kernel_without_virtio_fs_is_refused() {
        let root = tree(
            "kernel/fs/overlayfs/overlay.ko:\n",
            "kernel/fs/ext4/ext4.ko\n",
        );
        let err = find(&root.path().join("k"), "6.1.0-test", root.path()).unwrap_err();
        assert!(err.to_string().contains("has no virtio-fs"), "{err}");
    }

    #[test]
    fn compressed_modules_are_refused_by_name() {
        let root = tree("kernel/fs/fuse/virtiofs.ko.xz:\n", "");
        let err = find(&root.path().join("k"), "6.1.0-test", root.path()).unwrap_err();
        assert!(matches!(err, ModuleError::Compressed(_)), "{err}");
    }

    #[test]
    fn an_archive_next_to_the_kernel_wins_and_no_tree_means_none() {
        let root = tempfile::tempdir().unwrap();
        let kernel = root.path().join("vmlinuz");
        assert_eq!(
            find(&kernel, "9.9", root.path()).unwrap(),
            ModuleSource::None
        );
        let archive = root.path().join("modules-9.9.cpio");
        fs::write(&archive, b"").unwrap();
        assert_eq!(
            find(&kernel, "9.9", root.path()).unwrap(),
            ModuleSource::Archive(archive)
        );
    }
}
