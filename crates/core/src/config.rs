//! The joiner's configuration: documented environment variables, read once at start-up.
//! `template.yaml` and the local tooling set exactly these names (a test checks it).

use std::time::Duration;

use crate::join::emit::RetryPolicy;
use crate::join::rule::JoinRules;

/// Source stream of impressions (name or ARN). Records are told apart by their source stream.
pub const IMPRESSIONS_STREAM_NAME: &str = "IMPRESSIONS_STREAM_NAME";
/// Source stream of clicks (name or ARN).
pub const CLICKS_STREAM_NAME: &str = "CLICKS_STREAM_NAME";
/// Output stream of joined records (name or ARN).
pub const JOINED_STREAM_NAME: &str = "JOINED_STREAM_NAME";
/// The keyed stream (name or ARN): both input streams re-keyed by impression id's bucket by the
/// router, read by the joiner. Default `<joined stream>` with `-joined` replaced by `-keyed`.
pub const KEYED_STREAM_NAME: &str = "KEYED_STREAM_NAME";
/// How long a delivered event is remembered so a repeat is recognised, in hours. An event
/// older than this (less the allowed clock lead) is dead-lettered `past_dedup_horizon`, never
/// emitted as new. Stream retention and maximum record age must stay within it. Default 48.
pub const DEDUP_HORIZON_HOURS: &str = "DEDUP_HORIZON_HOURS";
/// DynamoDB table of the keyed joiner's state log (key `pk` S + `sk` N, TTL on `ttl`).
pub const STATE_LOG_TABLE_NAME: &str = "STATE_LOG_TABLE_NAME";
/// S3 bucket for dead-letter and late-pair entries.
pub const DEAD_LETTER_BUCKET: &str = "DEAD_LETTER_BUCKET";
/// Key prefix of dead-letter entries. Default `dead-letter/`.
pub const DEAD_LETTER_PREFIX: &str = "DEAD_LETTER_PREFIX";
/// Key prefix of late-pair entries. Default `late/`.
pub const LATE_PREFIX: &str = "LATE_PREFIX";
/// Join window in milliseconds, both ends inclusive. Default 30000.
pub const JOIN_WINDOW_MS: &str = "JOIN_WINDOW_MS";
/// How long one side waits for its partner, in seconds. Default 86400.
pub const STATE_RETENTION_SECONDS: &str = "STATE_RETENTION_SECONDS";
/// How long the keyed joiner keeps an entry in memory after its latest arrival, in seconds
/// (the warm window); older entries live in cold pages in the log table, read by bucket and
/// event time when a late event needs them. Memory holds about this many seconds of a shard's
/// events. It must be longer than the allowed event-time lead plus the join window, or
/// on-time events would need the pages too. Default: that plus 600 (4230 with the defaults).
pub const WARM_WINDOW_SECONDS: &str = "WARM_WINDOW_SECONDS";
/// The keyed joiner environment's memory budget, in impression ids. Lambda does not pin a shard
/// to an environment, so one environment may come to hold the memories of several shards;
/// when they pass the budget, the memories of the shards not being processed are dropped (a
/// later batch of theirs rebuilds from the log). Default: [`ENTRIES_PER_MB`] per MB of
/// `AWS_LAMBDA_FUNCTION_MEMORY_SIZE` (set by Lambda), no bound where that is unset. One
/// shard's own memory is its warm window, which `JoinerMemorySize` must hold.
pub const MAX_ENTRIES_IN_MEMORY: &str = "MAX_ENTRIES_IN_MEMORY";
/// Lambda sets this to the function's memory in MB.
pub const AWS_LAMBDA_FUNCTION_MEMORY_SIZE: &str = "AWS_LAMBDA_FUNCTION_MEMORY_SIZE";
/// Entries the memory budget allows per MB of function memory. An entry with its indexes was
/// measured at about 0.8 KiB (BENCHMARKS.md, "Memory per entry"), so the budget is about a
/// third of the function's memory, leaving room for a batch, its outputs and the runtime.
pub const ENTRIES_PER_MB: usize = 400;
/// How long a state log item is kept past the deduplication horizon before DynamoDB's TTL
/// may delete it, in seconds. Default 86400.
pub const STATE_TTL_GRACE_SECONDS: &str = "STATE_TTL_GRACE_SECONDS";
/// Concurrent DynamoDB / S3 requests per invocation. Default 32.
pub const MAX_IN_FLIGHT: &str = "MAX_IN_FLIGHT";
/// Attempts per output entry on partial `PutRecords` failures. Default 5.
pub const EMIT_MAX_ATTEMPTS: &str = "EMIT_MAX_ATTEMPTS";
/// CloudWatch namespace of the EMF metrics. Default `adpipe`.
pub const METRICS_NAMESPACE: &str = "METRICS_NAMESPACE";
/// Earliest accepted event time, RFC 3339. Older records are dead-lettered
/// (`event_time_too_early`). Default `2020-01-01T00:00:00Z`; lower it to backfill older data.
pub const EARLIEST_EVENT_TIME: &str = "EARLIEST_EVENT_TIME";
/// How far an event time may be ahead of its record's arrival on the stream, in seconds; more
/// is a broken producer clock (`event_time_in_future`). Default 3600.
pub const MAX_EVENT_TIME_AHEAD_SECONDS: &str = "MAX_EVENT_TIME_AHEAD_SECONDS";

