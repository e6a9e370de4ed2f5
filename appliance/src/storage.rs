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

fn service_user(user: &str) -> anyhow::Result<nix::unistd::User> {
    use anyhow::Context;
    nix::unistd::User::from_name(user)
        .with_context(|| format!("looking up user {user}"))?
        .with_context(|| format!("user {user} does not exist"))
}

/// A data directory that a service writes after dropping root to `user`: created (and its
/// leftover temporaries removed) by root before the drop, then given to the user.
///
/// Under systemd, root holds only the unit's bounding set (CAP_CHOWN, no CAP_DAC_OVERRIDE or
/// CAP_FOWNER): it may give a directory away but not look into it or chmod it afterwards, so a
/// directory handed over on an earlier start is left as it is, and the entries are given away
/// before the directory. Not root (tests, development): the directory is simply created.
pub fn hand_over_dir(dir: &Path, mode: u32, user: &str) -> anyhow::Result<()> {
    use anyhow::Context;
    use std::os::unix::fs::MetadataExt;
    if !nix::unistd::Uid::effective().is_root() {
        ensure_private_dir(dir, mode).with_context(|| format!("creating {}", dir.display()))?;
        remove_stale_temporaries(dir);
        return Ok(());
    }
    let user = service_user(user)?;
    // The user must be able to pass through the (root-owned) parent to reach the directory.
    if let Some(parent) = dir.parent()
        && let Ok(m) = fs::metadata(parent)
        && m.uid() == 0
        && m.mode() & 0o001 == 0
    {
        fs::set_permissions(
            parent,
            fs::Permissions::from_mode((m.mode() & 0o7777) | 0o011),
        )
        .with_context(|| format!("letting {} pass through {}", user.name, parent.display()))?;
    }
    if fs::metadata(dir).is_ok_and(|m| m.uid() == user.uid.as_raw()) {
        return Ok(());
    }
    ensure_private_dir(dir, mode).with_context(|| format!("creating {}", dir.display()))?;
    remove_stale_temporaries(dir);
    let chown = |p: &Path| {
        nix::unistd::chown(p, Some(user.uid), Some(user.gid))
            .with_context(|| format!("giving {} to {}", p.display(), user.name))
    };
    for e in fs::read_dir(dir)?.flatten() {
        chown(&e.path())?;
    }
    chown(dir)
}

/// A directory both root (the supervisor) and `user` (a service) write: owned by root, group
/// `user`, mode 0770, so that neither needs DAC capabilities; files in it must be readable by
/// others (0644) for root to read the user's, and are protected by a root-only parent.
pub fn shared_dir(dir: &Path, user: &str) -> anyhow::Result<()> {
    use anyhow::Context;
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    if nix::unistd::Uid::effective().is_root() {
        let user = service_user(user)?;
        nix::unistd::chown(dir, Some(nix::unistd::Uid::from_raw(0)), Some(user.gid))
            .with_context(|| format!("giving {} to group {}", dir.display(), user.name))?;
    }
    fs::set_permissions(dir, fs::Permissions::from_mode(0o770))
        .with_context(|| format!("setting {} to 0770", dir.display()))
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
