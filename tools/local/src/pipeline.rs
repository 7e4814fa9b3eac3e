//! The pieces put together against one endpoint: provision, send traffic, run both functions
//! through their event source mappings until the streams are drained, and read the lake and
//! the dead letters back. Used by the `adpipe` binary and by the end-to-end tests.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use adpipe_aws::Clients;
use serde_json::Value;

use crate::endpoint::LocalEndpoint;
use crate::functions::{EnricherFunction, JoinerFunction};
use crate::lake::LakeCheck;
use crate::progress::Counter;
use crate::provision::{provision, Provisioned};
use crate::replay::{send_rated, Order};
use crate::resources::{Resources, LOCAL_ACCESS_KEY_ID, LOCAL_SECRET_ACCESS_KEY};
use crate::runner::{run, Mapping, RunOptions, RunReport, SqsDestination};
use crate::LocalError;

/// The pipeline on one endpoint.
#[derive(Debug, Clone)]
pub struct Pipeline {
    pub endpoint: LocalEndpoint,
    pub resources: Resources,
    pub clients: Clients,
    /// For the on-failure destination (an SQS queue, as in the template).
    pub sqs: aws_sdk_sqs::Client,
    /// The workspace root (for the venv and `tools/lake_check.py`).
    pub root: PathBuf,
}

/// Both functions, each with its pool of execution environments.
#[derive(Clone)]
pub struct Functions {
    pub joiner: Arc<JoinerFunction>,
    pub enricher: Arc<EnricherFunction>,
}

impl Pipeline {
    pub async fn connect(endpoint: LocalEndpoint, resources: Resources, root: &Path) -> Self {
        let sdk = endpoint.sdk_config(&resources.region).await;
        Pipeline {
            clients: Clients::new(&sdk),
            sqs: aws_sdk_sqs::Client::new(&sdk),
            endpoint,
            resources,
            root: root.to_path_buf(),
        }
    }

    pub async fn provision(&self) -> Result<Provisioned, LocalError> {
        provision(&self.clients, &self.sqs, &self.resources).await
    }

    /// Sends raw records to the input streams. `rate` (records/s) is for both streams
    /// together, shared in proportion to their records. `counters` count accepted records.
    pub async fn send(
        &self,
        impressions: &[Vec<u8>],
        clicks: &[Vec<u8>],
        order: Order,
        rate: Option<f64>,
        counters: &(Arc<Counter>, Arc<Counter>),
    ) -> Result<(), LocalError> {
        send_rated(
            &self.clients.kinesis,
            &self.resources.impressions_stream.name,
            &self.resources.clicks_stream.name,
            impressions,
            clicks,
            order,
            rate,
            counters,
        )
        .await
    }

    /// The functions, configured from their environments in [`Resources`]. The enricher gets
    /// the local credentials explicitly (its `main` takes them from the environment).
    pub fn functions(&self) -> Result<Functions, LocalError> {
        Ok(Functions {
            joiner: JoinerFunction::new(self.clients.clone(), &self.resources)?,
            enricher: EnricherFunction::new(
                self.clients.clone(),
                &self.resources,
                Some(self.endpoint.url.clone()),
                Some((
                    LOCAL_ACCESS_KEY_ID.to_owned(),
                    LOCAL_SECRET_ACCESS_KEY.to_owned(),
                )),
            )?,
        })
    }

    async fn destination(&self) -> Result<Arc<SqsDestination>, LocalError> {
        Ok(Arc::new(SqsDestination {
            client: self.sqs.clone(),
            queue_url: self.on_failure_queue_url().await?,
        }))
    }

    pub async fn on_failure_queue_url(&self) -> Result<String, LocalError> {
        self.sqs
            .get_queue_url()
            .queue_name(&self.resources.on_failure_queue)
            .send()
            .await
            .map_err(|e| LocalError::aws("SQS GetQueueUrl", e))?
            .queue_url
            .ok_or_else(|| LocalError::Runner("GetQueueUrl returned no URL".into()))
    }

    /// Puts the records of every batch in the on-failure queue back on their streams
    /// ([`crate::redrive`]), joined-stream records flagged `recovered`.
    pub async fn redrive(&self) -> Result<crate::redrive::Redriven, LocalError> {
        let url = self.on_failure_queue_url().await?;
        crate::redrive::redrive(
            &self.clients.kinesis,
            &self.sqs,
            &url,
            &self.resources.joined_stream.name,
        )
        .await
    }

