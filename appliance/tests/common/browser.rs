//! Headless Debian Chromium driven over WebDriver (fantoccini + /usr/bin/chromedriver), with
//! fake camera and microphone, a fresh profile per browser, and nothing left running: the
//! driver and the browser it starts share a process group that is killed on drop. Also a tiny
//! HTTP server for test pages. Needs `apt-get install chromium chromium-driver`.
//!
//! Flags follow reference/peers-on-loopback.md B.3: loopback ICE is allowed and mDNS hiding of
//! host candidates is off, so WebRTC works between peers on 127.0.0.1.

#![allow(dead_code)]

use super::free_port;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use fantoccini::Locator;
use serde_json::{Value, json};

pub const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
pub const CHROMIUM: &str = "/usr/bin/chromium";

/// Flags of every test browser (reference peers-on-loopback.md B.3).
pub const CHROMIUM_FLAGS: &[&str] = &[
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--use-fake-device-for-media-stream",
    "--use-fake-ui-for-media-stream",
    "--disable-dev-shm-usage",
    "--allow-loopback-in-peer-connection",
    "--disable-features=WebRtcHideLocalIpsWithMdns",
];

pub struct Browser {
    pub client: fantoccini::Client,
    driver: Child,
    driver_gone: bool,
    _profile: tempfile::TempDir,
}

impl Browser {
    /// Starts chromedriver and a headless Chromium session; `extra` flags are added.
    pub async fn start(extra: &[&str]) -> Browser {
        let port = free_port();
        let mut driver = Command::new(CHROMEDRIVER);
        driver.arg(format!("--port={port}"));
        Self::start_with(driver, &format!("http://127.0.0.1:{port}"), extra).await
    }

    /// Starts chromedriver and Chromium inside network namespace `ns` (whose traffic the test
    /// controls); the driver listens on port 9515 of the namespace's address `addr` and
    /// accepts WebDriver connections from `from` (the test's side of the link) only.
    pub async fn start_in_netns(
        ns: &str,
        addr: std::net::IpAddr,
        from: std::net::IpAddr,
        extra: &[&str],
    ) -> Browser {
        let mut driver = Command::new("ip");
        driver.args(["netns", "exec", ns, CHROMEDRIVER]).args([
            "--port=9515".to_string(),
            format!("--allowed-ips={from}"),
            "--allowed-origins=*".to_string(),
        ]);
        Self::start_with(driver, &format!("http://{addr}:9515"), extra).await
    }

