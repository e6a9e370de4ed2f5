//! Network namespaces for tests that need more than loopback of the host (traffic shaping,
//! a second "host", a namespace with only loopback), and children killed on drop.
//! Needs root and iproute2.

use std::process::{Child, Command, Stdio};

/// A network namespace with its loopback up, deleted (with what still runs in it) on drop.
pub struct Netns(pub String);

impl Netns {
    pub fn new(name: String) -> Netns {
        // A namespace left by a killed earlier run would make `add` fail.
        let _ = Command::new("ip")
            .args(["netns", "del", &name])
            .stderr(Stdio::null())
            .status();
        let ok = Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .expect("ip (apt-get install iproute2)");
        assert!(ok.success(), "ip netns add {name} failed (needs root)");
        let ns = Netns(name);
        ns.run(&["ip", "link", "set", "lo", "up"]);
        ns
    }

    /// `program` to run inside the namespace.
    pub fn cmd(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.0, program]);
        c
    }

    /// Runs `argv` inside the namespace; panics with its stderr if it fails.
    pub fn run(&self, argv: &[&str]) {
        let out = self
            .cmd(argv[0])
            .args(&argv[1..])
            .output()
            .expect("ip netns exec");
        assert!(
            out.status.success(),
            "{argv:?} in {}: {}",
            self.0,
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Ok(out) = Command::new("ip").args(["netns", "pids", &self.0]).output() {
            for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                if let Ok(p) = pid.parse::<i32>() {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(p),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
            }
        }
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// A child process killed and reaped on drop.
pub struct Killed(pub Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