/// The environment as the `from_lookup` constructors read it: one set of parsers, so every
/// variable has the same error for the same mistake whichever function reads it.
struct Env<F>(F);

impl<F: Fn(&str) -> Option<String>> Env<F> {
    /// The value, if set and not blank.
    fn non_blank(&self, name: &str) -> Option<String> {
        (self.0)(name).filter(|v| !v.trim().is_empty())
    }

    /// A setting without a default: missing or blank is [`ConfigError::Missing`].
    fn required(&self, name: &'static str) -> Result<String, ConfigError> {
        self.non_blank(name).ok_or(ConfigError::Missing(name))
    }

    /// A text setting, `default` when unset.
    fn text(&self, name: &str, default: &str) -> String {
        (self.0)(name).unwrap_or_else(|| default.to_owned())
    }

    /// A whole number above zero, `None` when unset.
    fn positive_opt<T>(&self, name: &'static str) -> Result<Option<T>, ConfigError>
    where
        T: std::str::FromStr + PartialOrd + Default,
    {
        let Some(v) = (self.0)(name) else {
            return Ok(None);
        };
        match v.trim().parse::<T>() {
            Ok(n) if n > T::default() => Ok(Some(n)),
            _ => Err(ConfigError::Invalid {
                name,
                value: v,
                why: "expected a positive whole number",
            }),
        }
    }

    /// A whole number above zero, `default` when unset.
    fn positive<T>(&self, name: &'static str, default: T) -> Result<T, ConfigError>
    where
        T: std::str::FromStr + PartialOrd + Default,
    {
        Ok(self.positive_opt(name)?.unwrap_or(default))
    }

    /// A finite number, zero or more, `default` when unset.
    fn non_negative(&self, name: &'static str, default: f64) -> Result<f64, ConfigError> {
        let Some(v) = (self.0)(name) else {
            return Ok(default);
        };
        match v.trim().parse::<f64>() {
            Ok(n) if n.is_finite() && n >= 0.0 => Ok(n),
            _ => Err(ConfigError::Invalid {
                name,
                value: v,
                why: "expected a non-negative number",
            }),
        }
    }

    /// Reads [`EARLIEST_EVENT_TIME`] and [`MAX_EVENT_TIME_AHEAD_SECONDS`].
    fn time_bounds(&self) -> Result<crate::validate::TimeBounds, ConfigError> {
        let mut bounds = crate::validate::TimeBounds::default();
        if let Some(v) = (self.0)(EARLIEST_EVENT_TIME) {
            bounds.earliest_ms =
                crate::time::parse_event_time(v.trim()).map_err(|_| ConfigError::Invalid {
                    name: EARLIEST_EVENT_TIME,
                    value: v.clone(),
                    why: "expected an RFC 3339 time with an offset, such as 2020-01-01T00:00:00Z",
                })?;
        }
        if let Some(v) = (self.0)(MAX_EVENT_TIME_AHEAD_SECONDS) {
            bounds.max_ahead_ms = match v.trim().parse::<i64>() {
                Ok(n) if n > 0 && n <= 31_536_000 => n * 1000,
                _ => {
                    return Err(ConfigError::Invalid {
                        name: MAX_EVENT_TIME_AHEAD_SECONDS,
                        value: v,
                        why: "expected a whole number of seconds from 1 to 31536000",
                    })
                }
            };
        }
        Ok(bounds)
    }
}

/// Every variable the joiner reads.
pub const JOINER_ENV: &[&str] = &[
    IMPRESSIONS_STREAM_NAME,
    CLICKS_STREAM_NAME,
    JOINED_STREAM_NAME,
    KEYED_STREAM_NAME,
    DEDUP_HORIZON_HOURS,
    STATE_LOG_TABLE_NAME,
    DEAD_LETTER_BUCKET,
    DEAD_LETTER_PREFIX,
    LATE_PREFIX,
    JOIN_WINDOW_MS,
    STATE_RETENTION_SECONDS,
    WARM_WINDOW_SECONDS,
    STATE_TTL_GRACE_SECONDS,
    MAX_IN_FLIGHT,
    EMIT_MAX_ATTEMPTS,
    METRICS_NAMESPACE,
    EARLIEST_EVENT_TIME,
    MAX_EVENT_TIME_AHEAD_SECONDS,
];

/// Variables the joiner reads that the template leaves unset: Lambda sets the memory size, and
/// the memory budget is an override for tests and tuning.
pub const JOINER_ENV_NOT_SET_BY_TEMPLATE: &[&str] =
    &[MAX_ENTRIES_IN_MEMORY, AWS_LAMBDA_FUNCTION_MEMORY_SIZE];

/// A missing or malformed setting.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("environment variable {0} is required")]
    Missing(&'static str),
    #[error("environment variable {name} = {value:?} is not valid: {why}")]
    Invalid {
        name: &'static str,
        value: String,
        why: &'static str,
    },
}

/// The joiner's settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JoinerConfig {
    pub impressions_stream: String,
    pub clicks_stream: String,
    pub joined_stream: String,
    pub keyed_stream: String,
    /// See [`DEDUP_HORIZON_HOURS`].
    pub dedup_horizon_ms: i64,
    /// See [`WARM_WINDOW_SECONDS`].
    pub warm_window_ms: i64,
    /// See [`MAX_ENTRIES_IN_MEMORY`]; `usize::MAX`: no bound.
    pub max_entries: usize,
    pub state_log_table: String,
    pub dead_letter_bucket: String,
    pub dead_letter_prefix: String,
    pub late_prefix: String,
    pub rules: JoinRules,
    pub ttl_grace_ms: i64,
    pub max_in_flight: usize,
    pub emit_retry: RetryPolicy,
    pub metrics_namespace: String,
    pub time_bounds: crate::validate::TimeBounds,
}

impl JoinerConfig {
    /// Reads the configuration through `lookup` (the process environment in production).
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let env = Env(lookup);
        let joined_stream = stream_name(&env.required(JOINED_STREAM_NAME)?).to_owned();
        let keyed_stream = match env.non_blank(KEYED_STREAM_NAME) {
            Some(v) => stream_name(&v).to_owned(),
            None => match joined_stream.strip_suffix("-joined") {
                Some(base) => format!("{base}-keyed"),
                None => format!("{joined_stream}-keyed"),
            },
        };
        let retention_ms = env.positive(STATE_RETENTION_SECONDS, 86_400i64)? * 1000;
        let dedup_horizon_ms = env.positive(DEDUP_HORIZON_HOURS, 48i64)? * 3_600_000;
        let bounds = env.time_bounds()?;
        if dedup_horizon_ms < retention_ms + bounds.max_ahead_ms {
            return Err(ConfigError::Invalid {
                name: DEDUP_HORIZON_HOURS,
                value: (dedup_horizon_ms / 3_600_000).to_string(),
                why: "the deduplication horizon must cover the state retention plus the allowed event-time lead",
            });
        }
        let window_ms = env.positive(JOIN_WINDOW_MS, 30_000i64)?;
        let warm_window_ms = warm_window_ms(&env, bounds.max_ahead_ms + window_ms)?;
        let max_entries = max_entries(&env)?;
        Ok(JoinerConfig {
            impressions_stream: stream_name(&env.required(IMPRESSIONS_STREAM_NAME)?).to_owned(),
            clicks_stream: stream_name(&env.required(CLICKS_STREAM_NAME)?).to_owned(),
            joined_stream,
            keyed_stream,
            dedup_horizon_ms,
            warm_window_ms,
            max_entries,
            state_log_table: env.required(STATE_LOG_TABLE_NAME)?,
            dead_letter_bucket: env.required(DEAD_LETTER_BUCKET)?,
            dead_letter_prefix: env.text(DEAD_LETTER_PREFIX, "dead-letter/"),
            late_prefix: env.text(LATE_PREFIX, "late/"),
            rules: JoinRules {
                window_ms,
                retention_ms,
            },
            ttl_grace_ms: env.positive(STATE_TTL_GRACE_SECONDS, 86_400i64)? * 1000,
            max_in_flight: env.positive(MAX_IN_FLIGHT, 32i64)? as usize,
            emit_retry: RetryPolicy {
                max_attempts: env.positive(EMIT_MAX_ATTEMPTS, 5i64)? as u32,
                base_delay: Duration::from_millis(50),
                max_delay: Duration::from_secs(2),
            },
            metrics_namespace: env.text(METRICS_NAMESPACE, "adpipe"),
            time_bounds: bounds,
        })
    }
}

