//! The YAML file source. (Being written.)
