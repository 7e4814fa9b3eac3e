//! The joiner Lambda's thin edge: a Kinesis batch in, routed (an input stream's batch) or
//! joined (a keyed-stream batch) by the core, the batch response out.

use adpipe_aws::{
    Clients, DynamoDbStateLog, KinesisRecordSink, KinesisShardRanges, S3DeadLetterSink,
};
use adpipe_core::config::JoinerConfig;
use adpipe_core::join::input::{BatchReport, FUNCTION};
use adpipe_core::join::joiner::KeyedJoiner;
use adpipe_core::join::router::BatchRouter;
use adpipe_core::metrics::{emf_line, Invocation};
use adpipe_core::ports::{DeadLetterSink, RecordSink, ShardRanges, StateLog};
use adpipe_lambda::{batch_response, input_records, KinesisInput};
use aws_lambda_events::event::streams::KinesisEventResponse;

/// The joiner function's two roles, wired to AWS: the router (input streams to the keyed
/// stream) and the keyed joiner (keyed stream to the joined stream).
pub struct AwsFunction {
    pub router: BatchRouter<KinesisRecordSink, S3DeadLetterSink>,
    pub keyed:
        KeyedJoiner<DynamoDbStateLog, KinesisShardRanges, KinesisRecordSink, S3DeadLetterSink>,
}

/// Builds both roles from clients and configuration (once per execution environment).
pub fn aws_function(clients: &Clients, config: JoinerConfig) -> AwsFunction {
    let dead_letters = || S3DeadLetterSink::new(clients.s3.clone(), &config.dead_letter_bucket);
    AwsFunction {
        router: BatchRouter::new(
            KinesisRecordSink::new(clients.kinesis.clone(), &config.keyed_stream),
            dead_letters(),
            config.clone(),
        ),
        keyed: KeyedJoiner::new(
            DynamoDbStateLog::new(clients.dynamodb.clone(), &config.state_log_table),
            KinesisShardRanges::new(clients.kinesis.clone()),
            KinesisRecordSink::new(clients.kinesis.clone(), &config.joined_stream),
            dead_letters(),
            config,
        ),
    }
}

/// Handles one invocation of the function: a batch of the keyed stream goes to the keyed
/// joiner, a batch of an input stream to the router. Prints the batch's EMF metrics line.
pub async fn handle_routed<KR, DR, L, R, K, D>(
    router: &BatchRouter<KR, DR>,
    keyed: &KeyedJoiner<L, R, K, D>,
    event: &impl KinesisInput,
    now_ms: i64,
    invocation: &Invocation,
) -> (KinesisEventResponse, BatchReport)
where
    KR: RecordSink,
    DR: DeadLetterSink,
    L: StateLog,
    R: ShardRanges,
    K: RecordSink,
    D: DeadLetterSink,
{
    let records = input_records(event);
    let is_keyed = records
        .first()
        .is_some_and(|r| r.position.stream == keyed.config.keyed_stream);
    let (report, role) = if is_keyed {
        (keyed.process(&records, now_ms).await, "join")
    } else {
        (router.process(&records, now_ms).await, "route")
    };
    answer(event, report, &keyed.config, role, now_ms, invocation)
}

/// Prints a batch's EMF metrics line and log line, and builds the batch response.
fn answer(
    event: &impl KinesisInput,
    report: BatchReport,
    config: &JoinerConfig,
    role: &str,
    now_ms: i64,
    invocation: &Invocation,
) -> (KinesisEventResponse, BatchReport) {
    // EMF must reach CloudWatch Logs as a bare JSON line, so it bypasses the log formatter.
    println!(
        "{}",
        emf_line(
            &config.metrics_namespace,
            FUNCTION,
            &report.counts,
            now_ms,
            invocation
        )
    );
    tracing::info!(
        role,
        records = report.counts.records_in,
        joined = report.counts.joined,
        rejected = report.counts.rejected_total(),
        first_failure = ?report.first_failure,
        "batch processed"
    );
    (batch_response(event, report.first_failure), report)
}