/// [`WARM_WINDOW_SECONDS`] in ms. An on-time event's partners and repeats arrived at most
/// `reach_ms` (the allowed lead plus the join window) before it: a warm window longer than
/// that serves every on-time event from memory, and the default adds ten minutes for events
/// a little late.
fn warm_window_ms<F: Fn(&str) -> Option<String>>(
    env: &Env<F>,
    reach_ms: i64,
) -> Result<i64, ConfigError> {
    let warm_window_ms = match env.positive_opt::<i64>(WARM_WINDOW_SECONDS)? {
        None => reach_ms + 600_000,
        Some(seconds) => seconds * 1000,
    };
    if warm_window_ms <= reach_ms {
        return Err(ConfigError::Invalid {
            name: WARM_WINDOW_SECONDS,
            value: (warm_window_ms / 1000).to_string(),
            why: "the warm window must be longer than the allowed event-time lead plus the join window",
        });
    }
    Ok(warm_window_ms)
}

/// [`MAX_ENTRIES_IN_MEMORY`], else [`ENTRIES_PER_MB`] per MB of
/// [`AWS_LAMBDA_FUNCTION_MEMORY_SIZE`], else no bound.
fn max_entries<F: Fn(&str) -> Option<String>>(env: &Env<F>) -> Result<usize, ConfigError> {
    if let Some(n) = env.positive_opt::<i64>(MAX_ENTRIES_IN_MEMORY)? {
        return Ok(n as usize);
    }
    Ok(
        match env.positive_opt::<i64>(AWS_LAMBDA_FUNCTION_MEMORY_SIZE)? {
            Some(mb) => mb as usize * ENTRIES_PER_MB,
            None => usize::MAX,
        },
    )
}

