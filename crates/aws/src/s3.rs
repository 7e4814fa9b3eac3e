//! `S3DeadLetterSink`: dead-letter and late-pair entries as JSON objects in S3.

use adpipe_core::ports::{DeadLetter, DeadLetterSink, PortError};
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::Client;

use crate::error::port_error;

/// A bucket holding dead-letter entries under their deterministic keys.
#[derive(Debug, Clone)]
pub struct S3DeadLetterSink {
    client: Client,
    bucket: String,
}

impl S3DeadLetterSink {
    pub fn new(client: Client, bucket: impl Into<String>) -> Self {
        S3DeadLetterSink {
            client,
            bucket: bucket.into(),
        }
    }
}

impl DeadLetterSink for S3DeadLetterSink {
    async fn put(&self, letter: &DeadLetter) -> Result<(), PortError> {
        self.client
            .put_object()
            .bucket(&self.bucket)
            .key(&letter.key)
            .content_type("application/json")
            .body(ByteStream::from(letter.body.clone()))
            .send()
            .await
            .map_err(|e| port_error("S3 PutObject", e))?;
        Ok(())
    }
}
