//! The local pipeline's resource names, event source mapping settings and function
//! environments, read from `deploy/resources.json`: the same file `template.yaml` is tested
//! against (`tools/test_template.py`), in its `local` stage. Everything else in this crate
//! (provisioning, the runner, `cargo lambda` env files) takes them from here.

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::Value;

use crate::esm::{EsmSettings, StartingPosition, MAX_PAYLOAD_BYTES};

/// `deploy/resources.json`, built into the binary so `adpipe` runs from anywhere.
pub const CONTRACT: &str = include_str!("../../../deploy/resources.json");

/// The stage the local tooling uses (names `adpipe-local-…`).
pub const LOCAL_STAGE: &str = "local";

/// A Kinesis stream and its shard count.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamSpec {
    pub name: String,
    pub shards: i32,
}

/// A Lambda function as the runner sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FunctionSpec {
    /// The deployed function's name (`FunctionName`).
    pub name: String,
    /// The binary `cargo lambda` builds (`cargo lambda invoke <binary>`).
    pub binary: String,
    /// The function's `Timeout`.
    pub timeout: Duration,
    /// Its environment (`Environment.Variables`).
    pub env: BTreeMap<String, String>,
}

/// Every resource of the pipeline, and how the functions are wired to them.
#[derive(Debug, Clone, PartialEq)]
pub struct Resources {
    pub stage: String,
    pub region: String,
    /// The account in ARNs (moto's default account).
    pub account: String,
    pub impressions_stream: StreamSpec,
    pub clicks_stream: StreamSpec,
    pub joined_stream: StreamSpec,
    /// Both input streams re-keyed by state bucket (the joiner's router writes it).
    pub keyed_stream: StreamSpec,
    /// The join state, a log per bucket range: `pk` (S) + `sk` (N), TTL attribute `ttl`.
    pub state_log_table: String,
    /// The enricher's commit leases: hash key `pk` (S), TTL attribute `ttl`.
    pub commit_lease_table: String,
    pub lake_bucket: String,
    /// Where the functions put dead letters and late partners (the lake bucket in the template).
    pub dead_letter_bucket: String,
    pub glue_database: String,
    /// The mappings' on-failure destination, an SQS queue.
    pub on_failure_queue: String,
    pub joiner: FunctionSpec,
    pub enricher: FunctionSpec,
    /// Both joiner mappings (impressions stream, clicks stream).
    pub joiner_mapping: EsmSettings,
    /// The joiner's mapping of the keyed stream.
    pub keyed_mapping: EsmSettings,
    /// The enricher's mapping (joined stream).
    pub enricher_mapping: EsmSettings,
}

/// Dummy credentials for the local endpoint (it accepts any).
pub const LOCAL_ACCESS_KEY_ID: &str = "test";
pub const LOCAL_SECRET_ACCESS_KEY: &str = "test";

/// `deploy/resources.json` does not say what the local tooling needs.
#[derive(Debug, thiserror::Error)]
#[error("deploy/resources.json: {0}")]
pub struct ContractError(String);

fn bad(what: impl Into<String>) -> ContractError {
    ContractError(what.into())
}

/// One stage of the contract: resolves names and parameter-backed values.
struct Stage<'a> {
    contract: &'a Value,
    stage: &'a str,
    account: String,
    region: String,
}

