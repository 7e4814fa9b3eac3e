//! What both functions read of a Kinesis batch: the event as Lambda delivers it (read
//! leniently, so one record with invalid base64 does not fail the batch), its records with
//! their positions, the partial-batch response, and the wall clock. Neither function's crate
//! owns it.

use adpipe_core::config::stream_name;
use adpipe_core::model::{InputRecord, SourcePosition};
use aws_lambda_events::event::kinesis::KinesisEvent;
use aws_lambda_events::event::streams::{KinesisBatchItemFailure, KinesisEventResponse};
use serde::{Deserialize, Serialize};

/// A Kinesis event as Lambda delivers it, read leniently: only the fields the functions use,
/// and `data` kept as text. `aws_lambda_events`' `KinesisEvent` fails the whole event on one
/// record with invalid base64, which would block the shard; here that record is dead-lettered
/// (`invalid_base64`) and the rest of the batch goes on.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
pub struct KinesisBatch {
    #[serde(rename = "Records", default)]
    pub records: Vec<KinesisBatchRecord>,
}

/// One record of a [`KinesisBatch`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
pub struct KinesisBatchRecord {
    #[serde(rename = "eventID", default)]
    pub event_id: Option<String>,
    #[serde(rename = "eventSourceARN", default)]
    pub event_source_arn: Option<String>,
    pub kinesis: KinesisBatchData,
}

/// The `kinesis` object of a record: its sequence number, base64 `data` and arrival time.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
pub struct KinesisBatchData {
    #[serde(rename = "sequenceNumber")]
    pub sequence_number: String,
    pub data: String,
    /// Epoch seconds with a fraction: a JSON number as Lambda sends it, or a string as
    /// `aws_lambda_events` writes it back.
    #[serde(
        rename = "approximateArrivalTimestamp",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub approximate_arrival_timestamp: Option<serde_json::Value>,
}

/// Epoch seconds as epoch milliseconds, to the whole second: the arrival only bounds event
/// times an hour ahead, and `aws_lambda_events` misreads the fraction (`.5` as 5 ms), so both
/// readings of an event agree only on whole seconds.
fn seconds_to_ms(v: &serde_json::Value) -> Option<i64> {
    let seconds = match v {
        serde_json::Value::Number(n) => n.as_f64(),
        serde_json::Value::String(s) => s.trim().parse::<f64>().ok(),
        _ => None,
    }?;
    seconds.is_finite().then(|| seconds.floor() as i64 * 1000)
}

/// What the handlers need of a Kinesis event: its records with their positions, and each
/// record's sequence number for the batch response.
pub trait KinesisInput {
    /// The records with their positions. The shard is the `eventID` prefix
    /// (`shardId-…:<sequence number>`), the stream the last part of `eventSourceARN`.
    fn input_records(&self) -> Vec<InputRecord>;
    fn sequence_number(&self, index: usize) -> Option<&str>;
}

fn position(event_id: Option<&str>, arn: Option<&str>, sequence_number: &str) -> SourcePosition {
    let shard = event_id
        .and_then(|id| id.split_once(':'))
        .map(|(shard, _)| shard.to_owned())
        .unwrap_or_default();
    SourcePosition {
        stream: stream_name(arn.unwrap_or_default()).to_owned(),
        shard,
        sequence_number: sequence_number.to_owned(),
        sub_sequence_number: None,
    }
}

impl KinesisInput for KinesisBatch {
    fn input_records(&self) -> Vec<InputRecord> {
        use base64::Engine;
        self.records
            .iter()
            .map(|r| {
                let position = position(
                    r.event_id.as_deref(),
                    r.event_source_arn.as_deref(),
                    &r.kinesis.sequence_number,
                );
                let arrival_ms = r
                    .kinesis
                    .approximate_arrival_timestamp
                    .as_ref()
                    .and_then(seconds_to_ms);
                match base64::engine::general_purpose::STANDARD.decode(&r.kinesis.data) {
                    Ok(data) => InputRecord {
                        position,
                        data,
                        invalid_base64: None,
                        arrival_ms,
                    },
                    Err(e) => InputRecord {
                        position,
                        data: r.kinesis.data.clone().into_bytes(),
                        invalid_base64: Some(format!("the envelope's data is not base64: {e}")),
                        arrival_ms,
                    },
                }
            })
            .collect()
    }