    /// The invocation records the mappings sent to the on-failure queue so far (received
    /// with a zero visibility timeout, so they stay in the queue).
    pub async fn on_failure_records(&self) -> Result<Vec<Value>, LocalError> {
        let url = self.on_failure_queue_url().await?;
        let mut seen = std::collections::BTreeMap::new();
        // Receive until a pass brings nothing new (SQS returns at most 10 a call).
        loop {
            let out = self
                .sqs
                .receive_message()
                .queue_url(&url)
                .max_number_of_messages(10)
                .visibility_timeout(0)
                .send()
                .await
                .map_err(|e| LocalError::aws("SQS ReceiveMessage", e))?;
            let mut new = 0;
            for m in out.messages() {
                let (Some(id), Some(body)) = (m.message_id(), m.body()) else {
                    continue;
                };
                if !seen.contains_key(id) {
                    let value = serde_json::from_str(body)
                        .map_err(LocalError::json("an on-failure record"))?;
                    seen.insert(id.to_owned(), value);
                    new += 1;
                }
            }
            if new == 0 {
                return Ok(seen.into_values().collect());
            }
        }
    }

    /// The four event source mappings, in three stages: the joiner's routing ones (impressions,
    /// clicks), then its join (keyed stream), then the enricher's (joined stream). A stage
    /// drains after the one before it has stopped.
    pub async fn mappings(&self, f: &Functions) -> Result<Vec<Vec<Mapping>>, LocalError> {
        let r = &self.resources;
        let joiner_role = r.role_arn(&r.joiner);
        let mut joiner_settings = r.joiner_mapping.clone();
        joiner_settings.function_timeout = r.joiner.timeout;
        let mut keyed_settings = r.keyed_mapping.clone();
        keyed_settings.function_timeout = r.joiner.timeout;
        let mut enricher_settings = r.enricher_mapping.clone();
        enricher_settings.function_timeout = r.enricher.timeout;
        let destination = self.destination().await?;
        Ok(vec![
            vec![
                Mapping::new(
                    format!("{} <- {}", r.joiner.name, r.impressions_stream.name),
                    &r.impressions_stream.name,
                    joiner_settings.clone(),
                    f.joiner.clone(),
                    &joiner_role,
                )
                .with_destination(destination.clone()),
                Mapping::new(
                    format!("{} <- {}", r.joiner.name, r.clicks_stream.name),
                    &r.clicks_stream.name,
                    joiner_settings,
                    f.joiner.clone(),
                    &joiner_role,
                )
                .with_destination(destination.clone()),
            ],
            vec![Mapping::new(
                format!("{} <- {}", r.joiner.name, r.keyed_stream.name),
                &r.keyed_stream.name,
                keyed_settings,
                f.joiner.clone(),
                &joiner_role,
            )
            .with_destination(destination.clone())],
            vec![Mapping::new(
                format!("{} <- {}", r.enricher.name, r.joined_stream.name),
                &r.joined_stream.name,
                enricher_settings,
                f.enricher.clone(),
                r.role_arn(&r.enricher),
            )
            .with_destination(destination)],
        ])
    }

    /// Runs the mappings with `options` (see [`RunOptions`]). The enricher is initialised
    /// first, so the Glue tables exist before any shard is read.
    pub async fn run(
        &self,
        functions: &Functions,
        mappings: Vec<Vec<Mapping>>,
        options: RunOptions,
    ) -> Result<RunReport, LocalError> {
        functions
            .enricher
            .warm_up()
            .await
            .map_err(|e| LocalError::Runner(e.to_string()))?;
        run(&self.clients.kinesis, mappings, options).await
    }

    /// Runs everything until the streams are drained.
    pub async fn drain(&self, functions: &Functions) -> Result<RunReport, LocalError> {
        let mappings = self.mappings(functions).await?;
        self.run(
            functions,
            mappings,
            RunOptions::drain(&self.resources.region),
        )
        .await
    }

    /// The lake, read by `tools/lake_check.py`.
    pub fn lake(&self) -> LakeCheck {
        LakeCheck::new(
            &self.root,
            &self.endpoint.url,
            &self.resources.glue_database,
        )
    }

    /// JSON objects under a prefix of the dead-letter bucket, sorted by key.
    pub async fn dead_letter_objects(
        &self,
        prefix: &str,
    ) -> Result<Vec<(String, Value)>, LocalError> {
        let s3 = &self.clients.s3;
        let mut out = Vec::new();
        let mut pages = s3
            .list_objects_v2()
            .bucket(&self.resources.dead_letter_bucket)
            .prefix(prefix)
            .into_paginator()
            .send();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|e| LocalError::aws("S3 ListObjectsV2", e))?;
            for obj in page.contents() {
                let Some(key) = obj.key() else { continue };
                let body = s3
                    .get_object()
                    .bucket(&self.resources.dead_letter_bucket)
                    .key(key)
                    .send()
                    .await
                    .map_err(|e| LocalError::aws("S3 GetObject", e))?
                    .body
                    .collect()
                    .await
                    .map_err(|e| LocalError::Runner(format!("reading {key}: {e}")))?
                    .into_bytes();
                let value = serde_json::from_slice(&body)
                    .map_err(LocalError::json("a dead-letter object"))?;
                out.push((key.to_owned(), value));
            }
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }
}
