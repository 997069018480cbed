//! A writer for "newc" cpio archives, the format of Linux initramfs images.

use std::fs::File;
use std::io::{self, Write};
use std::path::Path;

const MODE_DIR: u32 = 0o040_000;
const MODE_FILE: u32 = 0o100_000;

/// Writes entries of a newc archive to `W`; [`CpioWriter::finish`] writes the trailer.
pub struct CpioWriter<W: Write> {
    out: W,
    written: u64,
    next_ino: u32,
}

impl<W: Write> CpioWriter<W> {
    /// Starts an archive at the current position of `out`, which must be 4-byte aligned.
    pub fn new(out: W) -> Self {
        Self {
            out,
            written: 0,
            next_ino: 1,
        }
    }

    /// Adds a directory.
    pub fn dir(&mut self, name: &str) -> io::Result<()> {
        self.header(name, MODE_DIR | 0o755, 0)
    }

    /// Adds every directory on the way to `path` (not `path` itself), outermost first.
    pub fn parents(&mut self, path: &str) -> io::Result<()> {
        let mut prefix = String::new();
        let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
        for part in parts.iter().take(parts.len().saturating_sub(1)) {
            if !prefix.is_empty() {
                prefix.push('/');
            }
            prefix.push_str(part);
            self.dir(&prefix)?;
        }
        Ok(())
    }

    /// Adds a regular file with the given contents.
    pub fn file(&mut self, name: &str, mode: u32, data: &[u8]) -> io::Result<()> {
        self.header(name, MODE_FILE | (mode & 0o7777), data.len() as u64)?;
        self.write(data)?;
        self.pad()
    }

    /// Adds a regular file copied from the host file `src`.
    pub fn host_file(&mut self, name: &str, mode: u32, src: &Path) -> io::Result<()> {
        let mut f = File::open(src)?;
        let len = f.metadata()?.len();
        self.header(name, MODE_FILE | (mode & 0o7777), len)?;
        let copied = io::copy(&mut f, &mut self.out)?;
        if copied != len {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("{} changed size while being archived", src.display()),
            ));
        }
        self.written += copied;
        self.pad()
    }

    /// Writes the trailer and returns the underlying writer.
    pub fn finish(mut self) -> io::Result<W> {
        self.header("TRAILER!!!", 0, 0)?;
        self.out.flush()?;
        Ok(self.out)
    }

    fn header(&mut self, name: &str, mode: u32, size: u64) -> io::Result<()> {
        let size = u32::try_from(size).map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{name} is too large for cpio"),
            )
        })?;
        let name = name.trim_start_matches('/');
        let ino = self.next_ino;
        self.next_ino += 1;
        let nlink = if mode & MODE_DIR != 0 { 2 } else { 1 };
        let fields = [
            ino,
            mode,
            0,
            0,
            nlink,
            0,
            size,
            0,
            0,
            0,
            0,
            name.len() as u32 + 1,
            0,
        ];
        let mut header = String::with_capacity(110);
        header.push_str("070701");
        for field in fields {
            header.push_str(&format!("{field:08x}"));
        }
        self.write(header.as_bytes())?;
        self.write(name.as_bytes())?;
        self.write(&[0])?;
        self.pad()
    }

    fn write(&mut self, data: &[u8]) -> io::Result<()> {
        self.out.write_all(data)?;
        self.written += data.len() as u64;
        Ok(())
    }

    fn pad(&mut self) -> io::Result<()> {
        let pad = (4 - (self.written % 4) as usize) % 4;
        self.write(&[0; 3][..pad])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn archive_layout_is_newc() {
        let mut w = CpioWriter::new(Vec::new());
        w.parents("/a/b/file").unwrap();
        w.file("/a/b/file", 0o644, b"hello").unwrap();
        let bytes = w.finish().unwrap();
        let text = String::from_utf8_lossy(&bytes);
        assert!(bytes.starts_with(b"070701"));
        assert_eq!(bytes.len() % 4, 0);
        // Directories a, a/b, the file and the trailer, in that order.
        let names: Vec<_> = ["a\0", "a/b\0", "a/b/file\0\0hello", "TRAILER!!!\0"]
            .iter()
            .map(|n| text.find(n).expect(n))
            .collect();
        assert!(names.windows(2).all(|w| w[0] < w[1]));
        // The file's header: mode 0100644, size 5, name size 9.
        let at = text.find("a/b/file").unwrap() - 110;
        let header = &text[at..at + 110];
        assert_eq!(&header[14..22], "000081a4");
        assert_eq!(&header[54..62], "00000005");
        assert_eq!(&header[94..102], "00000009");
    }

    #[test]
    fn cpio_tool_reads_it_back() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        std::fs::write(&src, b"0123456789").unwrap();
        let archive = dir.path().join("x.cpio");
        let mut w = CpioWriter::new(File::create(&archive).unwrap());
        w.parents("d/e").unwrap();
        w.host_file("d/e", 0o755, &src).unwrap();
        w.finish().unwrap();
        let listing = std::process::Command::new("cpio")
            .args(["-it", "--quiet", "-F"])
            .arg(&archive)
            .output()
            .expect("the cpio tool is needed by this test (apt-get install cpio)");
        assert!(listing.status.success());
        assert_eq!(String::from_utf8_lossy(&listing.stdout), "d\nd/e\n");
    }
}
