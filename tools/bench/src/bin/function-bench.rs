//! The release function binaries run as Lambda runs them: start-up time, binary size, and
//! peak memory for the largest batch Lambda can deliver.
//!
//! Usage: cargo build --release --workspace && bash scripts/venv.sh && \
//!        ./target/release/function-bench [--runs 7] [--rss-runs 3] [--bin-dir target/release]
//!
//! Starts the local endpoint (moto) and provisions the local stage's resources. Then, for
//! each function, every run is a fresh process of `target/release/<binary>` with the local
//! stage's environment and `AWS_LAMBDA_RUNTIME_API` pointing at a minimal Runtime API
//! emulator (`adpipe_bench::runtime_api`), which hands it one event:
//! - start-up runs (`--runs`) use the sample event (`events/impressions.json`,
//!   `events/joined.json`) and time spawn → first `next` (init) and event → response;
//! - memory runs (`--rss-runs`) use the largest event Lambda can deliver (6 MB payload,
//!   at most 10,000 records) and read the process's resident set from `/proc/<pid>/status`:
//!   `VmRSS` when it first asks for an event (baseline after init) and `VmHWM` (peak) once it
//!   has answered and asks again.
//!
//! Each run's records get fresh sequence numbers and ids, so every run does first-time work
//! (no duplicates, no already-committed input ranges).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use adpipe_bench::runtime_api::{Call, RuntimeApi};
use adpipe_bench::{joined_records, mib, proc_status_kib, Spread};
use adpipe_local::endpoint::{endpoint_server, workspace_root, LocalEndpoint};
use adpipe_local::esm::{MAX_BATCH_SIZE, MAX_PAYLOAD_BYTES};
use adpipe_local::generator::{generate, TrafficConfig};
use adpipe_local::pipeline::Pipeline;
use adpipe_local::resources::{FunctionSpec, Resources};
use adpipe_local::runner::{event_record, EventSource};
use base64::Engine;
use clap::Parser;
use serde_json::Value;

/// Start-up time, binary size and peak memory of the release function binaries.
#[derive(Debug, Parser)]
#[command(name = "function-bench")]
struct Args {
    /// Start-up runs per function (fresh processes, sample event)
    #[arg(long, value_name = "N", default_value_t = 7,
          value_parser = clap::value_parser!(u32).range(1..))]
    runs: u32,
    /// Memory runs per function (fresh processes, the largest event)
    #[arg(long, value_name = "N", default_value_t = 3,
          value_parser = clap::value_parser!(u32).range(1..))]
    rss_runs: u32,
    /// Directory of the function binaries, relative to the workspace
    #[arg(long, value_name = "DIR", default_value = "target/release")]
    bin_dir: PathBuf,
}

/// What one run measured.
struct Run {
    init: Duration,
    handled: Duration,
    baseline_kib: u64,
    peak_kib: u64,
}

