//! adpipe's pure core: the event model, validation, the keyed join (router, joiner, state),
//! enrichment and the lake's rows, dead-letter entries and metrics, over small ports. No AWS
//! SDK, no Lambda runtime.
//!
//! The join rule is [`join::rule::attributes`]; how a record flows through the join is in
//! [`join`].

pub mod config;
pub mod dead_letter;
pub mod enrich;
pub mod enricher;
pub mod in_memory;
pub mod join;
pub mod kpl;
pub mod lake;
pub mod ledger;
pub mod metrics;
pub mod model;
pub mod ports;
pub mod rng;
#[cfg(feature = "testkit")]
pub mod testkit;
pub mod time;
pub mod validate;
