//! sluice's control plane: where the routing table comes from.
//!
//! # Layout
//! - [`table`]: the immutable [`Table`] of services and backends (no I/O, no kube).
//! - [`publish`]: the [`Publisher`] that makes a table live (arc-swap) and
//!   tells subscribers a new generation exists; equal tables are no-ops.
//! - [`source`]: producers of tables: [`source::file`] (a YAML file, reloaded
//!   on change) and [`source::kube`] (Services and EndpointSlices watched
//!   with kube-rs); [`source::apiserver`] tells when the apiserver would be
//!   reached only through a Service sluice serves itself.
//! - [`k8s`]: the pure index turning Kubernetes objects into a table.
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

pub mod cidr;
pub mod k8s;
pub mod publish;
pub mod source;
pub mod table;

pub use cidr::{Cidr, NodePortAddress};
pub use publish::{Publisher, Snapshot};
pub use table::{
    Affinity, Backend, Conditions, ListenKey, NoEndpoints, Policy, Protocol, ProxyProtocol,
    Service, Settings, Table, TableDiff,
};
