//! What the benchmark programs of `src/bin/` share.

pub mod histogram;
