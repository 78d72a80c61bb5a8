//! The planner's model, with no runtime or HTTP types: what a worker of this hardware
//! costs ([`profile`]: prefill time against prompt length, decode step time against
//! batch and context, hand-off time per KV byte), what is asked of it ([`workload`],
//! [`Slo`]), how workers are laid out ([`layout`]), what a layout would do under a
//! workload ([`simulate`]: a discrete-event model of continuous batching, DistServe's
//! method), which layout serves the most within the SLO ([`plan`]), and, while
//! serving, whether to move a worker between the P/D pools ([`online`]).
//!
//! Measuring a profile and acting on a plan belong to callers (`tandem plan`,
//! `tandem up --planner`); this crate only reasons.

pub mod layout;
pub mod online;
pub mod plan;
pub mod profile;
pub mod simulate;
pub mod workload;

pub use layout::{Layout, WorkerGroup};
pub use plan::{Ranked, rank_layouts, table};
pub use profile::{Profile, ProfileError, WorkerProfile};
pub use simulate::{Prediction, simulate, simulate_requests};
pub use workload::{Arrival, LengthDist, Slo, Workload};
