//! The two Lambda functions as the runner invokes them: the same init code as their `main`
//! (`aws_function`, `aws_enricher`) and the same handlers (`adpipe_joiner::handle_routed`,
//! `adpipe_enricher::handle`), in a pool of execution environments. Concurrent invocations get
//! distinct environments and an environment is reused once free, as on Lambda; one that timed
//! out or crashed is dropped.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use adpipe_aws::Clients;
use adpipe_core::config::{EnricherConfig, JoinerConfig};
use adpipe_core::metrics::Counts;
use adpipe_enricher::AwsEnricher;
use adpipe_joiner::AwsFunction;
use aws_lambda_events::event::kinesis::KinesisEvent;

use crate::esm::FunctionError;
use crate::resources::Resources;
use crate::runner::{Invocation, KinesisFunction};

/// Idle execution environments of one function.
#[derive(Debug)]
struct Pool<T> {
    idle: Mutex<Vec<T>>,
    created: AtomicU32,
}

impl<T> Default for Pool<T> {
    fn default() -> Self {
        Pool {
            idle: Mutex::new(Vec::new()),
            created: AtomicU32::new(0),
        }
    }
}

impl<T> Pool<T> {
    fn take(&self) -> Option<T> {
        self.idle.lock().unwrap_or_else(|p| p.into_inner()).pop()
    }

    fn put(&self, env: T) {
        self.idle
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(env);
    }

    /// A number for a new environment.
    fn next_id(&self) -> u32 {
        self.created.fetch_add(1, Ordering::Relaxed) + 1
    }
}

/// The joiner function.
pub struct JoinerFunction {
    arn: String,
    clients: Clients,
    config: JoinerConfig,
    pool: Pool<AwsFunction>,
    totals: Mutex<Counts>,
}

impl JoinerFunction {
    /// Reads the function's configuration from its environment, as `main` does.
    pub fn new(clients: Clients, resources: &Resources) -> Result<Arc<Self>, crate::LocalError> {
        let env = resources.joiner_env();
        let config = JoinerConfig::from_lookup(|k| env.get(k).cloned())?;
        Ok(Arc::new(JoinerFunction {
            arn: resources.function_arn(&resources.joiner),
            clients,
            config,
            pool: Pool::default(),
            totals: Mutex::new(Counts::default()),
        }))
    }

    /// Every batch's counts so far, summed.
    pub fn totals(&self) -> Counts {
        self.totals
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

/// A request id for a local invocation (Lambda's are UUIDs; these only need to be unique in
/// the process) and whether it started a new execution environment.
fn invocation(cold_start: bool) -> adpipe_core::metrics::Invocation {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    adpipe_core::metrics::Invocation::new(
        format!("local-{}-{n:08}", std::process::id()),
        cold_start,
    )
}

impl KinesisFunction for JoinerFunction {
    fn arn(&self) -> String {
        self.arn.clone()
    }

    fn invoke(self: Arc<Self>, event: KinesisEvent) -> Invocation {
        Box::pin(async move {
            let (env, cold) = match self.pool.take() {
                Some(env) => (env, false),
                None => {
                    self.pool.next_id();
                    let env = adpipe_joiner::aws_function(&self.clients, self.config.clone());
                    (env, true)
                }
            };
            // As on Lambda, the function reads the event's JSON with its own (lenient) type.
            let event = as_delivered(&event)?;
            let (response, report) = adpipe_joiner::handle_routed(
                &env.router,
                &env.keyed,
                &event,
                adpipe_lambda::now_ms(),
                &invocation(cold),
            )
            .await;
            *self.totals.lock().unwrap_or_else(|p| p.into_inner()) += &report.counts;
            self.pool.put(env);
            serde_json::to_value(&response).map_err(|e| FunctionError::Unhandled(e.to_string()))
        })
    }
}

/// What the enricher's batches added up to.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EnricherTotals {
    pub counts: Counts,
    pub rows_written: u64,
    pub files_written: u64,
    pub bytes_written: u64,
    pub duplicates_dropped: u64,
    pub commit_retries: u64,
    pub failed_batches: u64,
}

/// The enricher function.
pub struct EnricherFunction {
    arn: String,
    name: String,
    clients: Clients,
    config: EnricherConfig,
    endpoint: Option<String>,
    region: Option<String>,
    /// Static credentials for the lake's catalog and file IO (`None`: from the environment,
    /// as on Lambda).
    credentials: Option<(String, String)>,
    pool: Pool<AwsEnricher>,
    totals: Mutex<EnricherTotals>,
}

impl EnricherFunction {
    pub fn new(
        clients: Clients,
        resources: &Resources,
        endpoint: Option<String>,
        credentials: Option<(String, String)>,
    ) -> Result<Arc<Self>, crate::LocalError> {
        let env = resources.enricher_env();
        let config = EnricherConfig::from_lookup(|k| env.get(k).cloned())?;
        Ok(Arc::new(EnricherFunction {
            arn: resources.function_arn(&resources.enricher),
            name: resources.enricher.name.clone(),
            clients,
            config,
            endpoint,
            region: Some(resources.region.clone()),
            credentials,
            pool: Pool::default(),
            totals: Mutex::new(EnricherTotals::default()),
        }))
    }

