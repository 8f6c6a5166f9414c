//! sluice's data plane: from an accepted client to a forwarded connection.
//!
//! # Layout
//! - [`server`]: the [`Proxy`]: listeners that follow the live table, the
//!   accept loops, per-connection handling (pick, dial, retry, forward) and
//!   graceful shutdown.
//! - [`workers`]: data-plane threads, one event loop per core, each with
//!   its own listener per address.
//! - [`listener`]: shareable listening sockets (SO_REUSEPORT, IP_FREEBIND).
//! - [`balance`]: the pure backend pick (round robin, least connections by
//!   two random choices, Maglev and source hashing, client-IP affinity).
//! - [`connect`]: the one dial function (timeout, optional source address)
//!   and the classification of dial failures.
//! - [`proxy_protocol`]: PROXY protocol v2 headers for Services that
//!   ask for them (`sluice.io/proxy-protocol: v2`), sent after the dial.
//! - [`forward`]: bidirectional forwarding with half-close and reset
//!   propagation.
//! - `splice` (Linux): zero-copy forwarding through pooled pipes.
//! - [`tracker`]: per-backend state that survives table swaps: active
//!   connections, ejection after failed dials, draining and drain timeouts.
//! - [`metrics`]: Prometheus metrics, with label sets bounded by the table.
//! - [`saturation`]: sluice's own resource exhaustion (descriptors, buffers,
//!   ports) as a streak that `/healthz` reports; never a backend's fault.
//! - [`compat_metrics`]: `process_*` and kube-proxy's metric names where
//!   the meaning is the same.
//! - [`admin`]: health, readiness, metrics and `/debug/table` over hyper.
//! - [`nft`]: sluice's own nftables table (`--intercept nftables`): the
//!   desired content from the table, diffs as `nft -f` scripts, and `nft`.
//! - [`nft_netlink`]: element changes to that table as one nf_tables
//!   netlink batch (no `nft` fork per change).
//! - [`reconcile`]: one loop follows the table for the kernel state
//!   (nftables table, Service IPs): a `TableDiff` per publish, handed to
//!   each follower.
//! - [`leftovers`]: what kube-proxy (IPVS, iptables, nftables modes) left
//!   on the node, checked at start for `/healthz` and a metric.
//! - [`udp`]: UDP Services: a socket per UDP listen key, flows with
//!   connected backend sockets, idle expiry, the flow bound and re-sends.
//! - [`vip`]: Service IPs on a device (netlink), like IPVS mode's `kube-ipvs0`.
//! - [`cli`]: the `sluice` command line.
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

pub mod admin;
pub mod balance;
pub mod cli;
pub mod compat_metrics;
pub mod connect;
pub mod forward;
pub mod leftovers;
pub mod listener;
pub mod metrics;
pub mod nft;
pub mod nft_netlink;
pub mod policy_route;
pub mod proxy_protocol;
pub mod reconcile;
pub mod saturation;
pub mod server;
pub mod source_ip;
#[cfg(target_os = "linux")]
pub mod splice;
pub mod tracker;
pub mod udp;
pub mod udp_intercept;
pub mod vip;
pub mod workers;

pub use server::{Proxy, ProxyConfig, ShutdownReport};