/// The stream name of a name or a stream ARN (`arn:aws:kinesis:REGION:ACCOUNT:stream/NAME`).
pub fn stream_name(name_or_arn: &str) -> &str {
    match name_or_arn.rsplit_once(":stream/") {
        Some((_, name)) => name,
        None => name_or_arn,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| map.get(k).cloned()
    }

    const REQUIRED: &[(&str, &str)] = &[
        (
            IMPRESSIONS_STREAM_NAME,
            "arn:aws:kinesis:us-east-1:123456789012:stream/imps",
        ),
        (CLICKS_STREAM_NAME, "clicks"),
        (JOINED_STREAM_NAME, "joined"),
        (STATE_LOG_TABLE_NAME, "state-log"),
        (DEAD_LETTER_BUCKET, "bucket"),
    ];

    #[test]
    fn defaults_apply_and_arns_become_names() {
        let c = JoinerConfig::from_lookup(env(REQUIRED)).unwrap();
        assert_eq!(c.impressions_stream, "imps");
        assert_eq!(c.rules, JoinRules::default());
        assert_eq!(c.max_in_flight, 32);
        assert_eq!(c.dead_letter_prefix, "dead-letter/");
        assert_eq!(c.time_bounds, crate::validate::TimeBounds::default());
    }

    #[test]
    fn event_time_bounds_are_read_and_checked() {
        let mut pairs = REQUIRED.to_vec();
        pairs.push((EARLIEST_EVENT_TIME, "2001-01-01T00:00:00Z"));
        pairs.push((MAX_EVENT_TIME_AHEAD_SECONDS, "600"));
        let c = JoinerConfig::from_lookup(env(&pairs)).unwrap();
        assert_eq!(c.time_bounds.earliest_ms, 978_307_200_000);
        assert_eq!(c.time_bounds.max_ahead_ms, 600_000);
        for (name, bad) in [
            (EARLIEST_EVENT_TIME, "2001-01-01"),
            (MAX_EVENT_TIME_AHEAD_SECONDS, "0"),
        ] {
            let mut pairs = REQUIRED.to_vec();
            pairs.push((name, bad));
            assert!(matches!(
                JoinerConfig::from_lookup(env(&pairs)).unwrap_err(),
                ConfigError::Invalid { name: n, .. } if n == name
            ));
        }
    }

    #[test]
    fn missing_and_invalid_values_are_named() {
        assert_eq!(
            JoinerConfig::from_lookup(env(&REQUIRED[1..])).unwrap_err(),
            ConfigError::Missing(IMPRESSIONS_STREAM_NAME)
        );
        let mut pairs = REQUIRED.to_vec();
        pairs.push((JOIN_WINDOW_MS, "-5"));
        assert!(matches!(
            JoinerConfig::from_lookup(env(&pairs)).unwrap_err(),
            ConfigError::Invalid {
                name: JOIN_WINDOW_MS,
                ..
            }
        ));
    }
}

