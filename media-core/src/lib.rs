//! media-core: talkbox's SFU data plane.
//!
//! What it is for: WebRTC sessions (str0m in RTP mode, ICE-lite) driven by media workers that
//! own their sockets and clocks, and the forwarding of publisher RTP and data-channel messages
//! to subscribers. What it is not for: signaling, HTTP, the proxy protocol, placement policy —
//! the `sfu` service in the `appliance` crate drives it through [`worker::WorkerHandle`].
//!
//! Layers, as in quinn:
//! - sans-I/O, time as a parameter, unit-tested with synthetic input:
//!   [`demux`] (ufrag naming and STUN USERNAME peeking), [`forward`] (sequence number and
//!   timestamp rewriting, keyframe-request throttling), [`session`] (one str0m `Rtc` as a
//!   publisher or subscriber), [`publisher_limit`] (bitrate caps as SDP bandwidth lines and
//!   REMB), [`pause`] (pausing unused simulcast layers at the publisher by REMB), [`speaker`]
//!   (active speaker from the audio-level extension), [`temporal`] (VP8 temporal layer
//!   filtering; not yet wired into the worker);
//! - [`io`]: the narrow [`io::DatagramIo`] trait and its batched `recvmmsg`/`sendmmsg` (+GSO)
//!   backend; [`tcp`]: RFC 4571 framing for ICE-TCP;
//! - [`worker`]: one pinned thread per worker running sessions over its own socket.

pub mod allocator;
pub mod demux;
pub mod forward;
pub mod io;
pub mod layers;
pub mod loss;
pub mod pause;
pub mod publisher_limit;
pub mod session;
pub mod speaker;
pub mod tcp;
pub mod temporal;
pub mod worker;

pub use demux::SessionKey;
pub use session::StreamType;
pub use worker::{WorkerCommand, WorkerConfig, WorkerEvent, WorkerHandle};