    pub fn totals(&self) -> EnricherTotals {
        self.totals
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// A new execution environment: the init code of the enricher's `main`. It creates the
    /// Glue database and tables if they are missing.
    pub async fn init_environment(&self) -> Result<AwsEnricher, FunctionError> {
        let id = self.pool.next_id();
        let mut lake =
            adpipe_enricher::lake_config(&self.config, self.endpoint.clone(), self.region.clone());
        lake.credentials = self.credentials.clone();
        adpipe_enricher::aws_enricher(
            &self.clients,
            self.config.clone(),
            lake,
            format!("local-{}-env-{id}", self.name),
        )
        .await
        .map_err(|e| FunctionError::Init(e.to_string()))
    }

    /// Makes sure one environment is initialised (and so the tables exist), e.g. before the
    /// lake is queried.
    pub async fn warm_up(&self) -> Result<(), FunctionError> {
        if let Some(env) = self.pool.take() {
            self.pool.put(env);
            return Ok(());
        }
        let env = self.init_environment().await?;
        self.pool.put(env);
        Ok(())
    }
}

impl KinesisFunction for EnricherFunction {
    fn arn(&self) -> String {
        self.arn.clone()
    }

    fn invoke(self: Arc<Self>, event: KinesisEvent) -> Invocation {
        Box::pin(async move {
            let (env, cold) = match self.pool.take() {
                Some(env) => (env, false),
                None => (self.init_environment().await?, true),
            };
            let event = as_delivered(&event)?;
            let (response, report) = adpipe_enricher::handle_invocation(
                &env,
                &self.config.metrics_namespace,
                &event,
                adpipe_lambda::now_ms(),
                &invocation(cold),
            )
            .await;
            {
                let mut t = self.totals.lock().unwrap_or_else(|p| p.into_inner());
                t.counts += &report.counts;
                for a in [&report.clicks, &report.impressions] {
                    t.rows_written += a.rows_written;
                    t.files_written += a.files_written;
                    t.bytes_written += a.bytes_written;
                    t.duplicates_dropped += a.duplicates_dropped;
                    t.commit_retries += u64::from(a.commit_retries);
                }
                t.failed_batches += u64::from(report.failed.is_some());
            }
            self.pool.put(env);
            serde_json::to_value(&response).map_err(|e| FunctionError::Unhandled(e.to_string()))
        })
    }
}

/// The event as the functions' `main` reads it: its JSON, as their own lenient
/// [`KinesisBatch`](adpipe_lambda::KinesisBatch).
fn as_delivered(event: &KinesisEvent) -> Result<adpipe_lambda::KinesisBatch, FunctionError> {
    serde_json::to_value(event)
        .and_then(serde_json::from_value)
        .map_err(|e| FunctionError::Unhandled(format!("event deserialization: {e}")))
}
