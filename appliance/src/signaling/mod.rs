//! The signaling service: the Nextcloud Talk HPB client API (`/spreed`), the backend API
//! (`/api/v1/...`), and the built-in backend for stand-alone rooms.
//!
//! - [`api`]: JSON shapes and feature ids; [`hub`]: the sans-I/O session and room state;
//! - [`checksum`], [`jwt`], [`session_id`]: the authentication primitives;

pub mod api;
pub mod checksum;
pub mod hub;
pub mod jwt;
pub mod session_id;
