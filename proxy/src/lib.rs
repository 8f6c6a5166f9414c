//! sluice's data plane: from an accepted client to a forwarded connection.
//!
//! # Layout
//! - [`server`]: the [`Proxy`]: listeners that follow the live table, the
//!   accept loops, per-connection handling (pick, dial, retry, forward) and
//!   graceful shutdown.
//! - [`listener`]: shareable listening sockets (SO_REUSEPORT, IP_FREEBIND).
//! - [`balance`]: the pure backend pick (round robin, least connections by
//!   two random choices, client-IP affinity).
//! - [`connect`]: the one dial function (timeout, optional source address)
//!   and the classification of dial failures.
//! - [`forward`]: bidirectional forwarding with half-close and reset
//!   propagation.
//! - [`tracker`]: per-backend state that survives table swaps: active
//!   connections, ejection after failed dials, draining and drain timeouts.
//! - [`stats`]: process-wide counters.
//! - [`cli`]: the `sluice` command line.
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

pub mod balance;
pub mod cli;
pub mod connect;
pub mod forward;
pub mod listener;
pub mod server;
pub mod stats;
pub mod tracker;

pub use server::{Proxy, ProxyConfig, ShutdownReport};