/// One function under test.
struct Function<'a> {
    spec: &'a FunctionSpec,
    binary: PathBuf,
    sample: Value,
    largest: Value,
    largest_stream: String,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let (runs, rss_runs) = (args.runs as usize, args.rss_runs as usize);
    let root = workspace_root();
    let bin_dir = root.join(&args.bin_dir);
    let logs = root.join("target/bench-logs");
    std::fs::create_dir_all(&logs)?;

    let endpoint = LocalEndpoint::start(&endpoint_server(&root)?, None, &logs)?;
    let r = Resources::local();
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        let pipeline = Pipeline::connect(endpoint.clone(), r.clone(), &root).await;
        pipeline.provision().await.map(|_| ())
    })?;

    let sample = |name: &str| -> anyhow::Result<Value> {
        Ok(serde_json::from_str(&std::fs::read_to_string(
            root.join("events").join(name),
        )?)?)
    };
    let impressions = generate(&TrafficConfig {
        impressions: MAX_BATCH_SIZE,
        malformed: 0.0,
        duplicates: 0.0,
        ..TrafficConfig::default()
    })?
    .impression_records;
    let functions = [
        Function {
            spec: &r.joiner,
            binary: bin_dir.join(&r.joiner.binary),
            sample: sample("impressions.json")?,
            largest: largest_event(&r, &r.joiner, &r.impressions_stream.name, &impressions),
            largest_stream: "impressions".into(),
        },
        Function {
            spec: &r.enricher,
            binary: bin_dir.join(&r.enricher.binary),
            sample: sample("joined.json")?,
            largest: largest_event(
                &r,
                &r.enricher,
                &r.joined_stream.name,
                &joined_records(MAX_BATCH_SIZE, 1.0),
            ),
            largest_stream: "joined clicks".into(),
        },
    ];

    println!(
        "## functions as Lambda runs them: x86_64 release binaries, Runtime API emulator, local endpoint"
    );
    println!("| function | binary bytes | init: spawn → first `next`, ms | first event: event → response, ms | spawn → response, ms | baseline RSS after init |");
    println!("|---|---|---|---|---|---|");
    let mut memory_rows = Vec::new();
    let mut run_id = 0;
    for f in &functions {
        let size = std::fs::metadata(&f.binary)
            .map_err(|e| anyhow::anyhow!("{}: {e} (build it first)", f.binary.display()))?
            .len();
        let mut runs_of = |event: &Value, count: usize| -> anyhow::Result<Vec<Run>> {
            (0..count)
                .map(|_| {
                    run_id += 1;
                    let fresh = fresh(event, run_id);
                    run(f, &r, &endpoint.url, &fresh, run_id, &logs)
                })
                .collect()
        };
        let starts = runs_of(&f.sample, runs)?;
        let big = runs_of(&f.largest, rss_runs)?;
        let ms = |d: fn(&Run) -> Duration| {
            Spread::of(starts.iter().map(|x| d(x).as_secs_f64() * 1e3).collect())
        };
        println!(
            "| {} | {size} ({:.1} MiB) | {} | {} | {} | {:.1} MiB |",
            f.spec.binary,
            mib(size),
            ms(|x| x.init).with_decimals(1),
            ms(|x| x.handled).with_decimals(1),
            ms(|x| x.init + x.handled).with_decimals(1),
            Spread::of(
                starts
                    .iter()
                    .map(|x| x.baseline_kib as f64 / 1024.0)
                    .collect()
            )
            .median
        );

        let event_len = serde_json::to_vec(&f.largest)?.len();
        let records = f.largest["Records"].as_array().map_or(0, Vec::len);
        if !big.is_empty() {
            let kib =
                |k: fn(&Run) -> u64| Spread::of(big.iter().map(|x| k(x) as f64 / 1024.0).collect());
            let handled = Spread::of(big.iter().map(|x| x.handled.as_secs_f64()).collect());
            memory_rows.push(format!(
                "| {} | {records} {} records, {event_len} bytes ({:.2} MiB) | {:.1} MiB | **{:.1} MiB** ({:.1}–{:.1}) | {:.1} s |",
                f.spec.binary,
                f.largest_stream,
                mib(event_len as u64),
                kib(|x| x.baseline_kib).median,
                kib(|x| x.peak_kib).median,
                kib(|x| x.peak_kib).min,
                kib(|x| x.peak_kib).max,
                handled.median,
            ));
        }
    }
    println!("({runs} runs each: median (min–max))");
    if !memory_rows.is_empty() {
        println!();
        println!("## peak memory for the largest batch ({rss_runs} runs each: median (min–max))");
        println!("| function | event | baseline RSS (`VmRSS` at first `next`) | peak RSS (`VmHWM`) | event → response (local endpoint) |");
        println!("|---|---|---|---|---|");
        for row in memory_rows {
            println!("{row}");
        }
    }
    Ok(())
}

/// The largest event Lambda can deliver from `stream` to `function`: records in order until
/// the next would take the payload over 6 MB or the batch over 10,000 records.
fn largest_event(r: &Resources, function: &FunctionSpec, stream: &str, data: &[Vec<u8>]) -> Value {
    let source = EventSource {
        stream_arn: r.stream_arn(stream),
        shard_id: "shardId-000000000000".into(),
        region: r.region.clone(),
        role_arn: r.role_arn(function),
    };
    // `{"Records":[` … `]}` and a comma between records.
    let mut payload = r#"{"Records":[]}"#.len();
    let mut records = Vec::new();
    for (i, d) in data.iter().take(MAX_BATCH_SIZE).enumerate() {
        let seq = format!("4965685346523545711234567890{i:022}");
        let record = event_record(
            &source,
            &seq,
            &format!("p-{i}"),
            d,
            1_795_169_730_500,
            false,
        );
        let len = record.to_string().len() + usize::from(i > 0);
        if payload + len > MAX_PAYLOAD_BYTES {
            break;
        }
        payload += len;
        records.push(record);
    }
    serde_json::json!({ "Records": records })
}