/// Enricher: S3 bucket of the lake.
pub const LAKE_BUCKET: &str = "LAKE_BUCKET";
/// Enricher: key prefix of the Iceberg warehouse in the bucket. Default `lake/`.
pub const LAKE_PREFIX: &str = "LAKE_PREFIX";
/// Enricher: Glue database of the lake tables.
pub const GLUE_DATABASE: &str = "GLUE_DATABASE";
/// Enricher: table of enriched clicks. Default `enriched_clicks`.
pub const CLICKS_TABLE: &str = "CLICKS_TABLE";
/// Enricher: table of impressions. Default `impressions`.
pub const IMPRESSIONS_TABLE: &str = "IMPRESSIONS_TABLE";
/// Enricher: DynamoDB table holding the per-table commit lease (hash key `pk`, TTL `ttl`).
pub const COMMIT_LEASE_TABLE: &str = "COMMIT_LEASE_TABLE";
/// Enricher: `is_premium_ad` is `Yes` above this bid. Default 50.
pub const PREMIUM_BID_THRESHOLD: &str = "PREMIUM_BID_THRESHOLD";
/// Enricher: `click_revenue = click_price × this`. Default 1.2.
pub const CLICK_REVENUE_FACTOR: &str = "CLICK_REVENUE_FACTOR";
/// Enricher: distinct event days one batch may land (each is a partition, so a file per
/// table); records of further days are dead-lettered (`too_many_days_in_batch`).
/// Default 31.
pub const MAX_DAYS_PER_BATCH: &str = "MAX_DAYS_PER_BATCH";

