//! Verge scheduling: pure functions from (nodes, reservations, requests) to placements
//! and plans. No I/O, no clocks, no randomness except seeded synthetic data: the hub
//! builds a [`Cluster`] from its inventory ledger, asks for a placement or a plan, and
//! commits the result with compare-and-swap.
//!
//! - [`model`]: the cluster as flat arrays (capacity, free resources, group counts).
//! - [`online`]: filters, scores, domains (global → region → node), overflow, gangs,
//!   and explanations (`0/2400 nodes fit: 1900 insufficient memory, 500 wrong architecture`).
//! - [`memo`]: the best nodes of the last full scan, so that a burst of one shape
//!   does not scan every node for every placement (same answers).
//! - [`offline`]: fragmentation, bounded defragmentation plans, recommendations.
//! - [`trace`]: synthetic fleets and churn traces for benchmarks and tests, with the
//!   first-fit and best-fit baselines.

pub mod memo;
pub mod model;
pub mod offline;
pub mod online;
pub mod trace;

pub use model::{Cluster, GeoPoint, NodeSpec, Res, Scope, Taint};
pub use offline::{
    Alloc, Budget, Frag, FragReport, Plan, Recommendations, Shape, defrag_plan, fragmentation,
    recommend, shapes,
};
pub use online::{
    Placement, Policy, Reason, Request, Unschedulable, place, place_gang, place_scanning, score,
};
