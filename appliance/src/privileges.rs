//! Least privilege for the services: switch from root to the service user, keeping at most
//! CAP_NET_BIND_SERVICE.
//!
//! A service started as root (the supervisor under systemd, or `sudo talkbox run`) first reads
//! what only root may read (its secrets, the TLS key), then calls [`drop_to_user`] before it
//! starts any thread: capabilities are per thread, so a later call would leave other threads
//! privileged. A service started by an ordinary user has nothing to drop.

use anyhow::{Context, Result, bail};
use caps::{CapSet, Capability, CapsHashSet};
use nix::unistd::{Gid, Uid, User, setgid, setgroups, setuid};

/// What a service keeps after dropping root.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Keep {
    Nothing,
    /// Bind ports below 1024 (443, 80, ...).
    NetBindService,
}

/// When running as root, checks that the service user exists and is not root.
pub fn check_user(user: &str) -> Result<()> {
    if Uid::effective().is_root() {
        service_user(user)?;
    }
    Ok(())
}

fn service_user(user: &str) -> Result<User> {
    let Some(u) = User::from_name(user).with_context(|| format!("looking up user {user}"))? else {
        bail!(
            "user '{user}' (supervisor.user) does not exist; create it with \
             `useradd --system --no-create-home --shell /usr/sbin/nologin {user}` \
             or set supervisor.user to another unprivileged user"
        );
    };
    if u.uid.is_root() {
        bail!("supervisor.user '{user}' is root; name an unprivileged user");
    }
    Ok(u)
}

/// Switches the process to `user` if it runs as root. Must run before any thread is started.
pub fn drop_to_user(user: &str, keep: Keep) -> Result<()> {
    if !Uid::effective().is_root() {
        return Ok(());
    }
    let u = service_user(user)?;
    let mut keep_set = CapsHashSet::new();
    if keep == Keep::NetBindService {
        keep_set.insert(Capability::CAP_NET_BIND_SERVICE);
    }
    // Shrink the bounding set while we still hold CAP_SETPCAP, so nothing can come back later.
    for cap in caps::all() {
        if !keep_set.contains(&cap) {
            caps::drop(None, CapSet::Bounding, cap)
                .with_context(|| format!("dropping {cap} from the bounding set"))?;
        }
    }
    setgroups(&[]).context("clearing supplementary groups")?;
    setgid(Gid::from_raw(u.gid.as_raw()))
        .with_context(|| format!("switching to group {}", u.gid))?;
    caps::securebits::set_keepcaps(true).context("keeping capabilities across setuid")?;
    setuid(u.uid).with_context(|| format!("switching to user {user}"))?;
    caps::securebits::set_keepcaps(false).context("resetting keepcaps")?;
    caps::set(None, CapSet::Permitted, &keep_set).context("setting permitted capabilities")?;
    caps::set(None, CapSet::Effective, &keep_set).context("setting effective capabilities")?;
    caps::clear(None, CapSet::Inheritable).context("clearing inheritable capabilities")?;
    // No setuid binary or file capability can give anything back.
    nix::sys::prctl::set_no_new_privs().context("setting no_new_privs")?;
    if Uid::effective().is_root() || setuid(Uid::from_raw(0)).is_ok() {
        bail!("dropping root failed: the process can still become root");
    }
    Ok(())
}