/// Lake: how long the tables keep snapshots, in hours (`history.expire.max-snapshot-age-ms`).
/// Default 1.
pub const SNAPSHOT_RETENTION_HOURS: &str = "SNAPSHOT_RETENTION_HOURS";
/// Lake: how long the streams keep records, in hours (the template's `StreamRetentionHours`).
/// With the next, it sets how long the commit ledger remembers a shard. Default 24.
pub const STREAM_RETENTION_HOURS: &str = "STREAM_RETENTION_HOURS";
/// Lake: the oldest record Lambda still delivers, in seconds (the template's
/// `MaximumRecordAgeSeconds`). Default 3600.
pub const MAXIMUM_RECORD_AGE_SECONDS: &str = "MAXIMUM_RECORD_AGE_SECONDS";

/// Every variable the enricher reads.
pub const ENRICHER_ENV: &[&str] = &[
    JOINED_STREAM_NAME,
    LAKE_BUCKET,
    LAKE_PREFIX,
    GLUE_DATABASE,
    CLICKS_TABLE,
    IMPRESSIONS_TABLE,
    COMMIT_LEASE_TABLE,
    DEAD_LETTER_BUCKET,
    DEAD_LETTER_PREFIX,
    PREMIUM_BID_THRESHOLD,
    CLICK_REVENUE_FACTOR,
    METRICS_NAMESPACE,
    EARLIEST_EVENT_TIME,
    MAX_EVENT_TIME_AHEAD_SECONDS,
    MAX_DAYS_PER_BATCH,
    SNAPSHOT_RETENTION_HOURS,
    STREAM_RETENTION_HOURS,
    MAXIMUM_RECORD_AGE_SECONDS,
];

/// The enricher's settings.
#[derive(Debug, Clone, PartialEq)]
pub struct EnricherConfig {
    pub joined_stream: String,
    pub lake_bucket: String,
    pub lake_prefix: String,
    pub database: String,
    pub clicks_table: String,
    pub impressions_table: String,
    pub commit_lease_table: String,
    pub dead_letter_bucket: String,
    pub dead_letter_prefix: String,
    pub rules: crate::enrich::EnrichRules,
    pub metrics_namespace: String,
    pub time_bounds: crate::validate::TimeBounds,
    pub max_days_per_batch: usize,
    /// [`TablesConfig::snapshot_max_age_ms`].
    pub snapshot_max_age_ms: i64,
    /// [`TablesConfig::ledger_horizon_ms`].
    pub ledger_horizon_ms: i64,
}

