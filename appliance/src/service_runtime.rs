//! How every service process starts: config, logging, link to the supervisor, the root-only
//! preparation, dropping privileges, then the async runtime with shutdown and watchdog.
//!
//! The order matters and lives only here: secrets and keys are read while the process may still
//! be root, privileges are dropped before the first thread exists (capabilities are per
//! thread), and only then is the multi-threaded runtime built.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::watch;

use crate::config::{Config, DataDir};
use crate::privileges::{self, Keep};
use crate::service::Service;
use crate::supervisor::link::ServiceLink;

/// What a running service gets from the scaffold.
pub struct ServiceContext {
    pub service: Service,
    pub config: Config,
    pub data: DataDir,
    pub link: Arc<ServiceLink>,
    /// Becomes true on SIGTERM/SIGINT.
    pub shutdown: watch::Receiver<bool>,
}

/// Runs a service process. `prepare` runs first, possibly as root, with no threads; `serve`
/// runs on the runtime and must call `ctx.link.ready()` once it serves.
pub fn run<T, P, S, F>(
    service: Service,
    config: Config,
    data: DataDir,
    worker_threads: usize,
    prepare: P,
    serve: S,
) -> Result<()>
where
    P: FnOnce(&Config, &DataDir) -> Result<T>,
    S: FnOnce(ServiceContext, T) -> F,
    F: Future<Output = Result<()>>,
{
    let link_fd = ServiceLink::take_from_env()?;
    let prepared = prepare(&config, &data)
        .with_context(|| format!("preparing the {} service", service.name()))?;
    let keep = match config.lowest_port_of(service.name()) {
        Some(p) if p < 1024 => Keep::NetBindService,
        _ => Keep::Nothing,
    };
    privileges::drop_to_user(&config.supervisor.user, keep)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(worker_threads.max(1))
        .thread_name(format!("talkbox-{}", service.name()))
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(async move {
        let link = Arc::new(ServiceLink::activate(link_fd)?);
        let (stop_tx, stop_rx) = watch::channel(false);
        let (mut term, mut int) = (
            signal(SignalKind::terminate()).context("SIGTERM handler")?,
            signal(SignalKind::interrupt()).context("SIGINT handler")?,
        );
        tokio::spawn(async move {
            tokio::select! {
                _ = term.recv() => {},
                _ = int.recv() => {},
            }
            let _ = stop_tx.send(true);
        });
        // Ping four times per watchdog period so that one late ping is never fatal.
        let period = Duration::from_secs(config.supervisor.watchdog_timeout_s);
        link.spawn_watchdog((period / 4).max(Duration::from_millis(250)));
        let ctx = ServiceContext {
            service,
            config,
            data,
            link: link.clone(),
            shutdown: stop_rx,
        };
        let result = serve(ctx, prepared).await;
        link.stopping().await;
        result
    })
}
