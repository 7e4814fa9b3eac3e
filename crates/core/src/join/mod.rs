//! The keyed join, in the order a record flows through it:
//!
//! - [`input`]: Kinesis records of the input streams to typed events; the batch report.
//! - [`router`]: input batches to the keyed stream, one bucket's events per keyed record.
//! - [`buckets`]: `impression_id` → state bucket → keyed-stream shard (a [`buckets::BucketRange`]).
//! - [`joiner`]: one keyed-stream batch: decide every event from memory, write the batch as
//!   fenced log slots, emit, then sweep orphans and evict.
//! - [`state`]: the range's memory, its log slots and their encoding, cold pages, eviction
//!   and the orphan ledger.
//! - [`emit`]: emission to an output stream within `PutRecords`' limits, with retries.
//! - [`rule`]: the join rule itself ([`rule::attributes`]).

pub mod buckets;
pub mod emit;
pub mod input;
pub mod joiner;
pub mod router;
pub mod rule;
pub mod state;