impl Stage<'_> {
    fn at(&self, path: &[&str]) -> Result<&Value, ContractError> {
        path.iter()
            .try_fold(self.contract, |v, k| v.get(k))
            .ok_or_else(|| bad(format!("no {}", path.join("."))))
    }

    fn name(&self, resource: &str) -> Result<String, ContractError> {
        let pattern = self.at(&["resources", resource, "name"])?;
        let pattern = pattern
            .as_str()
            .ok_or_else(|| bad(format!("resources.{resource}.name is not a string")))?;
        Ok(pattern
            .replace("{stage}", self.stage)
            .replace("{account}", &self.account)
            .replace("{region}", &self.region))
    }

    /// A `{"value"}`, `{"parameter", "default"}` or `{"resource"}` source, as a string.
    fn resolve(&self, source: &Value, what: &str) -> Result<String, ContractError> {
        if let Some(resource) = source.get("resource").and_then(Value::as_str) {
            return self.name(resource);
        }
        if let Some(param) = source.get("parameter").and_then(Value::as_str) {
            let over = self.contract.pointer(&format!(
                "/stages/{}/parameter_overrides/{param}",
                self.stage
            ));
            let value = over.or_else(|| source.get("default"));
            return value
                .and_then(Value::as_str)
                .map(str::to_owned)
                .ok_or_else(|| bad(format!("{what}: parameter {param} has no default")));
        }
        match source.get("value") {
            Some(Value::String(s)) => Ok(s.clone()),
            Some(v) => Ok(v.to_string()),
            None => Err(bad(format!(
                "{what}: neither value, parameter nor resource"
            ))),
        }
    }

    fn number<T: std::str::FromStr>(&self, source: &Value, what: &str) -> Result<T, ContractError> {
        let text = self.resolve(source, what)?;
        text.parse()
            .map_err(|_| bad(format!("{what}: {text:?} is not a number")))
    }

    fn stream(&self, key: &str) -> Result<StreamSpec, ContractError> {
        Ok(StreamSpec {
            name: self.name(key)?,
            shards: self.number(self.at(&["streams", key, "shards"])?, key)?,
        })
    }

    fn function(&self, function: &str) -> Result<FunctionSpec, ContractError> {
        let spec = self.at(&["functions", function])?;
        let timeout = spec
            .get("timeout_seconds")
            .and_then(Value::as_u64)
            .ok_or_else(|| bad(format!("functions.{function}.timeout_seconds")))?;
        let binary = spec
            .get("binary")
            .and_then(Value::as_str)
            .ok_or_else(|| bad(format!("functions.{function}.binary")))?;
        let vars = self
            .at(&["env", function])?
            .as_object()
            .ok_or_else(|| bad(format!("env.{function} is not an object")))?;
        let env = vars
            .iter()
            .map(|(k, source)| Ok((k.clone(), self.resolve(source, k)?)))
            .collect::<Result<_, ContractError>>()?;
        Ok(FunctionSpec {
            name: self.name(&format!("{function}_function"))?,
            binary: binary.to_owned(),
            timeout: Duration::from_secs(timeout),
            env,
        })
    }

    fn mapping(&self, function: &str, timeout: Duration) -> Result<EsmSettings, ContractError> {
        let m = self.at(&["mappings", function])?;
        let get = |prop: &str| {
            m.get(prop)
                .ok_or_else(|| bad(format!("mappings.{function}.{prop}")))
        };
        let what = |prop: &str| format!("mappings.{function}.{prop}");
        let starting_position = match self
            .resolve(get("StartingPosition")?, "StartingPosition")?
            .as_str()
        {
            "TRIM_HORIZON" => StartingPosition::TrimHorizon,
            "LATEST" => StartingPosition::Latest,
            other => return Err(bad(format!("StartingPosition {other:?} is not supported"))),
        };
        let retries: i64 =
            self.number(get("MaximumRetryAttempts")?, &what("MaximumRetryAttempts"))?;
        let types = get("FunctionResponseTypes")?.get("value");
        let report = types
            .and_then(Value::as_array)
            .is_some_and(|t| t.iter().any(|v| v == "ReportBatchItemFailures"));
        Ok(EsmSettings {
            batch_size: self.number(get("BatchSize")?, &what("BatchSize"))?,
            batching_window: Duration::from_secs(self.number(
                get("MaximumBatchingWindowInSeconds")?,
                &what("MaximumBatchingWindowInSeconds"),
            )?),
            max_retry_attempts: u32::try_from(retries).ok(),
            bisect_on_error: get("BisectBatchOnFunctionError")?.get("value")
                == Some(&Value::Bool(true)),
            report_batch_item_failures: report,
            starting_position,
            function_timeout: timeout,
            max_payload_bytes: MAX_PAYLOAD_BYTES,
            retry_delay: Duration::from_millis(200),
        })
    }
}

