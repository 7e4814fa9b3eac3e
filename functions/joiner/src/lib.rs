//! The joiner Lambda's thin edge: Kinesis event in, core batch processing, batch response out.

use adpipe_aws::{Clients, DynamoDbJoinState, KinesisRecordSink, S3DeadLetterSink};
use adpipe_core::batch::{BatchJoiner, BatchReport, FUNCTION};
use adpipe_core::config::{stream_name, JoinerConfig};
use adpipe_core::metrics::emf_line;
use adpipe_core::model::{InputRecord, SourcePosition};
use adpipe_core::ports::{DeadLetterSink, JoinState, RecordSink};
use aws_lambda_events::event::kinesis::KinesisEvent;
use aws_lambda_events::event::streams::{KinesisBatchItemFailure, KinesisEventResponse};

/// The joiner wired to AWS.
pub type AwsJoiner = BatchJoiner<DynamoDbJoinState, KinesisRecordSink, S3DeadLetterSink>;

/// Builds the joiner from clients and configuration (once per execution environment).
pub fn aws_joiner(clients: &Clients, config: JoinerConfig) -> AwsJoiner {
    BatchJoiner::new(
        DynamoDbJoinState::new(clients.dynamodb.clone(), &config.state_table),
        KinesisRecordSink::new(clients.kinesis.clone(), &config.joined_stream),
        S3DeadLetterSink::new(clients.s3.clone(), &config.dead_letter_bucket),
        config,
    )
}

/// The records of a Kinesis event with their positions. The shard is the `eventID` prefix
/// (`shardId-…:<sequence number>`), the stream the last part of `eventSourceARN`.
pub fn input_records(event: &KinesisEvent) -> Vec<InputRecord> {
    event
        .records
        .iter()
        .map(|r| {
            let shard = r
                .event_id
                .as_deref()
                .and_then(|id| id.split_once(':'))
                .map(|(shard, _)| shard.to_owned())
                .unwrap_or_default();
            InputRecord {
                position: SourcePosition {
                    stream: stream_name(r.event_source_arn.as_deref().unwrap_or_default())
                        .to_owned(),
                    shard,
                    sequence_number: r.kinesis.sequence_number.clone(),
                },
                data: r.kinesis.data.0.clone(),
            }
        })
        .collect()
}

/// The partial-batch response: the first failed record's sequence number, or nothing.
/// Lambda resumes the shard at that record; it never gets a null identifier (which would
/// fail the whole batch).
pub fn batch_response(event: &KinesisEvent, first_failure: Option<usize>) -> KinesisEventResponse {
    let mut response = KinesisEventResponse::default();
    if let Some(record) = first_failure.and_then(|i| event.records.get(i)) {
        let mut failure = KinesisBatchItemFailure::default();
        failure.item_identifier = Some(record.kinesis.sequence_number.clone());
        response.batch_item_failures.push(failure);
    }
    response
}

/// Handles one invocation: processes the batch, prints its EMF metrics line, and answers.
pub async fn handle<S: JoinState, K: RecordSink, D: DeadLetterSink>(
    joiner: &BatchJoiner<S, K, D>,
    event: &KinesisEvent,
    now_ms: i64,
) -> (KinesisEventResponse, BatchReport) {
    let records = input_records(event);
    let report = joiner.process(&records, now_ms).await;
    // EMF must reach CloudWatch Logs as a bare JSON line, so it bypasses the log formatter.
    println!(
        "{}",
        emf_line(
            &joiner.config.metrics_namespace,
            FUNCTION,
            &report.counts,
            now_ms
        )
    );
    tracing::info!(
        records = report.counts.records_in,
        joined = report.counts.joined,
        rejected = report.counts.rejected_total(),
        first_failure = ?report.first_failure,
        "batch processed"
    );
    (batch_response(event, report.first_failure), report)
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
}