impl EnricherConfig {
    /// Reads the configuration through `lookup` (the process environment in production).
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let env = Env(lookup);
        let joined_stream = stream_name(&env.required(JOINED_STREAM_NAME)?).to_owned();
        let lake = TablesConfig::from_lookup(&env.0)?;
        Ok(EnricherConfig {
            joined_stream,
            lake_bucket: lake.lake_bucket,
            lake_prefix: lake.lake_prefix,
            database: lake.database,
            clicks_table: lake.clicks_table,
            impressions_table: lake.impressions_table,
            commit_lease_table: lake.commit_lease_table,
            snapshot_max_age_ms: lake.snapshot_max_age_ms,
            ledger_horizon_ms: lake.ledger_horizon_ms,
            dead_letter_bucket: env.required(DEAD_LETTER_BUCKET)?,
            dead_letter_prefix: env.text(DEAD_LETTER_PREFIX, "dead-letter/"),
            rules: crate::enrich::EnrichRules {
                premium_bid_threshold: env.non_negative(PREMIUM_BID_THRESHOLD, 50.0)?,
                click_revenue_factor: env.non_negative(CLICK_REVENUE_FACTOR, 1.2)?,
            },
            metrics_namespace: env.text(METRICS_NAMESPACE, "adpipe"),
            time_bounds: env.time_bounds()?,
            max_days_per_batch: env.positive(MAX_DAYS_PER_BATCH, 31usize)?,
        })
    }

    /// `s3://bucket/prefix` of the Iceberg warehouse.
    pub fn warehouse(&self) -> String {
        self.tables().warehouse()
    }

    /// Where the lake's tables are: what the tables function is configured with too.
    pub fn tables(&self) -> TablesConfig {
        TablesConfig {
            lake_bucket: self.lake_bucket.clone(),
            lake_prefix: self.lake_prefix.clone(),
            database: self.database.clone(),
            clicks_table: self.clicks_table.clone(),
            impressions_table: self.impressions_table.clone(),
            commit_lease_table: self.commit_lease_table.clone(),
            snapshot_max_age_ms: self.snapshot_max_age_ms,
            ledger_horizon_ms: self.ledger_horizon_ms,
        }
    }
}

/// Every variable the tables function (the stack's `Custom::IcebergTables` resource) reads: the
/// enricher's names for the same things, so both open the same tables.
pub const TABLES_ENV: &[&str] = &[
    LAKE_BUCKET,
    LAKE_PREFIX,
    GLUE_DATABASE,
    CLICKS_TABLE,
    IMPRESSIONS_TABLE,
    COMMIT_LEASE_TABLE,
    SNAPSHOT_RETENTION_HOURS,
    STREAM_RETENTION_HOURS,
    MAXIMUM_RECORD_AGE_SECONDS,
];

/// What the tables function needs: where the lake is, its tables, and the commit lease a
/// schema migration takes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TablesConfig {
    pub lake_bucket: String,
    pub lake_prefix: String,
    pub database: String,
    pub clicks_table: String,
    pub impressions_table: String,
    pub commit_lease_table: String,
    /// Snapshots younger than this stay in the tables (milliseconds).
    pub snapshot_max_age_ms: i64,
    /// How long after a shard's last commit a redelivery of its records can still arrive, so
    /// the commit ledger must remember it (milliseconds): the stream's retention plus the
    /// oldest record Lambda delivers.
    pub ledger_horizon_ms: i64,
}

impl TablesConfig {
    /// Reads [`TABLES_ENV`] through `lookup`, with the enricher's defaults.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let env = Env(lookup);
        Ok(TablesConfig {
            lake_bucket: env.required(LAKE_BUCKET)?,
            lake_prefix: env.text(LAKE_PREFIX, "lake/"),
            database: env.required(GLUE_DATABASE)?,
            clicks_table: env.text(CLICKS_TABLE, crate::lake::CLICKS_TABLE),
            impressions_table: env.text(IMPRESSIONS_TABLE, crate::lake::IMPRESSIONS_TABLE),
            commit_lease_table: env.required(COMMIT_LEASE_TABLE)?,
            snapshot_max_age_ms: env.positive(SNAPSHOT_RETENTION_HOURS, 1i64)? * 3_600_000,
            ledger_horizon_ms: env.positive(STREAM_RETENTION_HOURS, 24i64)? * 3_600_000
                + env.positive(MAXIMUM_RECORD_AGE_SECONDS, 3_600i64)? * 1_000,
        })
    }

    /// `s3://bucket/prefix` of the Iceberg warehouse, as [`EnricherConfig::warehouse`].
    pub fn warehouse(&self) -> String {
        format!(
            "s3://{}/{}",
            self.lake_bucket,
            self.lake_prefix.trim_matches('/')
        )
    }
}