impl Resources {
    /// The laptop's resources: `deploy/resources.json` in the `local` stage. The stream names
    /// match the `eventSourceARN`s in `events/`, so `cargo lambda invoke --data-file events/…`
    /// works against a provisioned endpoint.
    pub fn local() -> Self {
        Resources::from_contract(CONTRACT, LOCAL_STAGE)
            .expect("deploy/resources.json describes the local stage (checked by the tests)")
    }

    /// The resources of `stage` as `contract` (the text of `deploy/resources.json`) names them.
    pub fn from_contract(contract: &str, stage: &str) -> Result<Self, ContractError> {
        let contract: Value =
            serde_json::from_str(contract).map_err(|e| bad(format!("not JSON: {e}")))?;
        let stage_spec = contract
            .pointer(&format!("/stages/{stage}"))
            .ok_or_else(|| bad(format!("no stage {stage:?}")))?;
        let field = |k: &str| {
            stage_spec
                .get(k)
                .and_then(Value::as_str)
                .map(str::to_owned)
                .ok_or_else(|| bad(format!("stages.{stage}.{k}")))
        };
        let s = Stage {
            contract: &contract,
            stage,
            account: field("account")?,
            region: field("region")?,
        };
        let joiner = s.function("joiner")?;
        let enricher = s.function("enricher")?;
        let env = |f: &FunctionSpec, k: &str| {
            f.env
                .get(k)
                .cloned()
                .ok_or_else(|| bad(format!("env of {} has no {k}", f.binary)))
        };
        Ok(Resources {
            stage: stage.to_owned(),
            impressions_stream: s.stream("impressions_stream")?,
            clicks_stream: s.stream("clicks_stream")?,
            joined_stream: s.stream("joined_stream")?,
            keyed_stream: s.stream("keyed_stream")?,
            state_log_table: s.name("state_log_table")?,
            commit_lease_table: s.name("commit_lease_table")?,
            lake_bucket: s.name("lake_bucket")?,
            dead_letter_bucket: env(&joiner, "DEAD_LETTER_BUCKET")?,
            glue_database: s.name("glue_database")?,
            on_failure_queue: s.name("on_failure_queue")?,
            joiner_mapping: s.mapping("joiner", joiner.timeout)?,
            keyed_mapping: s.mapping("joiner_keyed", joiner.timeout)?,
            enricher_mapping: s.mapping("enricher", enricher.timeout)?,
            joiner,
            enricher,
            region: s.region,
            account: s.account,
        })
    }

    /// The same resources with `tag` appended to every name, so several pipelines (tests) can
    /// share one endpoint. `tag` should be lowercase letters, digits and `-`.
    pub fn isolated(tag: &str) -> Self {
        let mut r = Resources::local();
        let mut renamed = BTreeMap::new();
        let mut rename = |name: &mut String, new: String| {
            renamed.insert(std::mem::replace(name, new.clone()), new);
        };
        for s in [
            &mut r.impressions_stream,
            &mut r.clicks_stream,
            &mut r.joined_stream,
            &mut r.keyed_stream,
        ] {
            let new = format!("{}-{tag}", s.name);
            rename(&mut s.name, new);
        }
        for name in [
            &mut r.state_log_table,
            &mut r.commit_lease_table,
            &mut r.lake_bucket,
            &mut r.on_failure_queue,
        ] {
            let new = format!("{name}-{tag}");
            rename(name, new);
        }
        // Glue database names allow no `-`.
        let new = format!("{}_{}", r.glue_database, tag.replace('-', "_"));
        rename(&mut r.glue_database, new);
        // The dead-letter bucket is one of the names above (the lake bucket).
        if let Some(new) = renamed.get(&r.dead_letter_bucket) {
            r.dead_letter_bucket = new.clone();
        }
        for f in [&mut r.joiner, &mut r.enricher] {
            for value in f.env.values_mut() {
                if let Some(new) = renamed.get(value) {
                    *value = new.clone();
                }
            }
        }
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
        format!("arn:aws:iam::{}:role/{}", self.account, function.name)
    }

