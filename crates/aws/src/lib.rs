//! AWS adapters for adpipe's ports: DynamoDB join state, Kinesis output, S3 dead letters, and
//! the one place SDK clients are configured.

pub mod dynamodb;
pub mod error;
pub mod kinesis;
pub mod s3;

pub use dynamodb::DynamoDbJoinState;
pub use kinesis::KinesisRecordSink;
pub use s3::S3DeadLetterSink;

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
        let s3 = aws_sdk_s3::config::Builder::from(sdk)
            .force_path_style(sdk.endpoint_url().is_some())
            .build();
        Clients {
            dynamodb: aws_sdk_dynamodb::Client::new(sdk),
            kinesis: aws_sdk_kinesis::Client::new(sdk),
            s3: aws_sdk_s3::Client::from_conf(s3),
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
