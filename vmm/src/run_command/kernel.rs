//! Which kernel `evmm run` boots, and its release (the name of its module directory).

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

/// Environment variable naming the folder of the guest images (`guest-images/out`).
pub const GUEST_IMAGES_ENV: &str = "EVMM_GUEST_IMAGES";

/// Offset of the setup header's `kernel_version` field in a bzImage.
const KERNEL_VERSION_FIELD: u64 = 0x20e;
/// `kernel_version` is an offset from this one.
const KERNEL_VERSION_BASE: u64 = 0x200;
/// "HdrS", the setup header's magic, at offset 0x202.
const HDRS_OFFSET: u64 = 0x202;

/// The stock kernel of `guest-images/build`: in `$EVMM_GUEST_IMAGES`, else in the
/// `guest-images/out` of the repository the running executable was built in.
pub fn default_kernel() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os(GUEST_IMAGES_ENV) {
        let k = Path::new(&dir).join("vmlinuz");
        return k.is_file().then_some(k);
    }
    let exe = std::env::current_exe().ok()?;
    exe.ancestors()
        .skip(1)
        .map(|d| d.join("guest-images/out/vmlinuz"))
        .find(|k| k.is_file())
}

/// The release of the bzImage at `path` (`6.1.0-50-amd64`), from the version string its
/// setup header points at; `None` for a file that is not a bzImage.
pub fn release(path: &Path) -> io::Result<Option<String>> {
    let mut f = File::open(path)?;
    let mut magic = [0u8; 4];
    f.seek(SeekFrom::Start(HDRS_OFFSET))?;
    if f.read_exact(&mut magic).is_err() || &magic != b"HdrS" {
        return Ok(None);
    }
    let mut field = [0u8; 2];
    f.seek(SeekFrom::Start(KERNEL_VERSION_FIELD))?;
    f.read_exact(&mut field)?;
    let offset = u16::from_le_bytes(field);
    if offset == 0 {
        return Ok(None);
    }
    let mut text = [0u8; 128];
    f.seek(SeekFrom::Start(KERNEL_VERSION_BASE + u64::from(offset)))?;
    let n = f.read(&mut text)?;
    Ok(parse_release(&text[..n]))
}

/// The first word of a kernel version string.
fn parse_release(text: &[u8]) -> Option<String> {
    let end = text
        .iter()
        .position(|&b| b == 0 || b == b' ')
        .unwrap_or(text.len());
    let word = std::str::from_utf8(&text[..end]).ok()?;
    (!word.is_empty() && word.chars().all(|c| c.is_ascii_graphic())).then(|| word.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn bzimage(version: &[u8]) -> tempfile::NamedTempFile {
        let mut image = vec![0u8; 0x1000];
        image[0x202..0x206].copy_from_slice(b"HdrS");
        let at: u16 = 0x600;
        image[0x20e..0x210].copy_from_slice(&at.to_le_bytes());
        let start = 0x200 + usize::from(at);
        image[start..start + version.len()].copy_from_slice(version);
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(&image).unwrap();
        f
    }

    #[test]
    fn reads_the_release_from_the_setup_header() {
        let f = bzimage(b"6.1.0-50-amd64 (debian-kernel@lists.debian.org) #1 SMP\0");
        assert_eq!(
            release(f.path()).unwrap().as_deref(),
            Some("6.1.0-50-amd64")
        );
        let f = bzimage(b"6.12.0-rc1+\0");
        assert_eq!(release(f.path()).unwrap().as_deref(), Some("6.12.0-rc1+"));
    }

    #[test]
    fn not_a_bzimage_has_no_release() {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(b"\x7fELF").unwrap();
        assert_eq!(release(f.path()).unwrap(), None);
        assert_eq!(parse_release(b"\0"), None);
        assert_eq!(parse_release(b"\xff\xfe 1"), None);
    }
}