    async fn start_with(mut driver: Command, url: &str, extra: &[&str]) -> Browser {
        assert!(
            std::path::Path::new(CHROMEDRIVER).exists(),
            "{CHROMEDRIVER} is missing: apt-get install -y chromium chromium-driver"
        );
        let driver = driver
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            // Its own process group: the browser it starts is killed with it.
            .process_group(0)
            .spawn()
            .expect("start chromedriver");
        let profile = tempfile::tempdir().expect("profile dir");
        let mut args: Vec<String> = CHROMIUM_FLAGS.iter().map(|s| s.to_string()).collect();
        args.extend(extra.iter().map(|s| s.to_string()));
        args.push(format!("--user-data-dir={}", profile.path().display()));
        let mut caps = serde_json::Map::new();
        caps.insert(
            "goog:chromeOptions".into(),
            json!({"binary": CHROMIUM, "args": args}),
        );
        let mut last = None;
        for _ in 0..100 {
            match fantoccini::ClientBuilder::new(
                hyper_util::client::legacy::connect::HttpConnector::new(),
            )
            .capabilities(caps.clone())
            .connect(url)
            .await
            {
                Ok(client) => {
                    return Browser {
                        client,
                        driver,
                        driver_gone: false,
                        _profile: profile,
                    };
                }
                Err(e) => last = Some(e.to_string()),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let mut b = driver;
        kill_group(&mut b);
        panic!("no WebDriver session with chromedriver: {last:?}");
    }

    /// Evaluates a JavaScript expression (`return …;` body) and returns its value.
    pub async fn eval(&self, script: &str) -> Value {
        self.client
            .execute(script, vec![])
            .await
            .unwrap_or_else(|e| panic!("script failed: {e}\n{script}"))
    }

    /// A new browser that joins the meeting-page room at `url` as `name`. The box's
    /// certificate is self-signed; a person's click on Join grants autoplay of the remote
    /// audio and video elements, which a WebDriver click does not reliably do.
    pub async fn meeting_participant(url: &str, name: &str) -> Browser {
        let b = Browser::start(&[
            "--ignore-certificate-errors",
            "--autoplay-policy=no-user-gesture-required",
        ])
        .await;
        b.join_meeting(url, name).await;
        b
    }

    /// Opens a meeting-page room link, types `name` and clicks Join; returns once the page
    /// says "joined" (30 s for each step: Chromium starts slowly on a loaded machine).
    pub async fn join_meeting(&self, url: &str, name: &str) {
        let state = "return document.body.dataset.state";
        self.client.goto(url).await.expect("open the room link");
        // The page's room lookup gives up and retries a GET after 10 s (3 attempts), so a
        // stalled request shows as "error" with its reason, not as "loading" for ever; 45 s
        // covers that on a loaded machine, and a failure says what the page saw.
        let start = std::time::Instant::now();
        loop {
            let now = self.eval(state).await;
            if now == "join" {
                break;
            }
            if start.elapsed() > Duration::from_secs(45) || now == "error" {
                let seen = self
                    .eval(
                        "return {state: document.body.dataset.state, \
                         status: document.getElementById('status').textContent, \
                         ready: document.readyState, \
                         notes: (typeof call === 'object') ? call.notes : 'meeting.js not run', \
                         resources: performance.getEntriesByType('resource').map(r => \
                           [r.name, Math.round(r.startTime), Math.round(r.duration)])};",
                    )
                    .await;
                panic!("the meeting page did not get to its join form: {seen}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        self.client
            .find(Locator::Id("join-name"))
            .await
            .expect("name field")
            .send_keys(name)
            .await
            .expect("type a name");
        self.client
            .find(Locator::Id("join-button"))
            .await
            .expect("join button")
            .click()
            .await
            .expect("click join");
        self.wait_for(state, &Value::from("joined"), Duration::from_secs(30))
            .await;
    }

    /// On a meeting page: asks the SFU, as Talk does, to forward at most simulcast layer
    /// `substream` of `publisher`'s camera to this page.
    pub async fn select_stream(&self, publisher: &str, substream: u64) {
        self.select_stream_temporal(publisher, substream, 2).await;
    }

    /// Sends `selectStream` with a temporal bound too (0: T0 only).
    pub async fn select_stream_temporal(&self, publisher: &str, substream: u64, temporal: u64) {
        self.client
            .execute(
                "sendMessage(arguments[0], { type: 'selectStream', roomType: 'video', payload: { substream: arguments[1], temporal: arguments[2] } }); return 0;",
                vec![
                    Value::from(publisher),
                    Value::from(substream),
                    Value::from(temporal),
                ],
            )
            .await
            .expect("selectStream");
    }

    /// The session id of the first remote camera tile on a meeting page.
    pub async fn first_remote_session(&self) -> String {
        let v = self
            .eval("const t = document.querySelector('#grid .tile:not(.self)'); return t ? t.dataset.session : null;")
            .await;
        v.as_str().expect("a remote participant's tile").to_string()
    }

    /// Polls `script` until it returns `want`, or panics after `timeout` with what it returned.
    pub async fn wait_for(&self, script: &str, want: &Value, timeout: Duration) {
        let start = std::time::Instant::now();
        let mut last = Value::Null;
        while start.elapsed() < timeout {
            last = self.eval(script).await;
            if &last == want {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("waited {timeout:?} for `{script}` to be {want}; it is {last}");
    }

    /// Polls the JavaScript expression `expr` until it is neither null nor undefined, and
    /// returns its value; an error says what stayed unset.
    pub async fn wait_until_set(&self, expr: &str, timeout: Duration) -> Result<Value, String> {
        let start = std::time::Instant::now();
        let script = format!("return ({expr}) ?? null;");
        loop {
            match self.client.execute(&script, vec![]).await {
                Ok(Value::Null) => {}
                Ok(v) => return Ok(v),
                Err(e) => return Err(format!("script failed: {e}")),
            }
            if start.elapsed() > timeout {
                return Err(format!("`{expr}` stayed null for {timeout:?}"));
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    pub async fn close(mut self) {
        let _ = self.client.clone().close().await;
        kill_group(&mut self.driver);
        self.driver_gone = true;
    }
}

fn kill_group(child: &mut Child) {
    let pgid = nix::unistd::Pid::from_raw(child.id() as i32);
    let _ = nix::sys::signal::killpg(pgid, nix::sys::signal::Signal::SIGKILL);
    let _ = child.wait();
}

impl Drop for Browser {
    fn drop(&mut self) {
        if !self.driver_gone {
            kill_group(&mut self.driver);
        }
    }
}

/// Serves `html` at `http://127.0.0.1:PORT/` (any path) from a background thread; returns the
/// URL. 127.0.0.1 is a secure context, so getUserMedia works there.
pub fn serve_page(html: String) -> String {
    use std::io::{BufRead, BufReader, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind page server");
    let port = listener.local_addr().expect("addr").port();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut reader = BufReader::new(match stream.try_clone() {
                Ok(s) => s,
                Err(_) => continue,
            });
            let mut line = String::new();
            // Read the request head; the body is never needed.
            while reader.read_line(&mut line).map(|n| n > 2).unwrap_or(false) {
                line.clear();
            }
            let head = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: text/html; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                html.len()
            );
            let _ = stream.write_all(head.as_bytes());
            let _ = stream.write_all(html.as_bytes());
        }
    });
    format!("http://127.0.0.1:{port}/")
}
