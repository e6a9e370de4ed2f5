//! Starting one service as a child process of the same binary.
//!
//! The child gets its end of the supervisor link at descriptor 3, its own process group (so a
//! Ctrl-C in the terminal reaches only the supervisor, which then stops the children in order),
//! and a parent-death signal: if the supervisor is killed with SIGKILL, the kernel kills every
//! child, so no orphan keeps a port bound.

use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixDatagram as StdUnixDatagram;
use std::path::{Path, PathBuf};

use tokio::net::UnixDatagram;
use tokio::process::{Child, Command};

use super::link::{LINK_FD, LINK_FD_ENV};
use crate::service::Service;

/// Where the child finds its data and config.
#[derive(Debug, Clone)]
pub struct ChildArgs {
    pub exe: PathBuf,
    pub data_dir: PathBuf,
    pub config: Option<PathBuf>,
}

/// Starts `service` and returns the process and the supervisor's end of its link.
pub fn spawn(service: Service, args: &ChildArgs) -> io::Result<(Child, UnixDatagram)> {
    let (ours, theirs) = StdUnixDatagram::pair()?;
    ours.set_nonblocking(true)?;
    let their_fd = theirs.as_raw_fd();
    let supervisor_pid = std::process::id() as libc::pid_t;
    let mut cmd = Command::new(&args.exe);
    cmd.arg(service.name())
        .arg("--data-dir")
        .arg(&args.data_dir);
    if let Some(c) = &args.config {
        cmd.arg("--config").arg(c);
    }
    cmd.env(LINK_FD_ENV, LINK_FD.to_string())
        .stdin(std::process::Stdio::null())
        .kill_on_drop(false);
    // SAFETY: the closure runs between fork and exec and only makes async-signal-safe calls
    // (prctl, getppid, setpgid, dup2, fcntl, _exit); it allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(
                libc::PR_SET_PDEATHSIG,
                libc::SIGKILL as libc::c_ulong,
                0,
                0,
                0,
            ) != 0
            {
                return Err(io::Error::last_os_error());
            }
            // The supervisor may have died between fork and prctl: then nobody would kill us.
            if libc::getppid() != supervisor_pid {
                libc::_exit(1);
            }
            if libc::setpgid(0, 0) != 0 {
                return Err(io::Error::last_os_error());
            }
            if their_fd == LINK_FD {
                let flags = libc::fcntl(LINK_FD, libc::F_GETFD);
                if flags < 0 || libc::fcntl(LINK_FD, libc::F_SETFD, flags & !libc::FD_CLOEXEC) < 0 {
                    return Err(io::Error::last_os_error());
                }
            } else if libc::dup2(their_fd, LINK_FD) < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd.spawn()?;
    // Our copy of the child's end is no longer needed; the child has its own.
    drop(theirs);
    Ok((child, UnixDatagram::from_std(ours)?))
}

/// The running binary, for starting children of the same version.
pub fn current_exe() -> io::Result<PathBuf> {
    let p = std::env::current_exe()?;
    // After an in-place upgrade /proc/self/exe reads "... (deleted)"; the path still names
    // the new binary, which is what a restarted child should run.
    let s = p.to_string_lossy();
    Ok(match s.strip_suffix(" (deleted)") {
        Some(stripped) => Path::new(stripped).to_path_buf(),
        None => p,
    })
}
