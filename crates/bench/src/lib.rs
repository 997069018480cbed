//! What the benchmark programs of `src/bin/` share.

pub mod histogram;
pub mod kick_stages;
pub mod notify_run;
pub mod swimlane;
pub mod tracefs;
