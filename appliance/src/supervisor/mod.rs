//! The supervisor (`talkbox run`): prepares the box, starts each service as a child process,
//! keeps them running, and stops them cleanly.
//!
//! One single-threaded event loop owns all state; child exits, link messages, control requests,
//! signals and a 100 ms tick arrive as events, so there are no locks and the order of things is
//! easy to follow. The restart policy itself is pure ([`backoff`]). Under systemd the loop also
//! reports READY/STATUS/WATCHDOG to systemd; this module does not know what any service does.

pub mod backoff;
pub mod child;
pub mod control;
pub mod link;
pub mod status;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::net::UnixDatagram;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::config::{Config, DataDir};
use crate::provision::{Provisioner, Step};
use crate::service::Service;
use crate::{secrets, storage, tls};
use backoff::{RestartPolicy, RestartTracker};
use control::{ControlAnswer, ControlRequest, Pending};
use link::{ChildMessage, MAX_DATAGRAM, parse_child_datagram};
use status::{ServiceState, ServiceStatus, SupervisorStatus};

/// Setup-page requests whose blocking work (the journal) may run at once, off the loop.
const MAX_DEFERRED: usize = 2;
/// The longest such work may take before the page is told so (journalctl itself is limited to
/// 2 s by `timeout`).
const DEFERRED_TIMEOUT: Duration = Duration::from_secs(5);

/// How often the loop looks at timers (restarts, readiness and watchdog deadlines).
const TICK: Duration = Duration::from_millis(100);

/// What `talkbox run` was asked to do.
#[derive(Debug, Clone)]
pub struct RunOptions {
    pub data: DataDir,
    /// An explicit `--config`; otherwise `DATA_DIR/talkbox.toml` if it exists.
    pub config: Option<PathBuf>,
}

impl RunOptions {
    /// The config file in force, if any.
    pub fn config_path(&self) -> Option<PathBuf> {
        match &self.config {
            Some(p) => Some(p.clone()),
            None => {
                let p = self.data.config_file();
                p.exists().then_some(p)
            }
        }
    }

    /// Loads the config in force (defaults when there is no file).
    pub fn load_config(&self) -> Result<Config, crate::config::ConfigErrors> {
        match self.config_path() {
            Some(p) => Config::from_file(&p),
            None => Ok(Config::default()),
        }
    }
}

/// Creates what the services need on first start: directories, secrets, certificate.
pub fn prepare_data_dir(data: &DataDir, config: &Config) -> Result<()> {
    if !data.root.exists() {
        storage::ensure_private_dir(&data.root, 0o700)
            .with_context(|| format!("creating data directory {}", data.root.display()))?;
    }
    storage::remove_stale_temporaries(&data.root);
    storage::ensure_private_dir(&data.run_dir(), 0o700)
        .with_context(|| format!("creating {}", data.run_dir().display()))?;
    secrets::ensure_all(data)?;
    tls::ensure_certificate(data, &tls::box_names(&config.supervisor.names))?;
    Ok(())
}

enum Event {
    Exited {
        service: Service,
        generation: u64,
        status: std::process::ExitStatus,
    },
    Link {
        service: Service,
        generation: u64,
        messages: Vec<ChildMessage>,
    },
    /// An ACME order (run as a task on this loop) ended.
    AcmeDone(Result<crate::web::acme::Issued, String>),
}

struct Running {
    pid: u32,
    started: Instant,
    ready_at: Option<Instant>,
    last_ping: Instant,
    link: Arc<UnixDatagram>,
    link_task: JoinHandle<()>,
    /// Set when the supervisor itself ended the process, to report why.
    kill_reason: Option<String>,
}

struct Slot {
    service: Service,
    state: ServiceState,
    generation: u64,
    running: Option<Running>,
    tracker: RestartTracker,
    started_once: bool,
    restart_at: Option<Instant>,
    last_exit: Option<String>,
    message: Option<String>,
    /// A config change needs a fresh process: restart at once, without counting a failure.
    restart_requested: bool,
    /// The service was disabled by a config change: stop it and forget the slot.
    remove_requested: bool,
}

impl Slot {
    fn new(service: Service) -> Self {
        Self {
            service,
            state: ServiceState::Waiting,
            generation: 0,
            running: None,
            tracker: RestartTracker::default(),
            started_once: false,
            restart_at: None,
            last_exit: None,
            message: None,
            restart_requested: false,
            remove_requested: false,
        }
    }
}

