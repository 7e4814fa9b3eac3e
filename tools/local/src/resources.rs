//! The one place the local pipeline takes its resource names, event source mapping settings and
//! function environments from.
//!
//! `template.yaml` is the source of truth in the cloud; until its machine-readable resource/env
//! file is merged, [`Resources::local`] holds the same facts for the laptop. Everything else in
//! this crate (provisioning, the runner, `cargo lambda` env files) reads them from here, so
//! pointing the local tooling at the template's file means changing this module only.

use std::collections::BTreeMap;
use std::time::Duration;

use adpipe_core::config;

use crate::esm::{EsmSettings, StartingPosition, MAX_PAYLOAD_BYTES};

/// A Kinesis stream and its shard count.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamSpec {
    pub name: String,
    pub shards: i32,
}

/// A Lambda function as the runner sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FunctionSpec {
    /// Function name (and the binary name `cargo lambda` builds).
    pub name: String,
    /// The function's `Timeout`.
    pub timeout: Duration,
}

/// Every resource of the pipeline, and how the functions are wired to them.
#[derive(Debug, Clone, PartialEq)]
pub struct Resources {
    pub region: String,
    /// The account in ARNs (moto's default account).
    pub account: String,
    pub impressions_stream: StreamSpec,
    pub clicks_stream: StreamSpec,
    pub joined_stream: StreamSpec,
    /// Join state: hash key `pk` (S), TTL attribute `ttl`.
    pub state_table: String,
    /// The enricher's commit leases: hash key `pk` (S), TTL attribute `ttl`.
    pub commit_lease_table: String,
    pub lake_bucket: String,
    pub dead_letter_bucket: String,
    pub glue_database: String,
    /// The mappings' on-failure destination: `s3://<dead_letter_bucket>/<prefix>`.
    pub on_failure_prefix: String,
    pub joiner: FunctionSpec,
    pub enricher: FunctionSpec,
    /// Both joiner mappings (impressions stream, clicks stream).
    pub joiner_mapping: EsmSettings,
    /// The enricher's mapping (joined stream).
    pub enricher_mapping: EsmSettings,
}

/// Dummy credentials for the local endpoint (it accepts any).
pub const LOCAL_ACCESS_KEY_ID: &str = "test";
pub const LOCAL_SECRET_ACCESS_KEY: &str = "test";

impl Resources {
    /// The laptop's resources. The stream names match the `eventSourceARN`s in `events/`, so
    /// `cargo lambda invoke --data-file events/…` works against a provisioned endpoint.
    pub fn local() -> Self {
        Resources {
            region: "us-east-1".into(),
            account: "123456789012".into(),
            impressions_stream: StreamSpec {
                name: "adpipe-impressions".into(),
                shards: 2,
            },
            clicks_stream: StreamSpec {
                name: "adpipe-clicks".into(),
                shards: 2,
            },
            joined_stream: StreamSpec {
                name: "adpipe-joined".into(),
                shards: 2,
            },
            state_table: "adpipe-join-state".into(),
            commit_lease_table: "adpipe-commit-lease".into(),
            lake_bucket: "adpipe-lake".into(),
            dead_letter_bucket: "adpipe-dead-letters".into(),
            glue_database: "adpipe".into(),
            on_failure_prefix: "esm-failures/".into(),
            joiner: FunctionSpec {
                name: "joiner".into(),
                timeout: Duration::from_secs(60),
            },
            enricher: FunctionSpec {
                name: "enricher".into(),
                timeout: Duration::from_secs(120),
            },
            joiner_mapping: EsmSettings {
                batch_size: 500,
                batching_window: Duration::from_secs(1),
                max_retry_attempts: Some(10),
                bisect_on_error: true,
                report_batch_item_failures: true,
                starting_position: StartingPosition::TrimHorizon,
                function_timeout: Duration::from_secs(60),
                max_payload_bytes: MAX_PAYLOAD_BYTES,
                retry_delay: Duration::from_millis(200),
            },
            // Larger batches: every enricher batch is one Iceberg commit per table, and fewer,
            // larger files keep the table healthy (see docs/DESIGN.md, "Small files").
            enricher_mapping: EsmSettings {
                batch_size: 5_000,
                batching_window: Duration::from_secs(5),
                max_retry_attempts: Some(10),
                bisect_on_error: true,
                report_batch_item_failures: true,
                starting_position: StartingPosition::TrimHorizon,
                function_timeout: Duration::from_secs(120),
                max_payload_bytes: MAX_PAYLOAD_BYTES,
                retry_delay: Duration::from_millis(200),
            },
        }
    }

    /// The same resources with `tag` appended to every name, so several pipelines (tests) can
    /// share one endpoint. `tag` should be lowercase letters, digits and `-`.
    pub fn isolated(tag: &str) -> Self {
        let mut r = Resources::local();
        for s in [
            &mut r.impressions_stream,
            &mut r.clicks_stream,
            &mut r.joined_stream,
        ] {
            s.name = format!("{}-{tag}", s.name);
        }
        for name in [
            &mut r.state_table,
            &mut r.commit_lease_table,
            &mut r.lake_bucket,
            &mut r.dead_letter_bucket,
        ] {
            *name = format!("{name}-{tag}");
        }
        // Glue database names allow no `-`.
        r.glue_database = format!("{}_{}", r.glue_database, tag.replace('-', "_"));
        r
    }

