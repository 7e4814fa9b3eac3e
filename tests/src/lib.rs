//! Integration-test harness: a real AWS-compatible endpoint (moto from the project's venv, behind
//! `tools/moto_endpoint.py`, which applies requests one at a time as DynamoDB applies writes to
//! an item) started by the tests themselves on a free loopback port (`adpipe_local::endpoint`),
//! SDK clients pointed at it, and helpers to provision resources and read back what the
//! functions wrote.

use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

use adpipe_aws::Clients;
use adpipe_local::endpoint::{endpoint_server, LocalEndpoint};
use anyhow::{bail, Context, Result};
use aws_credential_types::Credentials;
use aws_lambda_events::event::kinesis::KinesisEvent;

/// The workspace root.
pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(PathBuf::from)
        .unwrap_or_default()
}

/// Reads a sample event from `events/` — the same files `cargo lambda invoke --data-file` uses.
pub fn load_event(name: &str) -> KinesisEvent {
    let path = workspace_root().join("events").join(name);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("parsing {}: {e}", path.display()))
}

/// Reads a sample event from `events/` as the functions' `main` does (the lenient
/// [`adpipe_lambda::KinesisBatch`], which keeps a record whose `data` is not base64).
pub fn load_batch(name: &str) -> adpipe_lambda::KinesisBatch {
    let path = workspace_root().join("events").join(name);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("parsing {}: {e}", path.display()))
}

/// The hostile-input corpus (`tests/corpus/hostile/`): each case's bytes with the reason it
/// must be dead-lettered with (`None`: accepted).
pub fn hostile_corpus() -> Vec<(String, Vec<u8>, Option<String>)> {
    let dir = workspace_root().join("tests/corpus/hostile");
    let text = std::fs::read_to_string(dir.join("expected.json")).expect("expected.json");
    let expected: std::collections::BTreeMap<String, serde_json::Value> =
        serde_json::from_str(&text).expect("expected.json parses");
    expected
        .into_iter()
        .map(|(name, e)| {
            let bytes = std::fs::read(dir.join(format!("{name}.bin"))).expect("corpus file");
            (name, bytes, e["reason"].as_str().map(str::to_owned))
        })
        .collect()
}

/// A running local endpoint.
#[derive(Debug)]
pub struct LocalAws {
    pub endpoint: String,
}

static LOCAL: OnceLock<std::result::Result<LocalAws, String>> = OnceLock::new();

impl LocalAws {
    /// The endpoint shared by every test in this process, started on first use.
    pub fn shared() -> &'static LocalAws {
        match LOCAL.get_or_init(|| start().map_err(|e| format!("{e:#}"))) {
            Ok(local) => local,
            Err(e) => panic!("local AWS endpoint did not start: {e}"),
        }
    }

    /// SDK configuration for the endpoint: fixed region and dummy credentials.
    pub async fn sdk_config(&self) -> aws_config::SdkConfig {
        sdk_config_at(&self.endpoint).await
    }

    pub async fn clients(&self) -> Clients {
        Clients::new(&self.sdk_config().await)
    }
}

fn start() -> Result<LocalAws> {
    let root = workspace_root();
    let program = endpoint_server(&root)?;
    // The server lives as long as this test process (see `LocalEndpoint::start`).
    let endpoint = LocalEndpoint::start(&program, None, &root.join("target"))?;
    Ok(LocalAws {
        endpoint: endpoint.url,
    })
}

/// SDK configuration for a local endpoint (or a fault proxy in front of one): fixed region and
/// dummy credentials.
pub async fn sdk_config_at(endpoint: &str) -> aws_config::SdkConfig {
    aws_config::defaults(aws_config::BehaviorVersion::latest())
        .region(aws_config::Region::new("us-east-1"))
        .credentials_provider(Credentials::new("test", "test", None, None, "adpipe-tests"))
        .endpoint_url(endpoint)
        .load()
        .await
}

/// A name no other test in this run uses (lowercase, valid for buckets, tables and streams).
/// A traffic start `duration_ms` plus two minutes before now, on a whole minute: generated
/// event times are recent, as a producer's are, so the joiner's deduplication horizon (48 h by
/// default) never refuses them, whenever the tests run.
pub fn recent_start_ms(duration_ms: i64) -> i64 {
    (adpipe_lambda::now_ms() - duration_ms - 120_000) / 60_000 * 60_000
}

