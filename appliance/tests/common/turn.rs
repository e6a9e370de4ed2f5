//! TURN test pieces: the `talkbox turn` process with a test config, and a small blocking TURN
//! client over UDP or TCP.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};

use super::free_port;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use appliance::config::{Config, DataDir};
use appliance::turn::credentials;

use super::stun_msgs::{self, Creds, Reply};

/// A free run of `n` UDP ports below the kernel's ephemeral range, for a relay range.
pub fn free_relay_range(n: u16) -> (u16, u16) {
    let seed = std::process::id() as u16;
    for attempt in 0..200u16 {
        let lo = 20_000 + ((seed.wrapping_mul(7).wrapping_add(attempt.wrapping_mul(211))) % 10_000);
        let hi = lo + n - 1;
        if hi >= 32_000 {
            continue;
        }
        let ok = (lo..=hi).all(|p| UdpSocket::bind(("127.0.0.1", p)).is_ok());
        if ok {
            return (lo, hi);
        }
    }
    panic!("no free relay port range");
}

/// A running `talkbox turn` on loopback, killed on drop.
pub struct TurnProcess {
    pub child: Child,
    pub dir: tempfile::TempDir,
    pub port: u16,
    pub tls_port: u16,
    pub metrics_port: u16,
    pub secret: String,
    pub realm: String,
}

impl TurnProcess {
    /// Starts the server with `extra` lines added to its `[turn]` section.
    pub fn start(extra: &str) -> Self {
        Self::start_with(extra, |_| {})
    }

    /// Like [`start`](Self::start); `before` may add files to the data directory first.
    pub fn start_with(extra: &str, before: impl FnOnce(&Path)) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let (port, tls_port, metrics_port) = (free_port(), free_port(), free_port());
        let (lo, hi) = free_relay_range(64);
        let text = format!(
            "[signaling]\nenabled = false\n[sfu]\nenabled = false\n[web]\nenabled = false\n\
             [turn]\nport = {port}\ntls_port = {tls_port}\nrelay_port_min = {lo}\nrelay_port_max = {hi}\n\
             metrics_listen = \"127.0.0.1:{metrics_port}\"\n{extra}\n"
        );
        let config_path = dir.path().join("talkbox.toml");
        std::fs::write(&config_path, &text).expect("write config");
        let config = Config::from_toml("test", &text).expect("test config is valid");
        let data = DataDir::new(dir.path().join("data"));
        appliance::supervisor::prepare_data_dir(&data, &config).expect("prepare data dir");
        before(&data.root);
        let secret = std::fs::read_to_string(data.secrets_dir().join("turn-secret"))
            .expect("turn secret")
            .trim()
            .to_string();
        let log = std::fs::File::create(dir.path().join("turn.log")).expect("log file");
        let child = Command::new(env!("CARGO_BIN_EXE_talkbox"))
            .args(["turn", "--data-dir"])
            .arg(&data.root)
            .arg("--config")
            .arg(&config_path)
            .env_remove("TALKBOX_SUPERVISOR_FD")
            .env("RUST_LOG", "debug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start talkbox turn");
        let p = TurnProcess {
            child,
            dir,
            port,
            tls_port,
            metrics_port,
            secret,
            realm: config.turn.realm.clone(),
        };
        p.wait_ready();
        p
    }

    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        let sock = UdpSocket::bind("127.0.0.1:0").expect("bind");
        sock.set_read_timeout(Some(Duration::from_millis(200)))
            .expect("timeout");
        while Instant::now() < deadline {
            let _ = sock.send_to(&stun_msgs::binding(), self.udp_addr());
            let mut buf = [0u8; 1500];
            if let Ok((n, _)) = sock.recv_from(&mut buf)
                && stun_msgs::parse_reply(&buf[..n]).is_some_and(|r| r.success)
                && TcpStream::connect(("127.0.0.1", self.tls_port)).is_ok()
            {
                return;
            }
        }
        panic!(
            "talkbox turn did not answer within 20 s; log:\n{}",
            self.log()
        );
    }

    pub fn udp_addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("turn.log")).unwrap_or_default()
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// Fresh REST credentials valid for an hour.
    pub fn credentials(&self, name: &str) -> (String, String) {
        credentials::rest_credentials(&self.secret, name, 3600, unix_now())
    }

    /// Still running?
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// The Prometheus text from the metrics listener.
    pub fn metrics(&self) -> String {
        let mut s = TcpStream::connect(("127.0.0.1", self.metrics_port)).expect("metrics connect");
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .expect("write");
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        out
    }
}

