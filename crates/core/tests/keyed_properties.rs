//! Property: through the router and the keyed joiner, whatever the interleaving, the number of
//! keyed shards, redeliveries, restarts, duplicate invocations and injected faults, the joined
//! stream carries exactly the pairs of a plain nested-loop join and every impression, each at
//! most once unflagged.

use std::sync::Arc;

use adpipe_core::config::JoinerConfig;
use adpipe_core::keyed::BatchRouter;
use adpipe_core::keyed_batch::KeyedJoiner;
use adpipe_core::memory::{MemoryDeadLetterSink, MemoryRecordSink};
use adpipe_core::packed::MemoryStateLog;
use adpipe_core::testkit::{
    check_exactly_once, decode_joined, run_keyed, Disturbance, FaultPlan, FaultyDeadLetters,
    FaultyLog, FaultySink, MemoryKeyedStream, Scenario, ScenarioSize,
};
use proptest::prelude::*;

fn config() -> JoinerConfig {
    adpipe_core::testkit::test_config(2)
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .expect("runtime")
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn any_interleaving_shard_count_and_redelivery_gives_the_reference_join(
        seed in any::<u64>(),
        impressions in 0usize..14,
        clicks in 0usize..24,
        duplicate_rate in 0.0f64..0.5,
        max_batch in 1usize..9,
        shards in 1usize..4,
    ) {
        let scenario = Scenario::generate(seed, ScenarioSize { impressions, clicks, duplicate_rate }, "");
        let keyed = Arc::new(MemoryKeyedStream::new("keyed", shards, 1_795_169_800_000));
        let router = BatchRouter::new(keyed.clone(), MemoryDeadLetterSink::default(), config());
        let log = Arc::new(MemoryStateLog::default());
        let sink = Arc::new(MemoryRecordSink::default());
        let letters = Arc::new(MemoryDeadLetterSink::default());
        let joiner = KeyedJoiner::new(log.clone(), keyed.ranges(), sink.clone(), letters.clone(), config());
        let twin = KeyedJoiner::new(log.clone(), keyed.ranges(), sink.clone(), letters.clone(), config());
        runtime().block_on(run_keyed(&router, &keyed, &joiner, &twin, &scenario, seed, max_batch, Disturbance::default(), 100_000)).unwrap();
        // Undisturbed, not even a flagged repeat.
        prop_assert_eq!(decode_joined(&sink.records()), scenario.reference_join(&joiner.config.rules));
        check_exactly_once(&sink.records(), &scenario, &joiner.config.rules).map_err(TestCaseError::fail)?;
        prop_assert!(letters.letters().is_empty());
        prop_assert!(router.dead_letters.letters().is_empty());
    }

    #[test]
    fn restarts_duplicate_invocations_throttles_and_partial_puts_lose_and_duplicate_nothing(
        seed in any::<u64>(),
        impressions in 1usize..12,
        clicks in 1usize..20,
        max_batch in 1usize..9,
        shards in 1usize..4,
        fault_rate in 0.05f64..0.4,
        restart in 0.0f64..0.3,
        duplicate in 0.0f64..0.3,
        switch in 0.0f64..0.5,
    ) {
        let scenario = Scenario::generate(seed, ScenarioSize { impressions, clicks, duplicate_rate: 0.2 }, "");
        let keyed = Arc::new(MemoryKeyedStream::new("keyed", shards, 1_795_169_800_000));
        let router = BatchRouter::new(
            FaultySink { inner: keyed.clone(), plan: FaultPlan::new(seed ^ 4, fault_rate, 40) },
            FaultyDeadLetters { inner: MemoryDeadLetterSink::default(), plan: FaultPlan::new(seed ^ 5, fault_rate, 40) },
            config(),
        );
        let log = Arc::new(FaultyLog { inner: MemoryStateLog::default(), plan: FaultPlan::new(seed ^ 1, fault_rate, 40) });
        let sink = Arc::new(FaultySink { inner: MemoryRecordSink::default(), plan: FaultPlan::new(seed ^ 2, fault_rate, 40) });
        let letters = Arc::new(FaultyDeadLetters { inner: MemoryDeadLetterSink::default(), plan: FaultPlan::new(seed ^ 3, fault_rate, 40) });
        let joiner = KeyedJoiner::new(log.clone(), keyed.ranges(), sink.clone(), letters.clone(), config());
        let twin = KeyedJoiner::new(log.clone(), keyed.ranges(), sink.clone(), letters.clone(), config());
        let disturb = Disturbance { restart, duplicate, switch };
        runtime().block_on(run_keyed(&router, &keyed, &joiner, &twin, &scenario, seed, max_batch, disturb, 100_000)).unwrap();
        check_exactly_once(&sink.inner.records(), &scenario, &joiner.config.rules).map_err(TestCaseError::fail)?;
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(100))]

    /// Environments switching shards (no faults) cost no repeat at all: the acknowledgement
    /// tells a writer that catches up that the outputs are already on the stream.
    #[test]
    fn switching_environments_repeat_no_output(
        seed in any::<u64>(),
        impressions in 1usize..14,
        clicks in 0usize..24,
        max_batch in 1usize..9,
        shards in 1usize..4,
        switch in 0.0f64..0.8,
    ) {
        let scenario = Scenario::generate(seed, ScenarioSize { impressions, clicks, duplicate_rate: 0.2 }, "");
        let keyed = Arc::new(MemoryKeyedStream::new("keyed", shards, 1_795_169_800_000));
        let router = BatchRouter::new(keyed.clone(), MemoryDeadLetterSink::default(), config());
        let log = Arc::new(MemoryStateLog::default());
        let sink = Arc::new(MemoryRecordSink::default());
        let letters = Arc::new(MemoryDeadLetterSink::default());
        let joiner = KeyedJoiner::new(log.clone(), keyed.ranges(), sink.clone(), letters.clone(), config());
        let twin = KeyedJoiner::new(log.clone(), keyed.ranges(), sink.clone(), letters.clone(), config());
        let disturb = Disturbance { switch, ..Disturbance::default() };
        runtime().block_on(run_keyed(&router, &keyed, &joiner, &twin, &scenario, seed, max_batch, disturb, 100_000)).unwrap();
        prop_assert_eq!(decode_joined(&sink.records()), scenario.reference_join(&joiner.config.rules));
        let forwarded = adpipe_core::testkit::decode_stream(&sink.records()).iter().filter(|r| matches!(r, adpipe_core::model::JoinedStreamRecord::Impression(_))).count();
        prop_assert_eq!(forwarded, scenario.impressions.len());
    }
}

