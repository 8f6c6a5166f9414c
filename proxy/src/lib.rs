//! sluice's data plane. (Being written.)