#[cfg(test)]
mod warm_window_tests {
    use super::*;

    fn with(vars: &[(&str, &str)]) -> Result<JoinerConfig, ConfigError> {
        JoinerConfig::from_lookup(|k| {
            let base = [
                (IMPRESSIONS_STREAM_NAME, "i"),
                (CLICKS_STREAM_NAME, "c"),
                (JOINED_STREAM_NAME, "j"),
                (STATE_LOG_TABLE_NAME, "t"),
                (DEAD_LETTER_BUCKET, "b"),
            ];
            vars.iter()
                .chain(base.iter())
                .find(|(name, _)| *name == k)
                .map(|(_, v)| (*v).to_owned())
        })
    }

    #[test]
    fn the_warm_window_defaults_past_the_clock_lead_and_refuses_less() {
        assert_eq!(with(&[]).unwrap().warm_window_ms, 4_230_000);
        assert_eq!(
            with(&[(MAX_EVENT_TIME_AHEAD_SECONDS, "60")])
                .unwrap()
                .warm_window_ms,
            690_000
        );
        assert_eq!(
            with(&[(WARM_WINDOW_SECONDS, "7200")])
                .unwrap()
                .warm_window_ms,
            7_200_000
        );
        assert!(matches!(
            with(&[(WARM_WINDOW_SECONDS, "3630")]),
            Err(ConfigError::Invalid {
                name: WARM_WINDOW_SECONDS,
                ..
            })
        ));
    }

    /// The lists the deploy contract and `adpipe env` are checked against are what the
    /// configurations read: a variable read but not listed would be missing from every
    /// environment file.
    #[test]
    fn the_listed_variables_are_exactly_those_read() {
        use std::collections::BTreeSet;
        use std::sync::Mutex;
        fn read(build: impl Fn(&dyn Fn(&str) -> Option<String>)) -> BTreeSet<String> {
            let asked = Mutex::new(BTreeSet::new());
            build(&|k: &str| {
                asked.lock().unwrap().insert(k.to_owned());
                // The required names only; every other setting keeps its default, so no
                // lookup stops early on a value out of range.
                let required = k.ends_with("_NAME")
                    || k.ends_with("BUCKET")
                    || k.ends_with("_TABLE")
                    || k == GLUE_DATABASE;
                required.then(|| "x".to_owned())
            });
            asked.into_inner().unwrap()
        }
        let joiner = read(|l| {
            let _ = JoinerConfig::from_lookup(l);
        });
        let listed: BTreeSet<String> = JOINER_ENV
            .iter()
            .chain(JOINER_ENV_NOT_SET_BY_TEMPLATE)
            .map(|s| s.to_string())
            .collect();
        assert_eq!(joiner, listed);
        let enricher = read(|l| {
            let _ = EnricherConfig::from_lookup(l);
        });
        let listed: BTreeSet<String> = ENRICHER_ENV.iter().map(|s| s.to_string()).collect();
        assert_eq!(enricher, listed);
    }

    #[test]
    fn the_memory_budget_follows_the_function_memory_unless_set() {
        assert_eq!(with(&[]).unwrap().max_entries, usize::MAX);
        assert_eq!(
            with(&[(AWS_LAMBDA_FUNCTION_MEMORY_SIZE, "512")])
                .unwrap()
                .max_entries,
            512 * ENTRIES_PER_MB
        );
        assert_eq!(
            with(&[
                (AWS_LAMBDA_FUNCTION_MEMORY_SIZE, "512"),
                (MAX_ENTRIES_IN_MEMORY, "1000")
            ])
            .unwrap()
            .max_entries,
            1000
        );
        assert!(with(&[(MAX_ENTRIES_IN_MEMORY, "0")]).is_err());
    }
}