/// A case the property once found: with faults, restarts and environment switches on three
/// keyed shards, an impression was never forwarded.
#[test]
fn regression_an_impression_forwarded_under_faults_restarts_and_switches() {
    let (seed, impressions, clicks, max_batch, shards) = (18187825947921813051u64, 10, 7, 6, 3);
    let (fault_rate, restart, duplicate, switch) = (
        0.14488615855095144,
        0.11463829700749352,
        0.0,
        0.27080387626758773,
    );
    let scenario = Scenario::generate(
        seed,
        ScenarioSize {
            impressions,
            clicks,
            duplicate_rate: 0.2,
        },
        "",
    );
    let keyed = Arc::new(MemoryKeyedStream::new("keyed", shards, 1_795_169_800_000));
    let router = BatchRouter::new(
        FaultySink {
            inner: keyed.clone(),
            plan: FaultPlan::new(seed ^ 4, fault_rate, 40),
        },
        FaultyDeadLetters {
            inner: MemoryDeadLetterSink::default(),
            plan: FaultPlan::new(seed ^ 5, fault_rate, 40),
        },
        config(),
    );
    let log = Arc::new(FaultyLog {
        inner: MemoryStateLog::default(),
        plan: FaultPlan::new(seed ^ 1, fault_rate, 40),
    });
    let sink = Arc::new(FaultySink {
        inner: MemoryRecordSink::default(),
        plan: FaultPlan::new(seed ^ 2, fault_rate, 40),
    });
    let letters = Arc::new(FaultyDeadLetters {
        inner: MemoryDeadLetterSink::default(),
        plan: FaultPlan::new(seed ^ 3, fault_rate, 40),
    });
    let joiner = KeyedJoiner::new(
        log.clone(),
        keyed.ranges(),
        sink.clone(),
        letters.clone(),
        config(),
    );
    let twin = KeyedJoiner::new(
        log.clone(),
        keyed.ranges(),
        sink.clone(),
        letters.clone(),
        config(),
    );
    let disturb = Disturbance {
        restart,
        duplicate,
        switch,
    };
    runtime()
        .block_on(run_keyed(
            &router, &keyed, &joiner, &twin, &scenario, seed, max_batch, disturb, 100_000,
        ))
        .unwrap();
    check_exactly_once(&sink.inner.records(), &scenario, &joiner.config.rules).unwrap();
}
