//! sluice's data plane. (Being written.)

pub mod vip;
