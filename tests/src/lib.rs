//! The harness gprxy's end-to-end tests share: throwaway PostgreSQL clusters on free loopback
//! ports in temporary folders, run as an unprivileged OS user when the tests run as root.
//!
//! A [`Cluster`] is stopped and its folder deleted when it is dropped, also when a test panics;
//! then the server log is printed first.
#![forbid(unsafe_code)]

mod certs;
mod cluster;
pub mod connect_upstream;
pub mod connector;
pub mod hostile;
pub mod idp;
pub mod machine;
pub mod pgwire;
pub mod provider;
pub mod proxy;

pub use certs::TestCerts;
pub use cluster::*;
