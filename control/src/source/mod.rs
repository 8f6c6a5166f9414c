//! Sources of tables. Each one turns its input into a [`crate::Table`] and
//! hands it to the [`crate::Publisher`]; a bad input is reported and the last
//! good table keeps serving.

pub mod apiserver;
pub mod file;
pub mod healthcheck;
pub mod kube;
