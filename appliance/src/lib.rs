//! talkbox's appliance: one binary (`talkbox`) holding the supervisor and every service.
//!
//! - [`supervisor`]: `talkbox run`, starts and watches the services as child processes;
//! - [`web`]: the admin setup page (for now the read-only status page);
//! - [`turn`]: STUN/TURN for clients behind NATs and firewalls;
//! - [`config`], [`secrets`], [`tls`], [`storage`]: the box's config, secrets and certificate,
//!   written crash-safely;
//! - [`service_runtime`], [`privileges`], [`logging`], [`https`]: what every service process
//!   shares (start-up order, dropping root, journald/stderr logs, the HTTPS loop).
//!
//! - [`provision`]: remote provisioning (signed bundles, try-and-revert, the push API);
//! - [`signaling`]: the Talk HPB signaling service; [`sfu`]: the SFU media service (media-core
//!   behind the `/proxy` control protocol); [`sizing`]: what the box can send and the limits
//!   that follow from it.
//!
//! TURN arrives as its own module; see DESIGN.md §1.

pub mod config;
pub mod https;
pub mod logging;
pub mod privileges;
pub mod provision;
pub mod secrets;
pub mod service;
pub mod service_runtime;
pub mod sfu;
pub mod signaling;
pub mod sizing;
pub mod storage;
pub mod supervisor;
pub mod tls;
pub mod turn;
pub mod web;
