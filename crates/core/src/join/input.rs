//! The joiner's input: Kinesis records of the input streams validated into typed events, and
//! what a batch reports back to Lambda (the first record to redeliver, counts).

use std::collections::BTreeMap;

use crate::config::JoinerConfig;
use crate::metrics::Counts;
use crate::model::{Event, InputRecord, RecordKind};
use crate::ports::OutRecord;
use crate::validate::{decode, RejectReason, Rejection};

/// The function name used in dead-letter keys and metrics.
pub const FUNCTION: &str = "joiner";

/// What a batch came to.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BatchReport {
    /// Index of the first record that must be redelivered, if any.
    pub first_failure: Option<usize>,
    /// Every unfinished record with the reason, by index.
    pub failures: BTreeMap<usize, String>,
    pub counts: Counts,
}

impl BatchReport {
    /// The report of a batch of `records` records, nothing done yet.
    pub fn new(records: usize) -> Self {
        BatchReport {
            counts: Counts {
                records_in: records as u64,
                ..Counts::default()
            },
            ..BatchReport::default()
        }
    }

    /// The whole batch is to be redelivered, from its first record, for `why`.
    pub fn fail_all(&mut self, records: usize, why: String) {
        *self = BatchReport::new(records);
        self.first_failure = Some(0);
        self.failures.insert(0, why);
        self.counts.failed = records as u64;
    }
}

/// Which input stream a record came from, by its stream's name.
fn kind_of(config: &JoinerConfig, stream: &str) -> Option<RecordKind> {
    if stream == config.impressions_stream {
        Some(RecordKind::Impression)
    } else if stream == config.clicks_stream {
        Some(RecordKind::Click)
    } else {
        None
    }
}

/// Validates one input record (a plain record, or one user record of a KPL aggregate): its
/// envelope, its source stream, its fields and its event time.
pub fn parse_input(config: &JoinerConfig, record: &InputRecord) -> Result<Event, Rejection> {
    if let Some(detail) = &record.invalid_base64 {
        return Err(Rejection::new(RejectReason::InvalidBase64, detail.clone()));
    }
    let kind = kind_of(config, &record.position.stream).ok_or_else(|| {
        Rejection::new(
            RejectReason::UnknownSource,
            format!(
                "stream {:?} is neither the impressions stream {:?} nor the clicks stream {:?}",
                record.position.stream, config.impressions_stream, config.clicks_stream
            ),
        )
    })?;
    let event = decode(kind, &record.data)?;
    config
        .time_bounds
        .check("event_time", event.event_time_ms(), record.arrival_ms)?;
    Ok(event)
}

/// The same joined-stream record flagged `recovered`: it may already be on the stream (a
/// `PutRecords` that failed without an answer may have been written).
pub(crate) fn flag_recovered(record: &OutRecord) -> OutRecord {
    // Only records this crate encoded get here; keep the bytes if one ever does not decode.
    let data =
        crate::model::flag_recovered_bytes(&record.data).unwrap_or_else(|| record.data.clone());
    OutRecord {
        partition_key: record.partition_key.clone(),
        data,
        explicit_hash_key: record.explicit_hash_key.clone(),
    }
}