    /// The joiner's environment (`Environment.Variables` of the function).
    pub fn joiner_env(&self) -> BTreeMap<String, String> {
        self.joiner.env.clone()
    }

    /// The enricher's environment.
    pub fn enricher_env(&self) -> BTreeMap<String, String> {
        self.enricher.env.clone()
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
            "# Written by `adpipe up`: the functions' environment against the local endpoint.\n",
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
        assert_eq!(c.state_log_table, r.state_log_table);
        assert!(joiner.keys().all(|k| JOINER_ENV.contains(&k.as_str())));
        // And every one of them: `adpipe env` prints them all for the local stage.
        let file = r.lambda_env_file("http://127.0.0.1:4566");
        for var in JOINER_ENV.iter().chain(ENRICHER_ENV) {
            assert!(
                file.contains(&format!("\n{var}=")),
                "{var} missing:\n{file}"
            );
        }
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
        assert_eq!(r.impressions_stream.name, "adpipe-local-impressions-t-7");
        assert_eq!(r.glue_database, "adpipe_local_t_7");
        assert_ne!(r.lake_bucket, Resources::local().lake_bucket);
        assert_eq!(r.dead_letter_bucket, r.lake_bucket);
        // The functions' environments follow the renamed resources.
        assert_eq!(r.joiner_env()["STATE_LOG_TABLE_NAME"], r.state_log_table);
        assert_eq!(r.enricher_env()["GLUE_DATABASE"], r.glue_database);
        assert_eq!(r.enricher_env()["LAKE_BUCKET"], r.lake_bucket);
    }

    #[test]
    fn names_and_settings_come_from_the_contract_s_local_stage() {
        let r = Resources::local();
        assert_eq!(r.impressions_stream.name, "adpipe-local-impressions");
        assert_eq!(
            r.lake_bucket, "adpipe-local-lake-123456789012-us-east-1",
            "the template's pattern, with the local endpoint's account and region"
        );
        assert_eq!(r.on_failure_queue, "adpipe-local-esm-failures");
        assert_eq!(r.joiner.name, "adpipe-local-joiner");
        assert_eq!(r.joiner.binary, "joiner");
        assert_eq!(r.joiner.timeout, Duration::from_secs(120));
        // Template defaults, and the local stage's overrides.
        assert_eq!(r.joiner_mapping.batch_size, 500);
        assert_eq!(r.joiner_mapping.batching_window, Duration::from_secs(1));
        assert_eq!(r.joiner_mapping.max_retry_attempts, Some(10));
        assert!(r.joiner_mapping.bisect_on_error && r.joiner_mapping.report_batch_item_failures);
        assert_eq!(r.enricher_mapping.batch_size, 5_000);
        assert_eq!(r.enricher_mapping.batching_window, Duration::from_secs(5));
        assert_eq!(
            r.enricher_mapping.function_timeout,
            Duration::from_secs(300)
        );
        assert_eq!(r.impressions_stream.shards, 2);
        assert_eq!(r.joiner_env()["JOIN_WINDOW_MS"], "30000");
    }

    #[test]
    fn a_contract_without_what_the_tooling_needs_is_a_clear_error() {
        let mut c: Value = serde_json::from_str(CONTRACT).unwrap();
        c["mappings"]["joiner"]
            .as_object_mut()
            .unwrap()
            .remove("BatchSize");
        let e = Resources::from_contract(&c.to_string(), LOCAL_STAGE).unwrap_err();
        assert_eq!(
            e.to_string(),
            "deploy/resources.json: mappings.joiner.BatchSize"
        );
        let e = Resources::from_contract(CONTRACT, "nope").unwrap_err();
        assert!(e.to_string().contains("no stage \"nope\""), "{e}");
    }
}
