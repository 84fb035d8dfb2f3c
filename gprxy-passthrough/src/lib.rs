//! gprxy's proxy. Its modules, each importing only those below it:
//!
//! - [`server`]: the accept loop, reload and drain; [`admin`]: `/metrics` and `/healthz`;
//!   [`notify`]: readiness for systemd.
//! - [`session`]: one client connection: TLS, the startup packet, the login through a mode, the
//!   relay, the login's log event.
//! - The modes: [`passthrough`] (the server authenticates; the token-as-password bridge) and
//!   [`fallback`] (gprxy validates; service accounts, the session pool, the signed context).
//! - [`upstream`]: reaching the server, forwarding cancel requests.
//! - [`conn`]: the connection layer: shared state, stream, session error, cancel keys, reading a
//!   message; [`lifetime`]: when a logged-in session ends (`[session]`), the relay that watches
//!   for it.
//! - Below everything: [`proto`] (framing without I/O), [`relay`] (bytes both ways), [`track`]
//!   (requests against answers), [`config`], [`metrics`], [`tls`].
//!
//! Apart: [`user_login`], the user's side (`gprxy login`, `gprxy token`), and [`connect`], the
//! connector beside an application (`gprxy connect`), which stands on `user_login` and on the
//! proxy's framing, relay, upstream and TLS modules.
#![forbid(unsafe_code)]
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

pub mod admin;
pub mod config;
pub mod conn;
pub mod connect;
pub mod fallback;
pub mod lifetime;
pub mod metrics;
pub mod notify;
pub mod passthrough;
pub mod proto;
pub mod relay;
pub mod server;
pub mod session;
pub mod tls;
pub mod track;
pub mod upstream;
pub mod user_login;
