//! `tandem up`: a whole topology from one file.
//!
//! - [`topology`]: the TOML format and its checks.
//! - [`plan`]: the exact commands (built-in workers, vLLM workers, the router).
//! - [`doctor`]: checks that a topology can start.
//! - [`run`]: starting them here, waiting for health, prefixing logs, teardown by pid.

pub mod doctor;
pub mod plan;
pub mod run;
pub mod topology;
