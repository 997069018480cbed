//! The initramfs `evmm run` boots: the static busybox of the host, the init of
//! `init.sh`, the command and its directory, the modules the guest needs.

use std::fs::File;
use std::io::{self, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use evmm_cpio::CpioWriter;

use super::modules::ModuleSource;

/// The init script.
const INIT: &str = include_str!("init.sh");

/// Where a static busybox is looked for.
const BUSYBOX_PATHS: &[&str] = &["/bin/busybox", "/usr/bin/busybox"];

/// Errors of building the initramfs.
#[derive(Debug, thiserror::Error)]
pub enum InitramfsError {
    /// No static busybox on the host.
    #[error("no static busybox ({}): install busybox-static", BUSYBOX_PATHS.join(", "))]
    NoBusybox,
    /// Writing the archive failed.
    #[error("cannot write the initramfs {path}: {source}")]
    Write {
        /// The archive.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
}

/// What the guest runs and where.
#[derive(Debug, Clone)]
pub struct GuestCommand {
    /// The command and its arguments.
    pub argv: Vec<String>,
    /// The directory to run it in (a path in the share).
    pub cwd: String,
    /// Whether the share is mounted read-only with a tmpfs overlay.
    pub read_only: bool,
}

/// A static busybox of the host.
pub fn find_busybox() -> Result<PathBuf, InitramfsError> {
    BUSYBOX_PATHS
        .iter()
        .map(PathBuf::from)
        .find(|p| is_static_elf(p))
        .ok_or(InitramfsError::NoBusybox)
}

/// Writes the initramfs to `out`.
pub fn write(
    out: &Path,
    busybox: &Path,
    command: &GuestCommand,
    modules: &ModuleSource,
) -> Result<(), InitramfsError> {
    let err = |source| InitramfsError::Write {
        path: out.to_path_buf(),
        source,
    };
    let file = File::create(out).map_err(err)?;
    let mut w = BufWriter::new(file);
    let mut cpio = CpioWriter::new(&mut w);
    let add = || -> io::Result<()> {
        for dir in ["bin", "etc", "etc/evmm-run", "lib", "lib/modules"] {
            cpio.dir(dir)?;
        }
        cpio.file("init", 0o755, INIT.as_bytes())?;
        cpio.host_file("bin/busybox", 0o755, busybox)?;
        cpio.file(
            "etc/evmm-run/config",
            0o644,
            config_script(command).as_bytes(),
        )?;
        if let ModuleSource::Files(files) = modules {
            let mut list = String::new();
            for (rel, host) in files {
                cpio.parents(&format!("lib/modules/{rel}"))?;
                cpio.host_file(&format!("lib/modules/{rel}"), 0o644, host)?;
                list.push_str(rel);
                list.push('\n');
            }
            cpio.file("etc/evmm/modules", 0o644, list.as_bytes())?;
        }
        cpio.finish()?;
        Ok(())
    };
    add().map_err(err)?;
    if let ModuleSource::Archive(archive) = modules {
        // Linux unpacks concatenated archives one after the other.
        let mut src = File::open(archive).map_err(err)?;
        io::copy(&mut src, &mut w).map_err(err)?;
    }
    w.flush().map_err(err)
}

/// The shell lines the init sources: `cwd`, `share_ro` and the command as `$@`.
fn config_script(command: &GuestCommand) -> String {
    let argv: Vec<String> = command.argv.iter().map(|a| shell_quote(a)).collect();
    format!(
        "cwd={}\nshare_ro={}\nset -- {}\n",
        shell_quote(&command.cwd),
        u8::from(command.read_only),
        argv.join(" ")
    )
}

/// `s` in single quotes, safe for any shell.
fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// Whether `path` is an ELF executable without an interpreter (statically linked).
fn is_static_elf(path: &Path) -> bool {
    let mut bytes = Vec::new();
    if File::open(path)
        .and_then(|f| f.take(1 << 16).read_to_end(&mut bytes))
        .is_err()
    {
        return false;
    }
    elf_has_no_interpreter(&bytes)
}

/// Whether the ELF64 header in `bytes` describes a file without PT_INTERP.
fn elf_has_no_interpreter(bytes: &[u8]) -> bool {
    const PT_INTERP: u32 = 3;
    let u16_at = |o: usize| {
        bytes
            .get(o..o + 2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
    };
    let u32_at = |o: usize| {
        bytes
            .get(o..o + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    };
    let u64_at = |o: usize| {
        bytes
            .get(o..o + 8)
            .and_then(|b| b.try_into().ok())
            .map(u64::from_le_bytes)
    };
    if bytes.get(..5) != Some(b"\x7fELF\x02") {
        return false;
    }
    let (Some(phoff), Some(phentsize), Some(phnum)) = (u64_at(0x20), u16_at(0x36), u16_at(0x38))
    else {
        return false;
    };
    (0..usize::from(phnum)).all(|i| {
        let at = usize::try_from(phoff)
            .unwrap_or(usize::MAX)
            .saturating_add(i.saturating_mul(usize::from(phentsize)));
        u32_at(at).is_some_and(|t| t != PT_INTERP)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_is_quoted_for_the_shell() {
        let script = config_script(&GuestCommand {
            argv: vec!["sh".into(), "-c".into(), "echo 'hi' $x; exit 7".into()],
            cwd: "/home/a b".into(),
            read_only: true,
        });
        assert_eq!(
            script,
            "cwd='/home/a b'\nshare_ro=1\nset -- 'sh' '-c' 'echo '\\''hi'\\'' $x; exit 7'\n"
        );
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!("{script}\nprintf '%s|' \"$cwd\" \"$@\""))
            .output()
            .unwrap();
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            "/home/a b|sh|-c|echo 'hi' $x; exit 7|"
        );
    }

    #[test]
    fn static_and_dynamic_executables_are_told_apart() {
        // The test binary itself is dynamically linked.
        let me = std::env::current_exe().unwrap();
        assert!(!is_static_elf(&me));
        assert!(!elf_has_no_interpreter(b"#!/bin/sh\n"));
        assert!(!elf_has_no_interpreter(b"\x7fELF\x02"));
    }

    #[test]
    fn the_archive_has_the_init_the_command_and_the_modules() {
        let dir = tempfile::tempdir().unwrap();
        let busybox = dir.path().join("busybox");
        std::fs::write(&busybox, b"not really busybox").unwrap();
        let module = dir.path().join("virtiofs.ko");
        std::fs::write(&module, b"module").unwrap();
        let out = dir.path().join("initramfs.cpio");
        let command = GuestCommand {
            argv: vec!["true".into()],
            cwd: "/".into(),
            read_only: true,
        };
        let modules = ModuleSource::Files(vec![("kernel/fs/fuse/virtiofs.ko".into(), module)]);
        write(&out, &busybox, &command, &modules).unwrap();
        let listing = std::process::Command::new("cpio")
            .args(["-it", "--quiet"])
            .stdin(File::open(&out).unwrap())
            .output()
            .unwrap();
        let names = String::from_utf8_lossy(&listing.stdout);
        for want in [
            "init",
            "bin/busybox",
            "etc/evmm-run/config",
            "etc/evmm/modules",
            "lib/modules/kernel/fs/fuse/virtiofs.ko",
        ] {
            assert!(
                names.lines().any(|l| l == want),
                "{want} missing in:\n{names}"
            );
        }
    }
}
