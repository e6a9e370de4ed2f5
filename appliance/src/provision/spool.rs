//! The spool between the provision service (unprivileged, network-facing) and the supervisor
//! (root, decides and writes): `DATA_DIR/provisioning/spool/`, owned by the service user.
//!
//! The service opens the directory before it drops root and afterwards works only relative to
//! that descriptor (the data directory above it is root-only). It writes `ID.request` (JSON:
//! token, client key, peer, bundle) with a temporary name and a rename, so the supervisor never
//! sees half a request; the supervisor takes and removes it, and writes `ID.answer`, which the
//! service reads and removes. Both sides bound what they read; ids are 16 hex digits.

use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;

use anyhow::{Context, Result};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use nix::fcntl::{OFlag, openat, renameat};
use nix::sys::stat::Mode;
use nix::unistd::{UnlinkatFlags, unlinkat};
use serde::{Deserialize, Serialize};

use crate::storage;

/// Largest request file (a bundle in base64 plus a little).
const MAX_REQUEST: u64 = (provisioning::bundle::MAX_BUNDLE_BYTES as u64) * 4 / 3 + 8192;
/// Largest answer file.
const MAX_ANSWER: u64 = 64 * 1024;
/// Requests handled per poll.
const MAX_PER_POLL: usize = 16;

/// One push, as the service hands it over.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RequestFile {
    token: String,
    client_key: String,
    peer: String,
    bundle: String,
}

#[derive(Debug, Clone)]
pub struct Request {
    pub id: String,
    pub token: String,
    pub client_key: [u8; 32],
    pub peer: String,
    pub bundle: Vec<u8>,
}

/// The supervisor's verdict on one push (also the body of the HTTP answer).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Answer {
    /// `applied`, `rolled-back` or `refused`.
    pub result: String,
    /// For refusals: `token`, `client`, `busy`, `bundle`; `checks` for a rollback.
    #[serde(default)]
    pub reason: String,
    pub message: String,
    pub box_id: String,
    pub serial: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub login_link: Option<String>,
}

impl Answer {
    pub fn new(result: &str, reason: &str, message: &str, box_id: &str, serial: u64) -> Self {
        Self {
            result: result.into(),
            reason: reason.into(),
            message: message.into(),
            box_id: box_id.into(),
            serial,
            login_link: None,
        }
    }
}

fn valid_id(id: &str) -> bool {
    id.len() == 16
        && id
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
}

/// Creates the spool (root-owned, group of the service user) and empties it.
pub fn prepare(dir: &Path, user: &str) -> Result<()> {
    // Root (the supervisor, without DAC capabilities under systemd) and the service both
    // write here.
    storage::shared_dir(dir, user)?;
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let _ = std::fs::remove_file(e.path());
        }
    }
    Ok(())
}

/// The supervisor's side: takes the waiting requests (removing their files).
pub fn take_requests(dir: &Path) -> Vec<Request> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for e in entries.flatten().take(256) {
        let name = e.file_name().to_string_lossy().to_string();
        let Some(id) = name.strip_suffix(".request") else {
            continue;
        };
        let path = e.path();
        let bytes = std::fs::symlink_metadata(&path)
            .ok()
            .filter(|m| m.is_file() && m.len() <= MAX_REQUEST)
            .and_then(|_| std::fs::read(&path).ok());
        let _ = std::fs::remove_file(&path);
        if !valid_id(id) {
            tracing::warn!(file = %path.display(), "provisioning: spool file with a bad name removed");
            continue;
        }
        let parsed = bytes
            .and_then(|b| serde_json::from_slice::<RequestFile>(&b).ok())
            .and_then(|r| {
                let key = STANDARD
                    .decode(&r.client_key)
                    .ok()
                    .and_then(|k| <[u8; 32]>::try_from(k).ok())?;
                let bundle = STANDARD.decode(&r.bundle).ok()?;
                Some(Request {
                    id: id.to_string(),
                    token: r.token,
                    client_key: key,
                    peer: r.peer,
                    bundle,
                })
            });
        match parsed {
            Some(r) => out.push(r),
            None => {
                tracing::warn!(file = %path.display(), "provisioning: unreadable spool request removed")
            }
        }
        if out.len() >= MAX_PER_POLL {
            break;
        }
    }
    out
}

