//! The keyed joiner's state on a real AWS-compatible endpoint (moto on loopback): the log
//! slots, the fence (`PutItem` only if absent) and the acknowledgement in DynamoDB, under
//! throttles and lost responses, restarts, environments switching shards and duplicate
//! invocations racing for the same slot. The property is the in-memory one: exactly the pairs
//! of the nested-loop reference join, each at most once unflagged, every impression forwarded.

use std::sync::Arc;

use adpipe_aws::DynamoDbStateLog;
use adpipe_core::config::JoinerConfig;
use adpipe_core::in_memory::{MemoryDeadLetterSink, MemoryRecordSink};
use adpipe_core::join::joiner::KeyedJoiner;
use adpipe_core::join::router::BatchRouter;
use adpipe_core::ports::StateLog;
use adpipe_core::testkit::{
    check_exactly_once, run_keyed, Disturbance, FaultPlan, FaultyLog, FaultySink,
    MemoryKeyedStream, Scenario, ScenarioSize,
};
use adpipe_it::{create_log_table, unique, LocalAws};

fn config(table: &str) -> JoinerConfig {
    let vars = [
        ("IMPRESSIONS_STREAM_NAME", "impressions"),
        ("CLICKS_STREAM_NAME", "clicks"),
        ("JOINED_STREAM_NAME", "joined"),
        ("STATE_LOG_TABLE_NAME", table),
        ("DEAD_LETTER_BUCKET", "bucket"),
        ("EMIT_MAX_ATTEMPTS", "2"),
    ];
    JoinerConfig::from_lookup(|k| {
        vars.iter()
            .find(|(n, _)| *n == k)
            .map(|(_, v)| (*v).to_owned())
    })
    .unwrap()
}

#[test]
fn property_the_keyed_joiner_on_dynamodb_matches_the_reference_join_under_faults_and_races() {
    use proptest::prelude::*;
    use proptest::test_runner::{Config, TestRunner};

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let clients = rt.block_on(LocalAws::shared().clients());
    let cases: u32 = std::env::var("ADPIPE_DYNAMODB_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(24);
    let mut runner = TestRunner::new(Config::with_cases(cases));
    let strategy = (
        any::<u64>(),
        1usize..10,
        1usize..16,
        1usize..8,
        1usize..3,
        0.0f64..0.3,
        (
            0.0f64..0.3,
            0.0f64..0.3,
            0.0f64..0.5,
            prop_oneof![2 => Just(0i64), 1 => 300i64..3_000, 1 => -6i64..=-1],
        ),
    );
    runner
        .run(
            &strategy,
            |(
                seed,
                impressions,
                clicks,
                max_batch,
                shards,
                fault_rate,
                (restart, duplicate, switch, warm_ms),
            )| {
                // A table per case: the logs are keyed by bucket range, which cases share.
                let table = unique("keyed-log");
                rt.block_on(create_log_table(&clients, &table)).unwrap();
                let scenario = Scenario::generate(
                    seed,
                    ScenarioSize {
                        impressions,
                        clicks,
                        duplicate_rate: 0.25,
                    },
                    "",
                );
                let cfg = config(&table);
                let keyed = Arc::new(MemoryKeyedStream::new("keyed", shards, 1_795_169_800_000));
                let router =
                    BatchRouter::new(keyed.clone(), MemoryDeadLetterSink::default(), cfg.clone());
                let log = Arc::new(FaultyLog {
                    inner: DynamoDbStateLog::new(clients.dynamodb.clone(), &table),
                    plan: FaultPlan::new(seed ^ 1, fault_rate, 20),
                });
                let sink = Arc::new(FaultySink {
                    inner: MemoryRecordSink::default(),
                    plan: FaultPlan::new(seed ^ 2, fault_rate, 20),
                });
                let letters = Arc::new(MemoryDeadLetterSink::default());
                let joiner = KeyedJoiner::new(
                    log.clone(),
                    keyed.ranges(),
                    sink.clone(),
                    letters.clone(),
                    cfg.clone(),
                );
                let twin = KeyedJoiner::new(
                    log.clone(),
                    keyed.ranges(),
                    sink.clone(),
                    letters.clone(),
                    cfg.clone(),
                );
                // Half the cases with a warm window of a few hundred ms of arrival: entries
                // move to cold pages in DynamoDB, and late events and rebuilds read them back.
                // (The scenarios' event times are at most ~9 min ahead of arrival.) A negative
                // `warm_ms` keeps the horizon with a budget of that many entries: a joiner
                // moving to another shard drops the others' memories and rebuilds them later.
                let (mut joiner, mut twin) = (joiner, twin);
                for j in [&mut joiner, &mut twin] {
                    j.rules.warm_ms = warm_ms.max(0);
                    if warm_ms < 0 {
                        j.rules.max_entries = warm_ms.unsigned_abs() as usize;
                    }
                    j.rules.evict_min_entries = 1;
                    j.rules.max_ahead_ms = 700_000;
                }
                let disturb = Disturbance {
                    restart,
                    duplicate,
                    switch,
                };
                rt.block_on(run_keyed(
                    &router, &keyed, &joiner, &twin, &scenario, seed, max_batch, disturb, 20_000,
                ))
                .map_err(TestCaseError::fail)?;
                check_exactly_once(&sink.inner.records(), &scenario, &cfg.rules)
                    .map_err(TestCaseError::fail)?;
                // The log is really in DynamoDB: a fresh reader finds every slot in order.
                let slots = rt.block_on(
                    log.inner
                        .read(&adpipe_core::join::buckets::BucketRange::ALL.log_id(), 0),
                );
                if shards == 1 && impressions > 0 {
                    let slots = slots.map_err(|e| TestCaseError::fail(e.to_string()))?;
                    prop_assert!(!slots.is_empty());
                    prop_assert!(slots.windows(2).all(|w| w[1].n == w[0].n + 1));
                }
                Ok(())
            },
        )
        .unwrap();
}