    fn sequence_number(&self, index: usize) -> Option<&str> {
        self.records
            .get(index)
            .map(|r| r.kinesis.sequence_number.as_str())
    }
}

impl KinesisInput for KinesisEvent {
    fn input_records(&self) -> Vec<InputRecord> {
        self.records
            .iter()
            .map(|r| InputRecord {
                position: position(
                    r.event_id.as_deref(),
                    r.event_source_arn.as_deref(),
                    &r.kinesis.sequence_number,
                ),
                data: r.kinesis.data.0.clone(),
                invalid_base64: None,
                arrival_ms: Some(r.kinesis.approximate_arrival_timestamp.0.timestamp() * 1000),
            })
            .collect()
    }

    fn sequence_number(&self, index: usize) -> Option<&str> {
        self.records
            .get(index)
            .map(|r| r.kinesis.sequence_number.as_str())
    }
}

/// The records of a Kinesis event with their positions.
pub fn input_records(event: &impl KinesisInput) -> Vec<InputRecord> {
    event.input_records()
}

/// The partial-batch response: the first failed record's sequence number, or nothing.
/// Lambda resumes the shard at that record; it never gets a null identifier (which would
/// fail the whole batch).
pub fn batch_response(
    event: &impl KinesisInput,
    first_failure: Option<usize>,
) -> KinesisEventResponse {
    let mut response = KinesisEventResponse::default();
    if let Some(sequence_number) = first_failure.and_then(|i| event.sequence_number(i)) {
        let mut failure = KinesisBatchItemFailure::default();
        failure.item_identifier = Some(sequence_number.to_owned());
        response.batch_item_failures.push(failure);
    }
    response
}

/// Wall-clock milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event() -> KinesisEvent {
        serde_json::from_str(include_str!("../../../events/impressions.json"))
            .expect("fixture parses")
    }

    #[test]
    fn positions_come_from_event_id_and_source_arn() {
        let records = input_records(&event());
        assert!(!records.is_empty());
        let lenient: KinesisBatch =
            serde_json::from_str(include_str!("../../../events/impressions.json")).unwrap();
        assert_eq!(input_records(&lenient), records, "both readings agree");
        for r in &records {
            assert_eq!(r.position.stream, "adpipe-local-impressions");
            assert!(r.position.shard.starts_with("shardId-"));
            assert!(!r.position.sequence_number.is_empty());
            assert!(r.data.starts_with(b"{"));
        }
    }

    #[test]
    fn response_names_the_first_failed_sequence_number_or_nothing() {
        let e = event();
        assert!(batch_response(&e, None).batch_item_failures.is_empty());
        let r = batch_response(&e, Some(1));
        assert_eq!(r.batch_item_failures.len(), 1);
        assert_eq!(
            r.batch_item_failures[0].item_identifier.as_deref(),
            Some(e.records[1].kinesis.sequence_number.as_str())
        );
        let json = serde_json::to_value(&r).unwrap();
        assert!(json["batchItemFailures"][0]["itemIdentifier"].is_string());
    }

    #[test]
    fn a_record_with_invalid_base64_is_kept_and_marked_not_the_whole_event_failed() {
        let mut v: serde_json::Value =
            serde_json::from_str(include_str!("../../../events/impressions.json")).unwrap();
        v["Records"][1]["kinesis"]["data"] = "not base64!!".into();
        assert!(
            serde_json::from_value::<KinesisEvent>(v.clone()).is_err(),
            "aws_lambda_events refuses the whole event"
        );
        let batch: KinesisBatch = serde_json::from_value(v).unwrap();
        let records = input_records(&batch);
        assert_eq!(records.len(), batch.records.len());
        assert!(records[0].invalid_base64.is_none());
        assert_eq!(records[1].data, b"not base64!!");
        assert!(records[1]
            .invalid_base64
            .as_deref()
            .unwrap()
            .contains("not base64"));
        assert!(records[2].invalid_base64.is_none());
    }
}