pub fn unique(prefix: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// Creates the enricher's commit-lease table: key `pk`, on-demand, TTL on `ttl` (as
/// `template.yaml`'s CommitLeaseTable).
pub async fn create_lease_table(clients: &Clients, name: &str) -> Result<()> {
    adpipe_local::provision::create_ttl_table(clients, name, false).await?;
    Ok(())
}

/// Creates the keyed joiner's state log table: `pk` (S) + `sk` (N), TTL on `ttl`, as the
/// template's StateLogTable.
pub async fn create_log_table(clients: &Clients, name: &str) -> Result<()> {
    adpipe_local::provision::create_ttl_table(clients, name, true).await?;
    Ok(())
}

/// Every record of every shard of a stream as the event source mapping would deliver it
/// (position and arrival time included), shard by shard, from `after` (per shard, exclusive).
pub async fn read_records(
    clients: &Clients,
    name: &str,
    after: &std::collections::BTreeMap<String, String>,
    max_per_shard: usize,
) -> Result<Vec<adpipe_core::model::InputRecord>> {
    use adpipe_local::stream_read::{shard_ids, ShardReader, Start};
    let mut out = Vec::new();
    for id in shard_ids(&clients.kinesis, name).await? {
        let start = after
            .get(&id)
            .map_or(Start::TrimHorizon, |seq| Start::After(seq));
        let limit = Some(max_per_shard as i32);
        let mut reader = ShardReader::open(&clients.kinesis, name, &id, start, limit).await?;
        for r in reader.page().await? {
            out.push(adpipe_core::model::InputRecord {
                position: adpipe_core::model::SourcePosition {
                    stream: name.to_owned(),
                    shard: id.clone(),
                    sequence_number: r.sequence_number().to_owned(),
                    sub_sequence_number: None,
                },
                invalid_base64: None,
                arrival_ms: r.approximate_arrival_timestamp().map(|t| t.secs() * 1000),
                data: r.data.into_inner(),
            });
        }
    }
    Ok(out)
}

/// Creates a stream and waits until it is active.
pub async fn create_stream(clients: &Clients, name: &str, shards: i32) -> Result<()> {
    clients
        .kinesis
        .create_stream()
        .stream_name(name)
        .shard_count(shards)
        .send()
        .await?;
    for _ in 0..100 {
        let d = clients
            .kinesis
            .describe_stream_summary()
            .stream_name(name)
            .send()
            .await?;
        if d.stream_description_summary()
            .map(|s| s.stream_status().as_str())
            == Some("ACTIVE")
        {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("stream {name} did not become active")
}

pub async fn create_bucket(clients: &Clients, name: &str) -> Result<()> {
    clients.s3.create_bucket().bucket(name).send().await?;
    Ok(())
}

/// Every record on every shard of a stream, from the start.
pub async fn read_stream(clients: &Clients, name: &str) -> Result<Vec<Vec<u8>>> {
    let read = adpipe_local::stream_read::read_stream(&clients.kinesis, name, None, |r| {
        r.data.into_inner()
    });
    Ok(read.await?)
}

/// Every object under a prefix, with its body, sorted by key.
pub async fn read_objects(
    clients: &Clients,
    bucket: &str,
    prefix: &str,
) -> Result<Vec<(String, Vec<u8>)>> {
    let mut out = Vec::new();
    let mut pages = clients
        .s3
        .list_objects_v2()
        .bucket(bucket)
        .prefix(prefix)
        .into_paginator()
        .send();
    while let Some(page) = pages.next().await {
        for obj in page?.contents() {
            let key = obj.key().context("object without key")?.to_owned();
            let body = clients
                .s3
                .get_object()
                .bucket(bucket)
                .key(&key)
                .send()
                .await?;
            out.push((key, body.body.collect().await?.into_bytes().to_vec()));
        }
    }
    out.sort();
    Ok(out)
}

/// Runs `tools/lake_check.py` (pyiceberg / DuckDB, from the project venv) and parses its JSON.
pub fn lake_check(endpoint: &str, args: &[&str]) -> Result<serde_json::Value> {
    let root = workspace_root();
    let output = Command::new(root.join(".venv/bin/python"))
        .arg(root.join("tools/lake_check.py"))
        .args(args)
        .args(["--endpoint", endpoint])
        .output()
        .context("running tools/lake_check.py")?;
    if !output.status.success() {
        bail!(
            "lake_check.py {args:?} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    serde_json::from_slice(&output.stdout).context("lake_check.py printed no JSON")
}

/// `tools/fault_proxy.py` in front of an endpoint: requests pass through unchanged unless a
/// rule picks them for a fault (throttling, 5xx, lost responses, partial `PutRecords`
/// failures, Glue commit conflicts). The proxy stops with this value (and with the process).
#[derive(Debug)]
pub struct FaultProxy {
    pub url: String,
    port: u16,
    child: std::process::Child,
}

impl FaultProxy {
    /// Starts the proxy on a free loopback port in front of `upstream`.
    pub fn start(upstream: &str) -> Result<FaultProxy> {
        use std::io::BufRead;
        let root = workspace_root();
        let mut child = Command::new(root.join(".venv/bin/python"))
            .arg(root.join("tools/fault_proxy.py"))
            .args(["--upstream", upstream])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::inherit())
            .spawn()
            .context("starting tools/fault_proxy.py (run scripts/venv.sh first)")?;
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().context("proxy stdout")?)
            .read_line(&mut line)?;
        let port: u16 = line
            .trim()
            .strip_prefix("listening on ")
            .and_then(|p| p.parse().ok())
            .with_context(|| format!("fault proxy said {line:?}"))?;
        Ok(FaultProxy {
            url: format!("http://127.0.0.1:{port}"),
            port,
            child,
        })
    }

    fn control(&self, method: &str, body: &str) -> Result<serde_json::Value> {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(("127.0.0.1", self.port))?;
        write!(
            s,
            "{method} /__faults HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        let (head, json) = out.split_once("\r\n\r\n").context("HTTP response")?;
        if !head.starts_with("HTTP/1.1 200") {
            bail!("fault proxy answered {head}");
        }
        Ok(serde_json::from_str(json)?)
    }

    /// Replaces the fault rules (see `tools/fault_proxy.py`); `[]` turns faults off.
    pub fn set_rules(&self, seed: u64, rules: serde_json::Value) -> Result<()> {
        let body = serde_json::json!({"seed": seed, "rules": rules}).to_string();
        self.control("POST", &body).map(|_| ())
    }

    /// How many faults each rule injected since the rules were set.
    pub fn injected(&self) -> Result<std::collections::BTreeMap<String, u64>> {
        let v = self.control("GET", "")?;
        Ok(serde_json::from_value(v["injected"].clone())?)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
