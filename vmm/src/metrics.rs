//! The `--metrics` file: every device's counters as one JSON document,
//! written once when the VM stops.
//!
//! ```json
//! {"notify": "ioeventfd",
//!  "devices": [{"kind": "virtio-blk", "id": "serial0", "path": "/tmp/a.img",
//!               "mmio_base": 3221225472, "gsi": 5, "transport": { ... }}]}
//! ```
//!
//! `kind` is `virtio-blk` (`--disk`) or `vhost-user-blk` (`--vhost-user-blk`,
//! whose `path` is the backend's socket). `transport` is what the device's
//! transport reports (its QueueNotify exits and the device's counters: per
//! queue for a disk; the backend's state and what evmm answered after losing
//! it for a vhost-user-blk device); `id` is null for a disk without `id=` and
//! for vhost-user-blk devices.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::Serialize;

/// Errors while writing the metrics file.
#[derive(Debug, thiserror::Error)]
#[error("cannot write the metrics to {path}: {source}")]
pub struct MetricsError {
    /// The metrics file.
    pub path: PathBuf,
    /// Why.
    #[source]
    pub source: std::io::Error,
}

/// One device in the report.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DeviceRecord {
    /// `"virtio-blk"` or `"vhost-user-blk"`.
    pub kind: &'static str,
    /// The disk's `id=` (its GET_ID serial), if given.
    pub id: Option<String>,
    /// The backing file (or the vhost-user socket), as given on the command line.
    pub path: String,
    /// Guest-physical base of the device's MMIO window.
    pub mmio_base: u64,
    /// The device's GSI.
    pub gsi: u32,
    /// The transport's and device's counters.
    pub transport: serde_json::Value,
}

/// The whole document.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MetricsReport {
    /// `"ioeventfd"` or `"exit"`: how queue notifications were delivered.
    pub notify: &'static str,
    /// Every device, in command-line order.
    pub devices: Vec<DeviceRecord>,
}

impl MetricsReport {
    /// Writes the report to `path`: to a temporary file beside it first,
    /// renamed over `path`, so a reader never sees half a document.
    pub fn write_to(&self, path: &Path) -> Result<(), MetricsError> {
        let err = |source| MetricsError {
            path: path.to_path_buf(),
            source,
        };
        let mut json = serde_json::to_vec_pretty(self).map_err(|e| err(e.into()))?;
        json.push(b'\n');
        // A fresh, unpredictable name created exclusively (O_EXCL: an existing file or a
        // symlink planted at the name is never followed or overwritten), then renamed.
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        let prefix = format!(
            ".{}.",
            path.file_name().unwrap_or_default().to_string_lossy()
        );
        let written = tempfile::Builder::new()
            .prefix(&prefix)
            .suffix(".tmp")
            .tempfile_in(dir)
            .and_then(|mut tmp| {
                tmp.write_all(&json)?;
                tmp.persist(path).map_err(|e| e.error)?;
                Ok(())
            });
        written.map_err(err)?;
        log::info!("metrics written to {}", path.display());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn report() -> MetricsReport {
        MetricsReport {
            notify: "exit",
            devices: vec![DeviceRecord {
                kind: "virtio-blk",
                id: Some("disk0".into()),
                path: "/tmp/a.img".into(),
                mmio_base: 0xc000_0000,
                gsi: 5,
                transport: json!({"notify_exits": 3}),
            }],
        }
    }

    #[test]
    fn document_shape() {
        let v = serde_json::to_value(report()).unwrap();
        assert_eq!(
            v,
            json!({"notify": "exit", "devices": [{"kind": "virtio-blk", "id": "disk0", "path": "/tmp/a.img",
                "mmio_base": 0xc000_0000u64, "gsi": 5, "transport": {"notify_exits": 3}}]})
        );
        let empty = MetricsReport {
            notify: "ioeventfd",
            devices: vec![],
        };
        assert_eq!(
            serde_json::to_value(empty).unwrap(),
            json!({"notify": "ioeventfd", "devices": []})
        );
    }

    #[test]
    fn writes_the_file_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.json");
        std::fs::write(&path, "old").unwrap();
        report().write_to(&path).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        assert_eq!(v["devices"][0]["gsi"], 5);
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            1,
            "no temp left"
        );
        let err = report()
            .write_to(&dir.path().join("missing/m.json"))
            .unwrap_err();
        assert!(err.to_string().contains("missing/m.json"), "{err}");
    }

    #[test]
    fn a_symlink_at_the_old_temporary_name_is_not_followed() {
        // The name the file used to be written through first (`m.json.tmp<pid>`),
        // planted by someone else as a symlink to a file of the victim's.
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        std::fs::write(&victim, "precious").unwrap();
        let path = dir.path().join("m.json");
        let planted = dir.path().join(format!("m.json.tmp{}", std::process::id()));
        std::os::unix::fs::symlink(&victim, &planted).unwrap();
        report().write_to(&path).unwrap();
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");
        let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        assert_eq!(v["notify"], "exit");
    }
}