struct Supervisor {
    opts: RunOptions,
    config: Config,
    policy: RestartPolicy,
    child_args: child::ChildArgs,
    slots: Vec<Slot>,
    events_tx: mpsc::UnboundedSender<Event>,
    started: Instant,
    told_systemd_ready: bool,
    shutting_down: bool,
    watchdog_every: Option<Duration>,
    last_systemd_ping: Instant,
    last_systemd_status: String,
    provision: Provisioner,
    /// The setup page's state and the changes it may ask for (see `web::store`).
    setup: crate::web::store::SetupStore,
    /// A restore or factory reset asked to restart everything; done a moment after the answer
    /// went out, so the web service can still deliver it.
    restart_all_at: Option<Instant>,
    /// Deferred setup-page requests under way (see `run_deferred`).
    deferred_running: Arc<std::sync::atomic::AtomicUsize>,
}

/// Runs the supervisor until SIGTERM/SIGINT; returns the process exit code.
pub fn run(opts: RunOptions, config: Config) -> Result<i32> {
    // Refuse at once rather than let every service crash-loop on the same missing user.
    crate::privileges::check_user(&config.supervisor.user)?;
    prepare_data_dir(&opts.data, &config)?;
    // A bundle found at boot (stick, fw_cfg, dropped file) is applied before any service starts.
    let (provision, changed) = Provisioner::start(&opts.data, opts.config.as_deref(), &config)?;
    let config = if changed {
        opts.load_config()
            .map_err(|e| anyhow::anyhow!("the provisioned config does not load:\n{e}"))?
    } else {
        config
    };
    // Single-threaded on purpose: the parent-death signal of a child fires when the *thread*
    // that forked it exits, so children must be forked by a thread that lives as long as the
    // supervisor, and a current-thread runtime forks from the main thread.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the supervisor's event loop")?;
    rt.block_on(async move {
        let listener = control::bind(&opts.data.control_socket())?;
        let (control_tx, control_rx) = mpsc::channel::<Pending>(64);
        tokio::spawn(control::serve(listener, control_tx));
        let (events_tx, events_rx) = mpsc::unbounded_channel();
        let child_args = child::ChildArgs {
            exe: child::current_exe().context("finding the talkbox binary")?,
            data_dir: opts.data.root.clone(),
            config: opts.config_path(),
        };
        let setup = crate::web::store::SetupStore::open(&opts.data, opts.config_path())
            .with_context(|| format!("preparing {}/web", opts.data.root.display()))?;
        if let Some(code) = setup.setup_code() {
            // The console and the journal are where the person holding the box looks.
            tracing::warn!(
                setup_code = code,
                "this box is unclaimed: open the setup page and enter the setup code"
            );
            eprintln!("talkbox: setup code: {code}");
        }
        let mut watchdog_usec = 0u64;
        let watchdog_every = sd_notify::watchdog_enabled(false, &mut watchdog_usec)
            .then(|| Duration::from_micros(watchdog_usec / 2));
        let mut sup = Supervisor {
            policy: RestartPolicy::from_config(&config.supervisor),
            slots: Service::to_run(&config)
                .into_iter()
                .map(Slot::new)
                .collect(),
            config,
            opts: opts.clone(),
            child_args,
            events_tx,
            started: Instant::now(),
            told_systemd_ready: false,
            shutting_down: false,
            watchdog_every,
            last_systemd_ping: Instant::now(),
            last_systemd_status: String::new(),
            provision,
            setup,
            restart_all_at: None,
            deferred_running: Arc::new(std::sync::atomic::AtomicUsize::new(0)),
        };
        tracing::info!(
            data_dir = %opts.data.root.display(),
            services = ?sup.slots.iter().map(|s| s.service.name()).collect::<Vec<_>>(),
            "supervisor starting"
        );
        sup.event_loop(events_rx, control_rx).await;
        let _ = std::fs::remove_file(opts.data.control_socket());
        Ok(0)
    })
}

