//! Where bundles come from besides a push: a stick or partition labelled `TALKBOX-PROV` (read
//! at supervisor start, under the image only, from the copies the image's
//! `talkbox-provision-media.service` made of it), qemu's fw_cfg
//! (`-fw_cfg name=opt/talkbox/bundle,file=…`), and files dropped into
//! `DATA_DIR/provisioning/incoming/` (taken and removed). Each reader bounds what it reads and
//! skips quietly when its source is absent.

use std::path::{Path, PathBuf};

use provisioning::bundle::MAX_BUNDLE_BYTES;

/// The filesystem label of a provisioning stick or partition.
pub const USB_LABEL: &str = "TALKBOX-PROV";
/// Where qemu's fw_cfg item `opt/talkbox/bundle` appears in the guest.
pub const FW_CFG_BUNDLE: &str = "/sys/firmware/qemu_fw_cfg/by_name/opt/talkbox/bundle/raw";
/// Most bundle files read from one source at once.
const MAX_FILES: usize = 16;

/// True when running inside the talkbox image (its os-release says so).
pub fn is_image() -> bool {
    std::fs::read_to_string("/usr/lib/os-release")
        .or_else(|_| std::fs::read_to_string("/etc/os-release"))
        .is_ok_and(|t| t.lines().any(|l| l.trim() == "IMAGE_ID=talkbox"))
}

fn read_bounded(path: &Path) -> Option<Vec<u8>> {
    let meta = std::fs::symlink_metadata(path).ok()?;
    if !meta.is_file() {
        return None;
    }
    if meta.len() > MAX_BUNDLE_BYTES as u64 {
        tracing::warn!(file = %path.display(), bytes = meta.len(), "provisioning: ignored, larger than a bundle may be ({MAX_BUNDLE_BYTES} bytes)");
        return None;
    }
    std::fs::read(path).ok()
}

fn bundle_files(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "bundle"))
        .collect();
    files.sort();
    files.truncate(MAX_FILES);
    files
}

/// Takes every `*.bundle` file from the drop directory (removing it, so it is handled once).
pub fn take_incoming(dir: &Path) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for f in bundle_files(dir) {
        let bytes = read_bounded(&f);
        if let Err(e) = std::fs::remove_file(&f) {
            tracing::warn!(file = %f.display(), error = %e, "provisioning: cannot remove a dropped bundle");
            continue;
        }
        match bytes {
            Some(b) => out.push(b),
            None => {
                tracing::warn!(file = %f.display(), "provisioning: dropped bundle unreadable or too large; removed")
            }
        }
    }
    out
}

/// Reads the fw_cfg bundle if qemu gave one.
pub fn read_fw_cfg() -> Option<Vec<u8>> {
    let p = Path::new(FW_CFG_BUNDLE);
    if !p.exists() {
        return None;
    }
    // fw_cfg files report size 0 in sysfs; read with a bound instead of trusting metadata.
    use std::io::Read;
    let f = std::fs::File::open(p).ok()?;
    let mut buf = Vec::new();
    f.take(MAX_BUNDLE_BYTES as u64 + 1)
        .read_to_end(&mut buf)
        .ok()?;
    if buf.len() > MAX_BUNDLE_BYTES {
        tracing::warn!("provisioning: fw_cfg bundle larger than {MAX_BUNDLE_BYTES} bytes; ignored");
        return None;
    }
    Some(buf)
}

/// Where the image's `talkbox-provision-media.service` puts the `*.bundle` files of a
/// `TALKBOX-PROV` stick or partition before the supervisor starts. The supervisor cannot mount
/// the device itself: its unit has no device nodes (`PrivateDevices`), no mount system calls
/// and no `CAP_SYS_ADMIN`. The copies live on a tmpfs, so they are gone at the next boot.
pub const USB_STAGING: &str = "/run/talkbox-prov";

/// Reads the `*.bundle` files staged from a `TALKBOX-PROV` stick or partition (see
/// [`USB_STAGING`]). No stick: nothing, quietly.
pub fn read_usb() -> Vec<Vec<u8>> {
    read_staged(Path::new(USB_STAGING))
}

fn read_staged(dir: &Path) -> Vec<Vec<u8>> {
    let files = bundle_files(dir);
    if files.is_empty() {
        return Vec::new();
    }
    let bundles: Vec<Vec<u8>> = files.iter().filter_map(|f| read_bounded(f)).collect();
    tracing::info!(dir = %dir.display(), files = files.len(), bundles = bundles.len(), "provisioning: read the bundles of the {USB_LABEL} device");
    bundles
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dropped_bundles_are_taken_once_and_other_files_left() {
        let d = tempfile::tempdir().expect("tempdir");
        std::fs::write(d.path().join("a.bundle"), b"A").expect("a");
        std::fs::write(d.path().join("notes.txt"), b"n").expect("n");
        assert_eq!(take_incoming(d.path()), vec![b"A".to_vec()]);
        assert!(take_incoming(d.path()).is_empty());
        assert!(d.path().join("notes.txt").exists());
    }

    #[test]
    fn staged_stick_bundles_are_read_and_left_in_place() {
        let d = tempfile::tempdir().expect("tempdir");
        assert!(read_staged(&d.path().join("absent")).is_empty());
        std::fs::write(d.path().join("b.bundle"), b"B").expect("b");
        std::fs::write(d.path().join("a.bundle"), b"A").expect("a");
        std::fs::write(d.path().join("readme.txt"), b"r").expect("r");
        assert_eq!(read_staged(d.path()), vec![b"A".to_vec(), b"B".to_vec()]);
        // Read-only for the supervisor: a restart reads them again (refused as a replay).
        assert_eq!(read_staged(d.path()).len(), 2);
    }
}
