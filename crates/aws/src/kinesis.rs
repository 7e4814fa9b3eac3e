//! `KinesisRecordSink`: an output stream written with `PutRecords`.

use adpipe_core::ports::{EntryResult, OutRecord, PortError, RecordSink};
use aws_sdk_kinesis::operation::put_records::PutRecordsOutput;
use aws_sdk_kinesis::primitives::Blob;
use aws_sdk_kinesis::types::PutRecordsRequestEntry;
use aws_sdk_kinesis::Client;

use crate::error::port_error;

/// An output Kinesis stream.
#[derive(Debug, Clone)]
pub struct KinesisRecordSink {
    client: Client,
    stream: String,
}

impl KinesisRecordSink {
    pub fn new(client: Client, stream: impl Into<String>) -> Self {
        KinesisRecordSink {
            client,
            stream: stream.into(),
        }
    }
}

/// Per-entry results of a `PutRecords` response, in request order. A response with the wrong
/// number of entries fails every entry rather than guessing which succeeded.
pub fn entry_results(output: &PutRecordsOutput, sent: usize) -> Vec<EntryResult> {
    let entries = output.records();
    if entries.len() != sent {
        return vec![
            EntryResult::Failed {
                code: "InternalFailure".into(),
                message: format!("PutRecords answered {} entries for {sent}", entries.len()),
            };
            sent
        ];
    }
    entries
        .iter()
        .map(|e| match e.error_code() {
            None => EntryResult::Accepted,
            Some(code) => EntryResult::Failed {
                code: code.to_owned(),
                message: e.error_message().unwrap_or_default().to_owned(),
            },
        })
        .collect()
}

impl RecordSink for KinesisRecordSink {
    async fn put_records(&self, records: &[OutRecord]) -> Result<Vec<EntryResult>, PortError> {
        let entries = records
            .iter()
            .map(|r| {
                PutRecordsRequestEntry::builder()
                    .partition_key(&r.partition_key)
                    .set_explicit_hash_key(r.explicit_hash_key.clone())
                    .data(Blob::new(r.data.clone()))
                    .build()
                    .map_err(|e| PortError::Rejected(format!("PutRecords entry: {e}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        // No SDK retries: `PutRecords` is not idempotent, and a retry after a lost response
        // would put every record twice, unflagged. The core's emitter retries instead and
        // flags what may have been written (`adpipe_core::join::emit::send_all`).
        let out = self
            .client
            .put_records()
            .stream_name(&self.stream)
            .set_records(Some(entries))
            .customize()
            .config_override(
                aws_sdk_kinesis::config::Config::builder()
                    .retry_config(aws_sdk_kinesis::config::retry::RetryConfig::disabled()),
            )
            .send()
            .await
            .map_err(|e| port_error("Kinesis PutRecords", e))?;
        Ok(entry_results(&out, records.len()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_sdk_kinesis::types::PutRecordsResultEntry;

    fn ok() -> PutRecordsResultEntry {
        PutRecordsResultEntry::builder()
            .sequence_number("1")
            .shard_id("shardId-000000000000")
            .build()
    }

    fn failed() -> PutRecordsResultEntry {
        PutRecordsResultEntry::builder()
            .error_code("ProvisionedThroughputExceededException")
            .error_message("Rate exceeded for shard")
            .build()
    }

    #[test]
    fn partial_failure_names_exactly_the_failed_entries() {
        let out = PutRecordsOutput::builder()
            .failed_record_count(1)
            .records(ok())
            .records(failed())
            .records(ok())
            .build()
            .unwrap();
        let results = entry_results(&out, 3);
        assert_eq!(results[0], EntryResult::Accepted);
        assert!(
            matches!(&results[1], EntryResult::Failed { code, .. } if code == "ProvisionedThroughputExceededException")
        );
        assert_eq!(results[2], EntryResult::Accepted);
    }

    #[test]
    fn a_short_response_fails_every_entry() {
        let out = PutRecordsOutput::builder().records(ok()).build().unwrap();
        assert!(entry_results(&out, 2)
            .iter()
            .all(|r| matches!(r, EntryResult::Failed { .. })));
    }
}
