//! What kind of image a file is, and the task's copy-on-write overlay.

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use super::cmdline::DiskFormat;

const QCOW2_MAGIC: &[u8; 4] = b"QFI\xfb";
/// ISO 9660: the primary volume descriptor at sector 16 starts with 1, CD001.
const ISO_MAGIC_OFFSET: u64 = 0x8001;
const ISO_MAGIC: &[u8; 5] = b"CD001";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageKind {
    Iso,
    Disk(DiskFormat),
}

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("Cannot read image {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("Cannot run qemu-img to create the overlay {}", path.display())]
    QemuImgSpawn {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("qemu-img could not create the overlay {}: {stderr}", path.display())]
    QemuImg { path: PathBuf, stderr: String },
}

/// Classifies an image by its first bytes. Pure over the bytes read.
pub fn classify(head: &[u8], iso_marker: Option<&[u8]>) -> ImageKind {
    if iso_marker == Some(ISO_MAGIC.as_slice()) {
        // Checked first: a hybrid ISO also carries a boot sector at 0.
        ImageKind::Iso
    } else if head.starts_with(QCOW2_MAGIC) {
        ImageKind::Disk(DiskFormat::Qcow2)
    } else {
        ImageKind::Disk(DiskFormat::Raw)
    }
}

/// Reads the magic bytes of the image at `path`.
pub fn detect(path: &Path) -> Result<ImageKind, ImageError> {
    let read = || -> std::io::Result<ImageKind> {
        let mut f = std::fs::File::open(path)?;
        let mut head = [0u8; 4];
        let n = read_up_to(&mut f, &mut head)?;
        let mut marker = [0u8; 5];
        f.seek(SeekFrom::Start(ISO_MAGIC_OFFSET))?;
        let m = read_up_to(&mut f, &mut marker)?;
        Ok(classify(
            &head[..n],
            (m == marker.len()).then_some(&marker[..]),
        ))
    };
    read().map_err(|source| ImageError::Read {
        path: path.to_path_buf(),
        source,
    })
}

fn read_up_to(f: &mut std::fs::File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match f.read(&mut buf[filled..])? {
            0 => break,
            n => filled += n,
        }
    }
    Ok(filled)
}

/// The `qemu-img` arguments for an overlay backed by `base`.
pub fn overlay_args(base: &Path, format: DiskFormat, overlay: &Path) -> Vec<std::ffi::OsString> {
    vec![
        "create".into(),
        "-q".into(),
        "-f".into(),
        "qcow2".into(),
        "-b".into(),
        base.into(),
        "-F".into(),
        format.as_str().into(),
        overlay.into(),
    ]
}

/// Creates the task's overlay, so the guest never writes the cached image.
pub async fn create_overlay(
    base: &Path,
    format: DiskFormat,
    overlay: &Path,
) -> Result<(), ImageError> {
    let out = tokio::process::Command::new("qemu-img")
        .args(overlay_args(base, format, overlay))
        .output()
        .await
        .map_err(|source| ImageError::QemuImgSpawn {
            path: overlay.to_path_buf(),
            source,
        })?;
    if !out.status.success() {
        return Err(ImageError::QemuImg {
            path: overlay.to_path_buf(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classify_by_magic() {
        assert_eq!(
            classify(b"QFI\xfb", None),
            ImageKind::Disk(DiskFormat::Qcow2)
        );
        assert_eq!(
            classify(b"\xeb\x63\x90\x10", None),
            ImageKind::Disk(DiskFormat::Raw)
        );
        assert_eq!(
            classify(b"\xeb\x63\x90\x10", Some(b"CD001")),
            ImageKind::Iso
        );
        assert_eq!(classify(b"", None), ImageKind::Disk(DiskFormat::Raw));
    }

    #[tokio::test]
    async fn real_files_and_a_real_overlay() {
        let dir = tempfile::tempdir().unwrap();
        let raw = dir.path().join("disk.raw");
        std::fs::write(&raw, vec![0u8; 1 << 20]).unwrap();
        assert_eq!(detect(&raw).unwrap(), ImageKind::Disk(DiskFormat::Raw));

        let mut iso = vec![0u8; 0x9000];
        iso[0x8001..0x8006].copy_from_slice(b"CD001");
        let iso_path = dir.path().join("x.iso");
        std::fs::write(&iso_path, iso).unwrap();
        assert_eq!(detect(&iso_path).unwrap(), ImageKind::Iso);

        let overlay = dir.path().join("overlay.qcow2");
        create_overlay(&raw, DiskFormat::Raw, &overlay)
            .await
            .unwrap();
        assert_eq!(
            detect(&overlay).unwrap(),
            ImageKind::Disk(DiskFormat::Qcow2)
        );

        let err = create_overlay(
            &dir.path().join("missing"),
            DiskFormat::Raw,
            &dir.path().join("o2.qcow2"),
        )
        .await
        .unwrap_err();
        assert!(matches!(err, ImageError::QemuImg { .. }), "{err}");
    }
}
