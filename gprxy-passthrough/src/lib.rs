//! gprxy's proxy: protocol framing without I/O ([`proto`]), the per-connection state machine
//! ([`session`]), the byte relay after login ([`relay`]), the accept loop ([`server`]), TLS, configuration, metrics and the admin listener;
//! and the user's token helper ([`client`]: `gprxy login`, `gprxy token`).
#![forbid(unsafe_code)]
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

pub mod admin;
pub mod client;
pub mod config;
pub mod fallback;
pub mod metrics;
pub mod pool;
pub mod proto;
pub mod relay;
pub mod server;
pub mod session;
pub mod tls;
