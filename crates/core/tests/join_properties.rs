//! Property: whatever the interleaving, redeliveries and injected faults, the joiner emits
//! exactly the pairs of a plain nested-loop join, each once, with the right content.

use adpipe_core::batch::BatchJoiner;
use adpipe_core::config::JoinerConfig;
use adpipe_core::memory::{InMemoryJoinState, MemoryDeadLetterSink, MemoryRecordSink};
use adpipe_core::testkit::{
    check_forwarded_impressions, decode_joined, run_to_completion, FaultPlan, FaultyDeadLetters,
    FaultySink, FaultyState, Scenario, ScenarioSize,
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
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn any_interleaving_and_redelivery_gives_the_reference_join(
        seed in any::<u64>(),
        impressions in 0usize..14,
        clicks in 0usize..24,
        duplicate_rate in 0.0f64..0.5,
        max_batch in 1usize..9,
    ) {
        let scenario = Scenario::generate(seed, ScenarioSize { impressions, clicks, duplicate_rate }, "");
        let joiner = BatchJoiner::new(
            InMemoryJoinState::default(),
            MemoryRecordSink::default(),
            MemoryDeadLetterSink::default(),
            config(),
        );
        runtime().block_on(run_to_completion(&joiner, &scenario, seed, max_batch, 10_000)).unwrap();
        let emitted = decode_joined(&joiner.sink.records());
        prop_assert_eq!(emitted, scenario.reference_join(&joiner.config.rules));
        check_forwarded_impressions(&joiner.sink.records(), &scenario).map_err(TestCaseError::fail)?;
        prop_assert!(joiner.dead_letters.letters().is_empty());
    }

    #[test]
    fn throttles_lost_responses_and_partial_put_failures_lose_and_duplicate_nothing(
        seed in any::<u64>(),
        impressions in 1usize..12,
        clicks in 1usize..20,
        max_batch in 1usize..9,
        fault_rate in 0.05f64..0.4,
    ) {
        let scenario = Scenario::generate(seed, ScenarioSize { impressions, clicks, duplicate_rate: 0.2 }, "");
        let joiner = BatchJoiner::new(
            FaultyState { inner: InMemoryJoinState::default(), plan: FaultPlan::new(seed ^ 1, fault_rate, 40) },
            FaultySink { inner: MemoryRecordSink::default(), plan: FaultPlan::new(seed ^ 2, fault_rate, 40) },
            FaultyDeadLetters { inner: MemoryDeadLetterSink::default(), plan: FaultPlan::new(seed ^ 3, fault_rate, 40) },
            config(),
        );
        runtime().block_on(run_to_completion(&joiner, &scenario, seed, max_batch, 10_000)).unwrap();
        let emitted = decode_joined(&joiner.sink.inner.records());
        prop_assert_eq!(emitted, scenario.reference_join(&joiner.config.rules));
        check_forwarded_impressions(&joiner.sink.inner.records(), &scenario).map_err(TestCaseError::fail)?;
    }
}