impl Supervisor {
    async fn event_loop(
        &mut self,
        mut events: mpsc::UnboundedReceiver<Event>,
        mut control: mpsc::Receiver<Pending>,
    ) {
        let (Ok(mut term), Ok(mut int), Ok(mut hup)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
            signal(SignalKind::hangup()),
        ) else {
            tracing::error!("cannot install signal handlers");
            return;
        };
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut stop_deadline: Option<Instant> = None;
        let mut killed = false;
        loop {
            tokio::select! {
                Some(ev) = events.recv() => self.on_event(ev),
                Some((req, reply)) = control.recv() => {
                    let answer = self.on_control(req);
                    let _ = reply.send(answer);
                }
                _ = term.recv() => { if stop_deadline.is_none() { stop_deadline = Some(self.begin_shutdown("SIGTERM")); } }
                _ = int.recv() => { if stop_deadline.is_none() { stop_deadline = Some(self.begin_shutdown("SIGINT")); } }
                _ = hup.recv() => { self.reload("SIGHUP"); }
                _ = tick.tick() => self.on_tick(Instant::now()),
            }
            if let Some(deadline) = stop_deadline {
                if self.slots.iter().all(|s| s.running.is_none()) {
                    tracing::info!("all services stopped");
                    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Status("stopped")]);
                    return;
                }
                if !killed && Instant::now() >= deadline {
                    killed = true;
                    for s in &mut self.slots {
                        if let Some(r) = &mut s.running {
                            tracing::warn!(
                                service = s.service.name(),
                                pid = r.pid,
                                "did not stop in time; sending SIGKILL"
                            );
                            r.kill_reason = Some("killed: did not stop after SIGTERM".into());
                            let _ = killpg(Pid::from_raw(r.pid as i32), Signal::SIGKILL);
                        }
                    }
                }
                // A child that ignores even SIGKILL (stuck in the kernel) must not hang us forever.
                if Instant::now() >= deadline + Duration::from_secs(5) {
                    tracing::error!("services still present 5 s after SIGKILL; exiting anyway");
                    return;
                }
            }
        }
    }

    fn begin_shutdown(&mut self, why: &str) -> Instant {
        tracing::info!(signal = why, "stopping all services");
        let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
        self.shutting_down = true;
        // Stop in reverse start order: front-ends first, the SFU last.
        for s in self.slots.iter_mut().rev() {
            s.restart_at = None;
            if let Some(r) = &s.running {
                s.state = ServiceState::Stopping;
                let _ = killpg(Pid::from_raw(r.pid as i32), Signal::SIGTERM);
            } else {
                s.state = ServiceState::Stopped;
            }
        }
        Instant::now() + Duration::from_millis(self.config.supervisor.stop_timeout_ms)
    }

    fn spawn(&mut self, idx: usize) {
        let now = Instant::now();
        let slot = &mut self.slots[idx];
        slot.generation += 1;
        slot.restart_at = None;
        if slot.started_once {
            slot.tracker.on_restart();
        }
        slot.started_once = true;
        let generation = slot.generation;
        let service = slot.service;
        match child::spawn(slot.service, &self.child_args) {
            Ok((mut process, link)) => {
                let pid = process.id().unwrap_or(0);
                let link = Arc::new(link);
                let tx = self.events_tx.clone();
                tokio::spawn(async move {
                    let status = match process.wait().await {
                        Ok(s) => s,
                        Err(e) => {
                            tracing::error!(error = %e, "waiting for a service failed");
                            std::os::unix::process::ExitStatusExt::from_raw(255 << 8)
                        }
                    };
                    let _ = tx.send(Event::Exited {
                        service,
                        generation,
                        status,
                    });
                });
                let link_task = {
                    let tx = self.events_tx.clone();
                    let link = link.clone();
                    tokio::spawn(async move {
                        let mut buf = vec![0u8; MAX_DATAGRAM];
                        while let Ok(n) = link.recv(&mut buf).await {
                            let messages = parse_child_datagram(&buf[..n]);
                            if tx
                                .send(Event::Link {
                                    service,
                                    generation,
                                    messages,
                                })
                                .is_err()
                            {
                                return;
                            }
                        }
                    })
                };
                tracing::info!(service = slot.service.name(), pid, generation, "started");
                slot.state = ServiceState::Starting;
                slot.running = Some(Running {
                    pid,
                    started: now,
                    ready_at: None,
                    last_ping: now,
                    link,
                    link_task,
                    kill_reason: None,
                });
            }
            Err(e) => {
                tracing::error!(service = slot.service.name(), error = %e, "cannot start");
                slot.last_exit = Some(format!("could not start: {e}"));
                let d = slot.tracker.on_exit(&self.policy, Duration::ZERO);
                slot.state = if d.crash_loop {
                    ServiceState::CrashLoop
                } else {
                    ServiceState::Backoff
                };
                slot.restart_at = Some(now + d.delay);
            }
        }
    }

    fn on_event(&mut self, ev: Event) {
        match ev {
            Event::AcmeDone(result) => {
                if self.setup.acme.finished(result, &self.opts.data) && !self.shutting_down {
                    // The web service swaps the certificate in place; these load it at start.
                    self.restart_services(
                        &[Service::Signaling, Service::Turn],
                        "new certificate from ACME",
                    );
                }
            }
            Event::Exited {
                service,
                generation,
                status,
            } => {
                let Some(idx) = self.slots.iter().position(|s| s.service == service) else {
                    return;
                };
                let slot = &mut self.slots[idx];
                if slot.generation != generation {
                    return;
                }
                let Some(r) = slot.running.take() else { return };
                r.link_task.abort();
                let ran_for = r.started.elapsed();
                let reason = r
                    .kill_reason
                    .clone()
                    .unwrap_or_else(|| describe_exit(status));
                slot.last_exit = Some(reason.clone());
                if self.shutting_down {
                    slot.state = ServiceState::Stopped;
                    tracing::info!(service = slot.service.name(), pid = r.pid, %reason, "stopped");
                    return;
                }
                if slot.remove_requested {
                    tracing::info!(
                        service = slot.service.name(),
                        "stopped: disabled by the config"
                    );
                    self.slots.remove(idx);
                    return;
                }
                if slot.restart_requested {
                    slot.restart_requested = false;
                    slot.state = ServiceState::Backoff;
                    slot.restart_at = Some(Instant::now());
                    tracing::info!(
                        service = slot.service.name(),
                        "restarting to apply the new config"
                    );
                    return;
                }
                let d = slot.tracker.on_exit(&self.policy, ran_for);
                slot.state = if d.crash_loop {
                    ServiceState::CrashLoop
                } else {
                    ServiceState::Backoff
                };
                slot.restart_at = Some(Instant::now() + d.delay);
                if d.crash_loop {
                    tracing::error!(
                        service = slot.service.name(), %reason, failures = slot.tracker.consecutive_failures,
                        retry_in_ms = d.delay.as_millis() as u64, "crash loop: the service keeps failing soon after start"
                    );
                } else {
                    tracing::warn!(service = slot.service.name(), %reason, retry_in_ms = d.delay.as_millis() as u64, "service ended; restarting");
                }
            }
            Event::Link {
                service,
                generation,
                messages,
            } => {
                let status_json = messages.contains(&ChildMessage::QueryStatus).then(|| {
                    let mut st = self.status();
                    st.setup_code = None;
                    serde_json::to_vec(&st).unwrap_or_default()
                });
                let answers = self.on_setup_requests(service, generation, &messages);
                let Some(slot) = self.slots.iter_mut().find(|s| s.service == service) else {
                    return;
                };
                if slot.generation != generation {
                    return;
                }
                let Some(r) = slot.running.as_mut() else {
                    return;
                };
                for m in messages {
                    match m {
                        ChildMessage::Ready => {
                            if r.ready_at.is_none() {
                                r.ready_at = Some(Instant::now());
                                tracing::info!(service = slot.service.name(), pid = r.pid, "ready");
                            }
                            r.last_ping = Instant::now();
                            if slot.state == ServiceState::Starting {
                                slot.state = ServiceState::Running;
                            }
                        }
                        ChildMessage::Watchdog => r.last_ping = Instant::now(),
                        ChildMessage::Status(s) => slot.message = Some(s),
                        ChildMessage::Stopping => {}
                        ChildMessage::QueryStatus => {
                            if let Some(json) = &status_json {
                                let _ = r.link.try_send(json);
                            }
                        }
                        ChildMessage::Request(_) => {}
                    }
                }
                for a in answers {
                    let _ = r.link.try_send(&a);
                }
            }
        }
    }

    /// Carries out the setup page's requests (from the current web process only) and applies
    /// their effect; returns the answers to send back, in order.
    fn on_setup_requests(
        &mut self,
        service: Service,
        generation: u64,
        messages: &[ChildMessage],
    ) -> Vec<Vec<u8>> {
        let mut answers = Vec::new();
        let current = self
            .slots
            .iter()
            .any(|s| s.service == service && s.generation == generation);
        for m in messages {
            let ChildMessage::Request(json) = m else {
                continue;
            };
            if service == Service::Web
                && current
                && let Some(work) = self.setup.deferred(json)
            {
                self.run_deferred(work);
                continue;
            }
            let (answer, effect) = if service == Service::Web && current {
                self.setup.handle(json, &self.config)
            } else {
                tracing::warn!(
                    service = service.name(),
                    "refused a setup request from a service other than web"
                );
                (
                    crate::web::requests::SetupAnswer::err("only the web service may ask this"),
                    crate::web::store::Effect::None,
                )
            };
            match effect {
                crate::web::store::Effect::None => {}
                crate::web::store::Effect::ReloadConfig => {
                    if let Some(e) = self.reload("setup page") {
                        tracing::error!(error = %e, "the setup page's config change did not load");
                    }
                }
                crate::web::store::Effect::RestartAll => {
                    if let Some(e) = self.reload("setup page: restore or reset") {
                        tracing::error!(error = %e, "the restored config did not load");
                    }
                    self.restart_all_at = Some(Instant::now() + Duration::from_millis(500));
                }
                crate::web::store::Effect::RestartTlsUsers => {
                    // The web service swaps its certificate in place; the others load it at start.
                    self.restart_services(&[Service::Signaling, Service::Turn], "new certificate")
                }
            }
            answers.push(serde_json::to_vec(&answer).unwrap_or_default());
        }
        answers
    }

    /// Runs a request's blocking work (the journal) on the blocking pool, bounded in time and
    /// in number, and sends its answer to the web process itself, so the loop keeps serving
    /// `talkbox status`, watchdogs and the other services meanwhile.
    fn run_deferred(&mut self, work: crate::web::store::Deferred) {
        let Some(link) = self
            .slots
            .iter()
            .find(|s| s.service == Service::Web)
            .and_then(|s| s.running.as_ref())
            .map(|r| r.link.clone())
        else {
            return;
        };
        let busy = self.deferred_running.clone();
        let send = |link: &UnixDatagram, a: crate::web::requests::SetupAnswer| {
            let _ = link.try_send(&serde_json::to_vec(&a).unwrap_or_default());
        };
        if busy.fetch_add(1, std::sync::atomic::Ordering::SeqCst) >= MAX_DEFERRED {
            busy.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
            send(
                &link,
                crate::web::requests::SetupAnswer::err(
                    "the journal is being read for another request; try again in a few seconds",
                ),
            );
            return;
        }
        tokio::spawn(async move {
            let answer =
                match tokio::time::timeout(DEFERRED_TIMEOUT, tokio::task::spawn_blocking(work))
                    .await
                {
                    Ok(Ok(a)) => a,
                    Ok(Err(e)) => crate::web::requests::SetupAnswer::err(format!(
                        "reading the journal failed: {e}"
                    )),
                    Err(_) => crate::web::requests::SetupAnswer::err(format!(
                        "the journal did not answer within {} s",
                        DEFERRED_TIMEOUT.as_secs()
                    )),
                };
            busy.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
            send(&link, answer);
        });
    }

    /// Restarts the named services (those running) without counting a failure.
    fn restart_services(&mut self, which: &[Service], why: &str) {
        for s in &mut self.slots {
            if !which.contains(&s.service) {
                continue;
            }
            if let Some(r) = &mut s.running {
                s.restart_requested = true;
                r.kill_reason = Some(format!("stopped to apply a change: {why}"));
                let _ = killpg(Pid::from_raw(r.pid as i32), Signal::SIGTERM);
            }
        }
    }

    fn on_tick(&mut self, now: Instant) {
        if self.shutting_down {
            return;
        }
        if self.restart_all_at.is_some_and(|t| t <= now) {
            self.restart_all_at = None;
            self.restart_services(&Service::START_ORDER, "restore or factory reset");
        }
        let ready_timeout = Duration::from_secs(self.config.supervisor.ready_timeout_s);
        let watchdog_timeout = Duration::from_secs(self.config.supervisor.watchdog_timeout_s);
        for s in &mut self.slots {
            let Some(r) = &mut s.running else { continue };
            if r.kill_reason.is_some() {
                continue;
            }
            let reason = match r.ready_at {
                None if now.duration_since(r.started) > ready_timeout => {
                    Some(format!("not ready within {} s", ready_timeout.as_secs()))
                }
                Some(_) if now.duration_since(r.last_ping) > watchdog_timeout => Some(format!(
                    "no watchdog ping for {} s",
                    watchdog_timeout.as_secs()
                )),
                _ => None,
            };
            if let Some(reason) = reason {
                tracing::error!(service = s.service.name(), pid = r.pid, %reason, "killing unresponsive service");
                r.kill_reason = Some(reason);
                let _ = killpg(Pid::from_raw(r.pid as i32), Signal::SIGKILL);
                continue;
            }
            if r.ready_at.is_some()
                && s.tracker.consecutive_failures > 0
                && now.duration_since(r.started) >= self.policy.healthy_after
            {
                s.tracker.on_healthy();
            }
        }
        // Restarts that are due.
        for i in 0..self.slots.len() {
            if matches!(
                self.slots[i].state,
                ServiceState::Backoff | ServiceState::CrashLoop
            ) && self.slots[i].restart_at.is_some_and(|t| t <= now)
            {
                self.spawn(i);
            }
        }
        // First start, in order: the next service starts once those before it are up (or
        // have failed; a failing service must not keep the others from serving).
        if let Some(i) = self
            .slots
            .iter()
            .position(|s| s.state == ServiceState::Waiting)
        {
            let earlier_starting = self.slots[..i]
                .iter()
                .any(|s| s.state == ServiceState::Starting);
            if !earlier_starting {
                self.spawn(i);
            }
        }
        // Orders wait for the web service: it answers the CA's challenges.
        let web_up = self
            .slots
            .iter()
            .any(|s| s.service == Service::Web && s.state == ServiceState::Running);
        if web_up && let Some(job) = self.setup.acme.due(now, &self.config, &self.opts.data) {
            let tx = self.events_tx.clone();
            tokio::spawn(async move {
                let r = crate::web::acme::run_order(job).await;
                let _ = tx.send(Event::AcmeDone(r));
            });
        }
        self.report_to_systemd(now);
        let slots = &self.slots;
        // A trial waits for every service to be ready in a process started for the new config;
        // the provision service itself is not restarted (it carries the push waiting for the
        // verdict) unless its own settings changed.
        let ready_since = |t: Instant| {
            slots.iter().all(|s| {
                s.state == ServiceState::Running
                    && s.running
                        .as_ref()
                        .is_some_and(|r| r.started >= t || s.service == Service::Provision)
            })
        };
        if let Some(Step::ReloadAndRestartAll(why)) = self.provision.tick(&self.config, ready_since)
        {
            self.restart_for_provisioning(&why);
        }
    }

    /// Applies a provisioning change (or its rollback): re-reads the config and restarts every
    /// service, since certificates and secret files may have changed under the same config.
    fn restart_for_provisioning(&mut self, why: &str) {
        if let Some(e) = self.reload(why) {
            tracing::error!(
                trigger = why,
                "provisioned config refused by the supervisor: {e}"
            );
        }
        let now = Instant::now();
        for s in &mut self.slots {
            if s.service == Service::Provision || s.remove_requested || s.restart_requested {
                continue;
            }
            match &mut s.running {
                Some(r) => {
                    s.restart_requested = true;
                    r.kill_reason = Some("stopped to apply a provisioning change".into());
                    let _ = killpg(Pid::from_raw(r.pid as i32), Signal::SIGTERM);
                }
                None if matches!(s.state, ServiceState::Backoff | ServiceState::CrashLoop) => {
                    s.restart_at = Some(now);
                }
                None => {}
            }
        }
    }

    fn report_to_systemd(&mut self, now: Instant) {
        let all_ready = self.slots.iter().all(|s| s.state == ServiceState::Running);
        if all_ready && !self.told_systemd_ready {
            self.told_systemd_ready = true;
            tracing::info!("all services ready");
            // The one line a new user looks for: where to point the browser.
            for s in &self.slots {
                if let Some(m) = &s.message {
                    eprintln!("talkbox: {}: {m}", s.service.name());
                }
            }
            let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
        }
        let summary = self
            .slots
            .iter()
            .map(|s| format!("{} {}", s.service.name(), s.state.as_str()))
            .collect::<Vec<_>>()
            .join(", ");
        if summary != self.last_systemd_status {
            let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Status(&summary)]);
            self.last_systemd_status = summary;
        }
        // Ping systemd only while the loop runs; a hung loop then gets the unit restarted.
        if let Some(every) = self.watchdog_every
            && now.duration_since(self.last_systemd_ping) >= every
        {
            self.last_systemd_ping = now;
            let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Watchdog]);
        }
    }

    fn on_control(&mut self, req: ControlRequest) -> ControlAnswer {
        match req {
            ControlRequest::Status => ControlAnswer::Status(self.status()),
            ControlRequest::Reload => {
                let problems = self.reload("control request");
                match problems {
                    None => ControlAnswer::Status(self.status()),
                    Some(e) => ControlAnswer::Error(e),
                }
            }
        }
    }

    /// Re-reads the config and restarts only the services the change affects. An invalid
    /// config is reported and ignored: the running one stays in force.
    fn reload(&mut self, why: &str) -> Option<String> {
        if self.shutting_down {
            return Some("shutting down".into());
        }
        let new = match self.opts.load_config() {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(
                    trigger = why,
                    "new config refused, keeping the running one:\n{e}"
                );
                return Some(e.to_string());
            }
        };
        let old = std::mem::replace(&mut self.config, new);
        self.policy = RestartPolicy::from_config(&self.config.supervisor);
        let wanted = Service::to_run(&self.config);
        for s in &mut self.slots {
            if !wanted.contains(&s.service) {
                s.remove_requested = true;
            } else if s.service.affected_by(&old, &self.config) {
                s.restart_requested = true;
            } else {
                continue;
            }
            match &mut s.running {
                Some(r) => {
                    r.kill_reason = Some("stopped to apply a config change".into());
                    let _ = killpg(Pid::from_raw(r.pid as i32), Signal::SIGTERM);
                }
                None => {
                    // Not running (in backoff): apply by starting fresh now.
                    s.restart_requested = false;
                    s.restart_at = Some(Instant::now());
                }
            }
        }
        self.slots
            .retain(|s| !(s.remove_requested && s.running.is_none()));
        for svc in &wanted {
            if !self.slots.iter().any(|s| s.service == *svc) {
                self.slots.push(Slot::new(*svc));
            }
        }
        let order = |s: &Slot| Service::START_ORDER.iter().position(|x| *x == s.service);
        self.slots.sort_by_key(order);
        self.told_systemd_ready = self.slots.iter().all(|s| s.state == ServiceState::Running);
        tracing::info!(trigger = why, "config reloaded");
        None
    }

    fn status(&self) -> SupervisorStatus {
        let now = Instant::now();
        SupervisorStatus {
            version: env!("CARGO_PKG_VERSION").to_string(),
            pid: std::process::id(),
            uptime_s: self.started.elapsed().as_secs_f64(),
            data_dir: self.opts.data.root.display().to_string(),
            ready: self.slots.iter().all(|s| s.state == ServiceState::Running),
            services: self
                .slots
                .iter()
                .map(|s| ServiceStatus {
                    name: s.service.name().to_string(),
                    state: s.state,
                    pid: s.running.as_ref().map(|r| r.pid),
                    uptime_s: s
                        .running
                        .as_ref()
                        .map(|r| r.started.elapsed().as_secs_f64()),
                    restarts: s.tracker.restarts,
                    consecutive_failures: s.tracker.consecutive_failures,
                    next_restart_in_ms: s
                        .restart_at
                        .map(|t| t.saturating_duration_since(now).as_millis() as u64),
                    last_exit: s.last_exit.clone(),
                    message: s.message.clone(),
                })
                .collect(),
            setup_code: self.setup.setup_code().map(str::to_string),
        }
    }
}

/// "exited with code 1", "killed by SIGKILL", ...
pub fn describe_exit(status: std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    if let Some(code) = status.code() {
        format!("exited with code {code}")
    } else if let Some(sig) = status.signal() {
        match Signal::try_from(sig) {
            Ok(s) => format!("killed by {}", s.as_str()),
            Err(_) => format!("killed by signal {sig}"),
        }
    } else {
        "ended".to_string()
    }
}