/// The supervisor's side: writes the verdict for request `id`.
pub fn answer(dir: &Path, id: &str, a: &Answer) {
    if !valid_id(id) {
        return;
    }
    let path = dir.join(format!("{id}.answer"));
    let r = serde_json::to_vec(a)
        .map_err(std::io::Error::other)
        .and_then(|b| storage::write_atomic(&path, &b, 0o644));
    if let Err(e) = r {
        tracing::error!(file = %path.display(), error = %e, "provisioning: cannot write the answer to a push");
    }
}

/// The service's side: the spool directory, opened while still root.
pub struct Spool {
    dir: OwnedFd,
}

impl Spool {
    pub fn open(dir: &Path) -> Result<Spool> {
        let fd = nix::fcntl::open(
            dir,
            OFlag::O_DIRECTORY | OFlag::O_RDONLY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .with_context(|| format!("opening the spool {}", dir.display()))?;
        Ok(Spool { dir: fd })
    }

    /// Hands a push to the supervisor; returns the request id.
    pub fn submit(
        &self,
        token: &str,
        client_key: &[u8; 32],
        peer: &str,
        bundle: &[u8],
    ) -> Result<String> {
        let mut random = [0u8; 8];
        getrandom::fill(&mut random).map_err(|e| anyhow::anyhow!("no random numbers: {e}"))?;
        let id = hex::encode(random);
        let body = serde_json::to_vec(&RequestFile {
            token: token.into(),
            client_key: STANDARD.encode(client_key),
            peer: peer.into(),
            bundle: STANDARD.encode(bundle),
        })?;
        let tmp = format!(".{id}.tmp");
        let fd = openat(
            self.dir.as_fd(),
            tmp.as_str(),
            OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_WRONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            // Readable by others: the supervisor reads it as root without DAC capabilities;
            // the root-only provisioning directory above keeps everyone else out.
            Mode::from_bits_truncate(0o644),
        )
        .context("creating a spool request")?;
        let mut f = std::fs::File::from(fd);
        f.write_all(&body).context("writing a spool request")?;
        f.sync_all().context("writing a spool request")?;
        renameat(
            self.dir.as_fd(),
            tmp.as_str(),
            self.dir.as_fd(),
            format!("{id}.request").as_str(),
        )
        .context("publishing a spool request")?;
        Ok(id)
    }

    /// The supervisor's answer to `id`, if it is there yet (removed once read).
    pub fn take_answer(&self, id: &str) -> Option<Answer> {
        let name = format!("{id}.answer");
        let fd = openat(
            self.dir.as_fd(),
            name.as_str(),
            OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .ok()?;
        let mut buf = Vec::new();
        std::fs::File::from(fd)
            .take(MAX_ANSWER)
            .read_to_end(&mut buf)
            .ok()?;
        let _ = unlinkat(self.dir.as_fd(), name.as_str(), UnlinkatFlags::NoRemoveDir);
        serde_json::from_slice(&buf).ok()
    }

    /// Withdraws a request the supervisor has not taken yet (the client went away).
    pub fn withdraw(&self, id: &str) {
        let _ = unlinkat(
            self.dir.as_fd(),
            format!("{id}.request").as_str(),
            UnlinkatFlags::NoRemoveDir,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_and_answer_go_through_the_spool() {
        let d = tempfile::tempdir().expect("tempdir");
        prepare(d.path(), "nobody").expect("prepare");
        let s = Spool::open(d.path()).expect("open");
        let id = s
            .submit("tok", &[3u8; 32], "127.0.0.1:1", b"bundle")
            .expect("submit");
        let reqs = take_requests(d.path());
        assert_eq!(reqs.len(), 1);
        assert_eq!(reqs[0].id, id);
        assert_eq!(reqs[0].bundle, b"bundle");
        assert_eq!(reqs[0].client_key, [3u8; 32]);
        assert!(take_requests(d.path()).is_empty(), "taken once");
        assert!(s.take_answer(&id).is_none());
        let a = Answer::new("refused", "token", "wrong enrolment token", "tb-x", 0);
        answer(d.path(), &id, &a);
        assert_eq!(s.take_answer(&id), Some(a));
        assert!(s.take_answer(&id).is_none(), "read once");
    }

    #[test]
    fn spool_files_with_bad_names_or_content_are_removed_unread() {
        let d = tempfile::tempdir().expect("tempdir");
        std::fs::write(d.path().join("ZZ.request"), b"{}").expect("w");
        std::fs::write(d.path().join("0123456789abcdef.request"), b"not json").expect("w");
        assert!(take_requests(d.path()).is_empty());
        assert_eq!(std::fs::read_dir(d.path()).expect("ls").count(), 0);
    }
}