impl Drop for TurnProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A blocking TURN client over UDP or TCP.
pub struct TurnClient {
    pub udp: Option<UdpSocket>,
    pub tcp: Option<TcpStream>,
    pub server: SocketAddr,
    tcp_buf: Vec<u8>,
}

impl TurnClient {
    pub fn udp(server: SocketAddr) -> Self {
        let s = UdpSocket::bind("127.0.0.1:0").expect("bind");
        s.set_read_timeout(Some(Duration::from_millis(300)))
            .expect("timeout");
        Self {
            udp: Some(s),
            tcp: None,
            server,
            tcp_buf: Vec::new(),
        }
    }

    pub fn tcp(server: SocketAddr) -> Self {
        let s = TcpStream::connect(server).expect("connect");
        s.set_read_timeout(Some(Duration::from_millis(300)))
            .expect("timeout");
        Self {
            udp: None,
            tcp: Some(s),
            server,
            tcp_buf: Vec::new(),
        }
    }

    pub fn send(&mut self, bytes: &[u8]) {
        if let Some(u) = &self.udp {
            u.send_to(bytes, self.server).expect("send");
        } else if let Some(t) = &mut self.tcp {
            let mut framed = bytes.to_vec();
            framed.resize(bytes.len().div_ceil(4) * 4, 0);
            t.write_all(&framed).expect("send");
        }
    }

    /// The next datagram or frame, or None after the read timeout.
    pub fn recv(&mut self) -> Option<Vec<u8>> {
        if let Some(u) = &self.udp {
            let mut buf = vec![0u8; 65_536];
            return u.recv(&mut buf).ok().map(|n| buf[..n].to_vec());
        }
        let t = self.tcp.as_mut()?;
        loop {
            if self.tcp_buf.len() >= 4 {
                let len = usize::from(u16::from_be_bytes([self.tcp_buf[2], self.tcp_buf[3]]));
                let (frame, consumed) = if self.tcp_buf[0] >> 6 == 0 {
                    (20 + len, 20 + len)
                } else {
                    (4 + len, 4 + len.div_ceil(4) * 4)
                };
                if self.tcp_buf.len() >= consumed {
                    let f = self.tcp_buf[..frame].to_vec();
                    self.tcp_buf.drain(..consumed);
                    return Some(f);
                }
            }
            let mut buf = [0u8; 4096];
            match t.read(&mut buf) {
                Ok(0) | Err(_) => return None,
                Ok(n) => self.tcp_buf.extend_from_slice(&buf[..n]),
            }
        }
    }

    /// Sends a request and waits for its response (retransmitting over UDP).
    pub fn request(&mut self, bytes: &[u8]) -> Option<Reply> {
        let tid = &bytes[8..20];
        for _ in 0..5 {
            self.send(bytes);
            let deadline = Instant::now() + Duration::from_millis(600);
            while Instant::now() < deadline {
                let Some(b) = self.recv() else { break };
                if let Some(r) = stun_msgs::parse_reply(&b)
                    && r.transaction == tid
                {
                    return Some(r);
                }
            }
            if self.tcp.is_some() {
                break;
            }
        }
        None
    }

    /// The 401 dance: returns credentials with the server's realm and nonce.
    pub fn login(&mut self, username: &str, password: &str) -> Creds {
        let r = self
            .request(&stun_msgs::allocate_unsigned())
            .expect("the server answers an unsigned Allocate");
        assert_eq!(r.code, Some(401), "unsigned Allocate must be challenged");
        Creds {
            username: username.into(),
            password: password.into(),
            realm: r.realm.expect("401 carries REALM"),
            nonce: r.nonce.expect("401 carries NONCE"),
        }
    }

    /// Logs in and allocates; returns the credentials and the relayed address.
    pub fn allocate(&mut self, username: &str, password: &str) -> (Creds, SocketAddr) {
        let c = self.login(username, password);
        let r = self
            .request(&stun_msgs::allocate(&c))
            .expect("Allocate answered");
        assert!(r.success, "Allocate failed: {r:?}");
        (c, r.relayed.expect("XOR-RELAYED-ADDRESS"))
    }
}

/// Fails the test with a clear message when a program it needs is missing.
pub fn require_program(path: &str, package: &str) {
    assert!(
        Path::new(path).exists(),
        "{path} is missing: install the Debian package `{package}` (apt-get install -y {package})"
    );
}
