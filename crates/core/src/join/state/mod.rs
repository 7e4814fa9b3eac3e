//! The join state of the keyed stream: one writer per bucket range decides every event in
//! shard order from memory, and persists what a batch changed as **one log slot**, a
//! compressed item written only if absent.
//!
//! A range's state is a log of slots `0, 1, 2, …` in one DynamoDB partition (`log#<range>`).
//! A slot holds the batch's new events (impressions and clicks), the outputs not yet known to
//! be on the joined stream (`pending`), and the shard's progress. Writing slot `n + 1` only if
//! it is absent is the fence: of a timed-out invocation still running, its retry and a
//! duplicate invocation, exactly one writes the next slot; the others find it taken, drop
//! their memory and fail the batch, which is then redelivered and skipped up to the progress.
//!
//! Outputs are emitted after their slot is written. A batch whose outputs were not all
//! accepted carries them in its slots' `pending` until a later batch's emission is accepted,
//! so a crash after the write loses nothing: a fresh instance re-reads the log and re-emits the
//! pending outputs flagged `recovered` (they may be on the stream already).
//!
//! Decisions use only the stored events and each record's arrival time on the keyed stream,
//! never the invocation's clock, so every attempt at a batch decides it the same way.//!
//! - [`model`]: stored events, pending outputs, slots, blobs, the state's rules.
//! - [`memory`]: one range's memory and the batch transaction around it.
//! - [`decide`]: one event's decision from memory.
//! - [`rebuild`]: memory from the log (cold start, catching up with another writer).
//! - [`slots`] and [`codec`]: what a batch writes, and its column-wise encoding.
//! - [`pages`], [`eviction`], [`orphans`]: the cold pages, moving entries there, and the
//!   orphan ledger of clicks that left memory still waiting.

pub mod codec;
pub mod decide;
pub mod eviction;
pub mod memory;
pub mod model;
pub mod orphans;
pub mod pages;
pub mod rebuild;
pub mod slots;

pub use eviction::Eviction;
pub use memory::JoinMemory;
pub use model::{
    Blob, OrphanClick, Outcome, Pending, PutSlot, Slot, SlotBody, StateRules, Step, Stored,
    DYNAMODB_ITEM_LIMIT, MAX_SLOT_BODY_BYTES, SLOT_FORMAT,
};
pub use orphans::ledger_pk;
pub use pages::{
    decode_events, encode_events, page_pk, Lookup, LEVEL_HOUR, LEVEL_MINUTE, MINUTE_PAGE_MIN_EVENTS,
};
pub use slots::{blob_item_size, decode_body, encode_body, slot_item_size, slots_for_batch};
