//! Crash-safe writes of config and secret files.
//!
//! Every write goes to a temporary file in the same directory, is fsynced, and is renamed over
//! the target, then the directory is fsynced. Before the rename the current file is hard-linked
//! to `NAME.prev`, so the last version is kept. A reader therefore sees either the old or the new
//! file in full, whatever moment a SIGKILL or power cut hits. This module knows nothing about what
//! the files mean; validation happens before [`write_atomic`] is called.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// The kept previous version of `path`.
pub fn previous_version(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".prev");
    path.with_file_name(name)
}

fn temp_name(path: &Path, tag: &str) -> PathBuf {
    let mut name = std::ffi::OsString::from(".");
    name.push(path.file_name().unwrap_or_default());
    name.push(format!(".talkbox-{tag}.{}", std::process::id()));
    path.with_file_name(name)
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Writes `contents` to `path` atomically with file mode `mode`, keeping the previous version.
pub fn write_atomic(path: &Path, contents: &[u8], mode: u32) -> io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let tmp = temp_name(path, "new");
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        // The umask may have narrowed the mode; set it exactly.
        f.set_permissions(fs::Permissions::from_mode(mode))?;
        f.write_all(contents)?;
        f.sync_all()?;
        drop(f);
        if path.exists() {
            // Keep the previous version: link it under a temporary name, then rename that over
            // NAME.prev, so NAME.prev is never missing or partial either.
            let prev_tmp = temp_name(path, "prev");
            let _ = fs::remove_file(&prev_tmp);
            fs::hard_link(path, &prev_tmp)?;
            fs::rename(&prev_tmp, previous_version(path))?;
        }
        fs::rename(&tmp, path)?;
        sync_dir(&dir)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Removes temporary files left behind by writes that were killed half-way.
pub fn remove_stale_temporaries(dir: &Path) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let name = name.to_string_lossy();
        if name.starts_with('.')
            && (name.contains(".talkbox-new.") || name.contains(".talkbox-prev."))
        {
            let _ = fs::remove_file(e.path());
        }
    }
}

/// Creates `dir` (and parents) if needed and sets it to `mode`.
pub fn ensure_private_dir(dir: &Path, mode: u32) -> io::Result<()> {
    fs::create_dir_all(dir)?;
    fs::set_permissions(dir, fs::Permissions::from_mode(mode))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_replaces_and_keeps_previous_version() {
        let d = tempfile::tempdir().expect("tempdir");
        let p = d.path().join("talkbox.toml");
        write_atomic(&p, b"one", 0o600).expect("first write");
        assert!(!previous_version(&p).exists());
        write_atomic(&p, b"two", 0o600).expect("second write");
        assert_eq!(fs::read(&p).expect("read"), b"two");
        assert_eq!(fs::read(previous_version(&p)).expect("read prev"), b"one");
        let mode = fs::metadata(&p).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let leftovers: Vec<_> = fs::read_dir(d.path())
            .expect("ls")
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with('.'))
            .collect();
        assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
    }

    #[test]
    fn stale_temporaries_are_removed() {
        let d = tempfile::tempdir().expect("tempdir");
        fs::write(d.path().join(".talkbox.toml.talkbox-new.123"), b"half").expect("write");
        fs::write(d.path().join("keep"), b"x").expect("write");
        remove_stale_temporaries(d.path());
        let names: Vec<_> = fs::read_dir(d.path())
            .expect("ls")
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("keep")]);
    }
}
