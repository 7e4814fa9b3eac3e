//! AWS adapters for adpipe's ports: the join state's log in DynamoDB, Kinesis output and shard
//! ranges, S3 dead letters, and the one place SDK clients are configured.

pub mod error;
pub mod item_size;
pub mod kinesis;
pub mod metering;
pub mod s3;
pub mod state_log;

pub use kinesis::KinesisRecordSink;
pub use metering::RequestCounter;
pub use s3::S3DeadLetterSink;
pub use state_log::{DynamoDbStateLog, KinesisShardRanges};

/// The AWS clients the functions use, built once per process from one shared configuration.
#[derive(Debug, Clone)]
pub struct Clients {
    pub dynamodb: aws_sdk_dynamodb::Client,
    pub kinesis: aws_sdk_kinesis::Client,
    pub s3: aws_sdk_s3::Client,
}

impl Clients {
    /// Clients from an SDK configuration. With an endpoint override (`AWS_ENDPOINT_URL`, as the
    /// local endpoint uses) S3 is addressed path-style, since local servers have no DNS for
    /// virtual-hosted buckets.
    pub fn new(sdk: &aws_config::SdkConfig) -> Self {
        Self::build(sdk, None)
    }

    /// Clients whose every request is counted by `counter` (benchmarks).
    pub fn metered(sdk: &aws_config::SdkConfig, counter: &RequestCounter) -> Self {
        Self::build(sdk, Some(counter))
    }

    fn build(sdk: &aws_config::SdkConfig, counter: Option<&RequestCounter>) -> Self {
        // DynamoDB's retries are not limited by the SDK's shared retry quota. The quota is
        // refilled only by successes, and a redelivered record's conditional write is answered
        // with ConditionalCheckFailedException by design (nothing to write), so under a
        // throttling storm plus Lambda's redeliveries it drains and stays empty: every throttle
        // then fails its record at once, and Lambda retries the whole rest of the batch, far
        // more load than the one request the SDK would have retried. Each request still makes
        // at most the retry config's attempts, with backoff.
        let mut dynamodb = aws_sdk_dynamodb::config::Builder::from(sdk).retry_partition(
            aws_sdk_dynamodb::config::retry::RetryPartition::custom("adpipe-dynamodb")
                .token_bucket(aws_sdk_dynamodb::config::retry::TokenBucket::unlimited())
                .build(),
        );
        let mut kinesis = aws_sdk_kinesis::config::Builder::from(sdk);
        let mut s3 =
            aws_sdk_s3::config::Builder::from(sdk).force_path_style(sdk.endpoint_url().is_some());
        if let Some(c) = counter {
            dynamodb = dynamodb.interceptor(c.clone());
            kinesis = kinesis.interceptor(c.clone());
            s3 = s3.interceptor(c.clone());
        }
        Clients {
            dynamodb: aws_sdk_dynamodb::Client::from_conf(dynamodb.build()),
            kinesis: aws_sdk_kinesis::Client::from_conf(kinesis.build()),
            s3: aws_sdk_s3::Client::from_conf(s3.build()),
        }
    }

    /// Clients from the environment (region, credentials, `AWS_ENDPOINT_URL`).
    pub async fn from_env() -> Self {
        let sdk = aws_config::defaults(aws_config::BehaviorVersion::latest())
            .load()
            .await;
        Self::new(&sdk)
    }
}
