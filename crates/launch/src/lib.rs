//! `tandem up`: a whole topology from one file.
//!
//! - [`topology`]: the TOML format and its checks.
//! - [`plan`]: the exact commands (built-in workers, vLLM workers, the router).
//! - [`run`]: starting them here, waiting for health, prefixing logs, teardown by pid.

pub mod plan;
pub mod run;
pub mod topology;