/// A copy of `event` whose records are new to the pipeline: sequence numbers moved to a range
/// of their own (prefixed by the run), and every id in the data suffixed by the run.
fn fresh(event: &Value, run: usize) -> Vec<u8> {
    let b64 = base64::engine::general_purpose::STANDARD;
    let mut event = event.clone();
    if let Some(records) = event["Records"].as_array_mut() {
        for record in records {
            let seq = format!(
                "{}{}",
                100 + run,
                record["kinesis"]["sequenceNumber"]
                    .as_str()
                    .unwrap_or_default()
            );
            if let Some(id) = record["eventID"].as_str() {
                let shard = id.split_once(':').map_or(id, |(s, _)| s).to_owned();
                record["eventID"] = Value::String(format!("{shard}:{seq}"));
            }
            record["kinesis"]["sequenceNumber"] = Value::String(seq);
            let data = record["kinesis"]["data"].as_str().unwrap_or_default();
            let Some(mut json) = b64
                .decode(data)
                .ok()
                .and_then(|d| serde_json::from_slice::<Value>(&d).ok())
            else {
                continue;
            };
            for key in ["impression_id", "click_id"] {
                if let Some(id) = json[key].as_str() {
                    json[key] = Value::String(format!("{id}-r{run}"));
                }
            }
            record["kinesis"]["data"] = Value::String(b64.encode(json.to_string()));
        }
    }
    serde_json::to_vec(&event).expect("JSON")
}

/// One fresh process of the function, handed one event.
fn run(
    f: &Function,
    r: &Resources,
    endpoint: &str,
    event: &[u8],
    run_id: usize,
    logs: &Path,
) -> anyhow::Result<Run> {
    let api = RuntimeApi::start(&r.function_arn(f.spec), f.spec.timeout)?;
    let mut env: BTreeMap<String, String> = r.local_aws_env(endpoint);
    env.extend(f.spec.env.clone());
    for (k, v) in [
        ("AWS_LAMBDA_RUNTIME_API", api.host_port()),
        ("AWS_LAMBDA_FUNCTION_NAME", f.spec.name.clone()),
        // Only reported in the handler's context; the process is not limited to it.
        ("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "1024".into()),
        ("AWS_LAMBDA_FUNCTION_VERSION", "$LATEST".into()),
        (
            "AWS_LAMBDA_LOG_GROUP_NAME",
            format!("/aws/lambda/{}", f.spec.name),
        ),
        ("AWS_LAMBDA_LOG_STREAM_NAME", format!("bench/run-{run_id}")),
    ] {
        env.insert(k.into(), v);
    }
    let log = std::fs::File::create(logs.join(format!("{}-{run_id}.log", f.spec.binary)))?;
    let started = Instant::now();
    let mut child = Command::new(&f.binary)
        .env_clear()
        .envs(&env)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()?;
    let pid = child.id();
    let result = (|| {
        let first = api.next_call(Duration::from_secs(120));
        let Some(Call::Next { at: asked }) = first else {
            anyhow::bail!("{} did not ask for an event: {first:?}", f.spec.binary);
        };
        let baseline_kib = proc_status_kib(pid, "VmRSS").unwrap_or_default();
        let delivered = Instant::now();
        api.deliver(event.to_vec());
        let answer = api.next_call(f.spec.timeout + Duration::from_secs(30));
        let Some(Call::Response { at, body, .. }) = answer else {
            anyhow::bail!("{} did not answer: {answer:?}", f.spec.binary);
        };
        let response: Value = serde_json::from_slice(&body)?;
        let failures = response["batchItemFailures"].as_array().map_or(0, Vec::len);
        anyhow::ensure!(
            failures == 0,
            "{} reported failures: {response}",
            f.spec.binary
        );
        // Everything of the invocation is done once it asks for the next event.
        let _ = api.next_call(Duration::from_secs(10));
        let peak_kib = proc_status_kib(pid, "VmHWM").unwrap_or_default();
        Ok(Run {
            init: asked - started,
            handled: at - delivered,
            baseline_kib,
            peak_kib,
        })
    })();
    let _ = child.kill();
    let _ = child.wait();
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn options_parse_with_their_defaults_and_refuse_typos_and_bad_values() {
        Args::command().debug_assert();
        let a = Args::try_parse_from(["function-bench"]).expect("defaults");
        assert!(
            a.runs == 7 && a.rss_runs == 3 && a.bin_dir == Path::new("target/release"),
            "{a:?}"
        );
        let a = Args::try_parse_from([
            "function-bench",
            "--runs",
            "2",
            "--rss-runs",
            "1",
            "--bin-dir",
            "target/debug",
        ])
        .expect("options");
        assert!(
            a.runs == 2 && a.rss_runs == 1 && a.bin_dir == Path::new("target/debug"),
            "{a:?}"
        );
        for args in [
            &["function-bench", "--run", "2"][..],
            &["function-bench", "--rss-runs", "-1"][..],
            &["function-bench", "--runs", "0"][..],
        ] {
            assert!(Args::try_parse_from(args).is_err(), "{args:?}");
        }
    }
}
