//! adpipe's pure core: the event model, validation, the join rule and decisions, batch
//! processing over small ports, dead-letter entries and metrics. No AWS SDK, no Lambda runtime.
//!
//! The join rule is [`join::attributes`]; what each arrival does is in [`join`].

pub mod batch;
pub mod codec;
pub mod config;
pub mod dead_letter;
pub mod emit;
pub mod enrich;
pub mod enricher;
pub mod join;
pub mod keyed;
pub mod keyed_batch;
pub mod lake;
pub mod ledger;
pub mod memory;
pub mod metrics;
pub mod model;
pub mod packed;
pub mod ports;
pub mod rng;
#[cfg(feature = "testkit")]
pub mod testkit;
pub mod time;
pub mod validate;