    /// The ARN of one of the streams.
    pub fn stream_arn(&self, stream: &str) -> String {
        format!(
            "arn:aws:kinesis:{}:{}:stream/{stream}",
            self.region, self.account
        )
    }

    /// The ARN of a function.
    pub fn function_arn(&self, function: &FunctionSpec) -> String {
        format!(
            "arn:aws:lambda:{}:{}:function:{}",
            self.region, self.account, function.name
        )
    }

    /// The execution role's ARN (the events' `invokeIdentityArn`).
    pub fn role_arn(&self, function: &FunctionSpec) -> String {
        format!(
            "arn:aws:iam::{}:role/adpipe-{}",
            self.account, function.name
        )
    }

    /// The joiner's environment (`Environment.Variables` of the function). Tunables are left
    /// at their documented defaults.
    pub fn joiner_env(&self) -> BTreeMap<String, String> {
        [
            (
                config::IMPRESSIONS_STREAM_NAME,
                &self.impressions_stream.name,
            ),
            (config::CLICKS_STREAM_NAME, &self.clicks_stream.name),
            (config::JOINED_STREAM_NAME, &self.joined_stream.name),
            (config::STATE_TABLE_NAME, &self.state_table),
            (config::DEAD_LETTER_BUCKET, &self.dead_letter_bucket),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.clone()))
        .collect()
    }

    /// The enricher's environment.
    pub fn enricher_env(&self) -> BTreeMap<String, String> {
        [
            (config::JOINED_STREAM_NAME, &self.joined_stream.name),
            (config::LAKE_BUCKET, &self.lake_bucket),
            (config::GLUE_DATABASE, &self.glue_database),
            (config::COMMIT_LEASE_TABLE, &self.commit_lease_table),
            (config::DEAD_LETTER_BUCKET, &self.dead_letter_bucket),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.clone()))
        .collect()
    }

    /// What a process needs to reach the local endpoint: endpoint, region, dummy credentials,
    /// and no instance-metadata lookups (there is no EC2 here; the SDKs would wait for it).
    pub fn local_aws_env(&self, endpoint: &str) -> BTreeMap<String, String> {
        [
            ("AWS_ENDPOINT_URL", endpoint),
            ("AWS_REGION", &self.region),
            ("AWS_DEFAULT_REGION", &self.region),
            ("AWS_ACCESS_KEY_ID", LOCAL_ACCESS_KEY_ID),
            ("AWS_SECRET_ACCESS_KEY", LOCAL_SECRET_ACCESS_KEY),
            ("AWS_EC2_METADATA_DISABLED", "true"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
    }

    /// One env file for `cargo lambda watch --env-file`: both functions' variables (they agree
    /// on every name they share) and the local endpoint's.
    pub fn lambda_env_file(&self, endpoint: &str) -> String {
        let mut all = self.local_aws_env(endpoint);
        all.extend(self.joiner_env());
        all.extend(self.enricher_env());
        let mut out = String::from(
            "# Written by `adpipe-local up`: the functions' environment against the local endpoint.\n",
        );
        for (k, v) in all {
            out.push_str(&format!("{k}={v}\n"));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use adpipe_core::config::{EnricherConfig, JoinerConfig, ENRICHER_ENV, JOINER_ENV};

    #[test]
    fn function_envs_are_complete_configurations_with_documented_names_only() {
        let r = Resources::local();
        let joiner = r.joiner_env();
        let c = JoinerConfig::from_lookup(|k| joiner.get(k).cloned()).unwrap();
        assert_eq!(c.impressions_stream, r.impressions_stream.name);
        assert_eq!(c.state_table, r.state_table);
        assert!(joiner.keys().all(|k| JOINER_ENV.contains(&k.as_str())));
        let enricher = r.enricher_env();
        let c = EnricherConfig::from_lookup(|k| enricher.get(k).cloned()).unwrap();
        assert_eq!(c.database, r.glue_database);
        assert!(enricher.keys().all(|k| ENRICHER_ENV.contains(&k.as_str())));
        r.joiner_mapping.validate().unwrap();
        r.enricher_mapping.validate().unwrap();
    }

    #[test]
    fn the_shared_env_file_agrees_with_each_function() {
        let r = Resources::local();
        let file = r.lambda_env_file("http://127.0.0.1:4566");
        for (k, v) in r.joiner_env().iter().chain(r.enricher_env().iter()) {
            assert!(file.contains(&format!("\n{k}={v}\n")), "{k}");
        }
        assert!(file.contains("\nAWS_ENDPOINT_URL=http://127.0.0.1:4566\n"));
    }

    #[test]
    fn the_sample_events_name_the_local_streams() {
        let r = Resources::local();
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../events");
        for (file, stream) in [
            ("impressions.json", &r.impressions_stream.name),
            ("clicks.json", &r.clicks_stream.name),
            ("joined.json", &r.joined_stream.name),
        ] {
            let text = std::fs::read_to_string(root.join(file)).unwrap();
            assert!(text.contains(&format!(":stream/{stream}\"")), "{file}");
        }
    }

    #[test]
    fn isolated_names_stay_apart_and_valid() {
        let r = Resources::isolated("t-7");
        assert_eq!(r.impressions_stream.name, "adpipe-impressions-t-7");
        assert_eq!(r.glue_database, "adpipe_t_7");
        assert_ne!(r.lake_bucket, Resources::local().lake_bucket);
    }
}
