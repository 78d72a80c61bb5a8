//! `tandem up`: a whole topology from one file.
//!
//! - [`topology`]: the TOML format and its checks.
//! - [`plan`]: the exact commands (built-in workers, vLLM workers, the router).
//! - [`generate`]: topology files written by tandem (`tandem plan rank --out`).
//! - [`doctor`]: checks that a topology can start.
//! - [`secret`]: the cluster secret handed to built-in workers.
//! - [`run`]: starting them here, waiting for health, prefixing logs, teardown by pid.
//! - [`stack`]: a topology's processes as one whole, stopped when dropped.
//! - [`prometheus`]: the scrape configuration of a topology.
//! - [`scale`]: starting and stopping workers as the router's online planner asks.

pub mod doctor;
pub mod generate;
pub mod plan;
pub mod prometheus;
pub mod remote;
pub mod run;
pub mod scale;
pub mod secret;
pub mod stack;
pub mod topology;
