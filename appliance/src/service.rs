//! The catalogue of services the supervisor runs: their names, start order, and which of them
//! the config enables.

use crate::config::Config;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Service {
    /// The SFU media node (media-core behind the proxy protocol).
    Sfu,
    /// STUN/TURN.
    Turn,
    /// Nextcloud Talk HPB signaling and the meeting page; drives the SFU.
    Signaling,
    /// The admin setup page.
    Web,
    /// The provisioning push API (mutual TLS); applying a bundle is the supervisor's job.
    Provision,
}

impl Service {
    /// Start order: what others depend on comes first (signaling connects to the SFU).
    pub const START_ORDER: [Service; 5] = [
        Service::Sfu,
        Service::Turn,
        Service::Signaling,
        Service::Web,
        Service::Provision,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Service::Sfu => "sfu",
            Service::Turn => "turn",
            Service::Signaling => "signaling",
            Service::Web => "web",
            Service::Provision => "provision",
        }
    }

    pub fn from_name(name: &str) -> Option<Service> {
        Self::START_ORDER.into_iter().find(|s| s.name() == name)
    }

    /// Whether the config asks for the service.
    pub fn enabled(self, c: &Config) -> bool {
        match self {
            Service::Sfu => c.sfu.enabled,
            Service::Turn => c.turn.enabled,
            Service::Signaling => c.signaling.enabled,
            Service::Web => c.web.enabled,
            Service::Provision => c.provision.enabled,
        }
    }

    /// The services the supervisor starts for this config, in start order.
    pub fn to_run(c: &Config) -> Vec<Service> {
        Self::START_ORDER
            .into_iter()
            .filter(|s| s.enabled(c))
            .collect()
    }

    /// True when a config change touches this service, so it must be restarted to apply it.
    pub fn affected_by(self, old: &Config, new: &Config) -> bool {
        let own = match self {
            Service::Sfu => old.sfu != new.sfu || old.sizing != new.sizing,
            Service::Turn => old.turn != new.turn,
            Service::Signaling => {
                old.signaling != new.signaling || old.turn != new.turn || old.sfu != new.sfu
            }
            Service::Web => old.web.web_process_part() != new.web.web_process_part(),
            Service::Provision => old.provision != new.provision,
        };
        // Every service logs at the supervisor's level and pings at its watchdog rate.
        own || old.supervisor.log_level != new.supervisor.log_level
            || old.supervisor.watchdog_timeout_s != new.supervisor.watchdog_timeout_s
            || old.supervisor.user != new.supervisor.user
    }
}
