//! `adpipe`: the whole pipeline on a laptop, without an AWS account or Docker.
//!
//! Subcommands: `demo` (everything in one go), `up` (keep an endpoint running for
//! `cargo lambda watch`), `provision`, `generate`, `replay`, `run`, `query`, `chart`,
//! `export`, `redrive`, `env`. The command line is defined (and tested) in
//! `adpipe_local::cli`; `adpipe help <command>` lists a command's options.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use adpipe_core::join::rule::{attributes, JoinRules};
use adpipe_local::athena::{AthenaQueries, QueryEngine};
use adpipe_local::chart::{self, CHART_SQL};
use adpipe_local::cli::{
    Cli, Command, DemoArgs, EndpointArgs, GenerateArgs, QueryArgs, ReplayArgs, RunArgs, Stage,
    TrafficArgs, UpArgs,
};
use adpipe_local::endpoint::{endpoint_server, workspace_root, LocalEndpoint};
use adpipe_local::generator::{generate, Traffic};
use adpipe_local::lake::{named_queries, render_table, to_csv, QueryResult};
use adpipe_local::pipeline::{Functions, Pipeline};
use adpipe_local::progress::{thousands, Counter, Reporter};
use adpipe_local::redrive::redrive;
use adpipe_local::replay::{read_jsonl, send_rated, write_jsonl, Order};
use adpipe_local::resources::Resources;
use adpipe_local::runner::{RunOptions, RunReport, ShardKey};
use adpipe_local::stack::{self, StackTarget};
use adpipe_local::{events, status};
use anyhow::{anyhow, bail, Context, Result};
use clap::Parser;

fn local_dir(root: &Path) -> PathBuf {
    root.join(".local")
}

/// The endpoint to talk to: `--endpoint`, `ADPIPE_ENDPOINT`, or the one `up` recorded.
fn endpoint_of(a: &EndpointArgs, root: &Path) -> Result<LocalEndpoint> {
    let url = match a
        .endpoint
        .clone()
        .or_else(|| std::env::var("ADPIPE_ENDPOINT").ok())
    {
        Some(u) => u,
        None => std::fs::read_to_string(local_dir(root).join("endpoint"))
            .map(|s| s.trim().to_owned())
            .map_err(|_| {
                anyhow!("no endpoint: pass --endpoint URL, or start one with `adpipe up`")
            })?,
    };
    let e = LocalEndpoint::existing(&url);
    if !e.is_up() {
        bail!("the endpoint {url} does not answer (is `adpipe up` still running?)");
    }
    Ok(e)
}

/// Sends everything the functions print to stdout (their EMF metric lines, one per batch) to
/// a log file while alive, as CloudWatch Logs would receive it; the terminal keeps progress
/// and results.
struct StdoutToFile {
    saved: i32,
}

impl StdoutToFile {
    fn new(path: &Path) -> Result<StdoutToFile> {
        use std::io::Write;
        use std::os::fd::AsRawFd;
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let file =
            std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
        std::io::stdout().flush()?;
        // SAFETY: dup/dup2 only manipulate this process's descriptor table; fd 1 stays open
        // throughout (dup2 replaces it atomically), and `saved` is restored on drop.
        let saved = unsafe { libc::dup(1) };
        if saved < 0 || unsafe { libc::dup2(file.as_raw_fd(), 1) } < 0 {
            bail!("redirecting stdout: {}", std::io::Error::last_os_error());
        }
        Ok(StdoutToFile { saved })
    }
}

impl Drop for StdoutToFile {
    fn drop(&mut self) {
        use std::io::Write;
        let _ = std::io::stdout().flush();
        // SAFETY: `saved` is the descriptor dup'ed in `new`, still open.
        unsafe {
            libc::dup2(self.saved, 1);
            libc::close(self.saved);
        }
    }
}

fn stamp() -> String {
    chrono::Utc::now().format("%Y%m%dT%H%M%S").to_string()
}

fn step(text: &str) {
    eprintln!("\n== {text}");
}

#[tokio::main]
async fn main() {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    // Usage errors exit with clap's status 2 and its message; failures of a command with 1.
    let cli = Cli::parse();
    if let Err(e) = dispatch(cli).await {
        eprintln!("adpipe: {e:#}");
        std::process::exit(1);
    }
}

async fn dispatch(cli: Cli) -> Result<()> {
    let root = workspace_root();
    if let Some(stack) = &cli.stack {
        return on_stack(stack, cli.region.as_deref(), cli.command).await;
    }
    // The local stage is the only stage so far: every command below acts on it.
    let Stage::Local = cli.stage;
    match cli.command {
        Command::Demo(a) => demo(&a, &root).await,
        Command::Up(a) => up(&a, &root).await,
        Command::Provision(a) => {
            let p = pipeline(&a, &root).await?;
            let done = p.provision().await?;
            println!("created: {:?}\nexisting: {:?}", done.created, done.existing);
            Ok(())
        }
        Command::Generate(a) => generate_cmd(&a, &root).await,
        Command::Replay(a) => replay_cmd(&a, &root).await,
        Command::Run(a) => run_cmd(&a, &root).await,
        Command::Query(a) => query_cmd(&a, &root).await,
        Command::Chart(a) => {
            let p = pipeline(&a.endpoint, &root).await?;
            let out = a
                .out
                .unwrap_or_else(|| local_dir(&root).join("out/ctr.html"));
            let (imps, clicks) = write_chart(&p, &out, "local lake").await?;
            println!(
                "chart: {} ({} impressions, {} attributed clicks)",
                out.display(),
                thousands(imps),
                thousands(clicks)
            );
            Ok(())
        }
        Command::Export(a) => {
            let p = pipeline(&a.endpoint, &root).await?;
            let out = a.out.unwrap_or_else(|| local_dir(&root).join("out/lake"));
            export(&p, &out).await
        }
        Command::Redrive(a) => {
            let p = pipeline(&a, &root).await?;
            let done = p.redrive().await?;
            println!(
                "redrove {} records ({} joined-stream records flagged recovered) of {} discarded batches from {} (run `adpipe run` to process them)",
                thousands(done.records),
                thousands(done.flagged),
                thousands(done.batches),
                p.resources.on_failure_queue
            );
            Ok(())
        }
        Command::Env(a) => {
            let e = endpoint_of(&a, &root)?;
            print!("{}", Resources::local().lambda_env_file(&e.url));
            Ok(())
        }
        Command::Events(a) => {
            let out = a.out.unwrap_or_else(|| root.join("events"));
            let written = events::write_all(&out, &events::StageNames::local())?;
            println!(
                "wrote {} events for the local stage to {}",
                written.len(),
                out.display()
            );
            Ok(())
        }
        Command::Status(a) => {
            let p = pipeline(&a, &root).await?;
            print!("{}", status::render(&status::local(&p).await?));
            Ok(())
        }
        Command::EmptyBuckets(_) => bail!(
            "`adpipe empty-buckets` acts on a deployed stack only (--stack NAME); the local endpoint's buckets go with it"
        ),
    }
}

/// A command against a deployed stack (`--stack NAME [--region R]`): names from the stack's
/// outputs, clients from the default credential chain.
async fn on_stack(stack: &str, region: Option<&str>, command: Command) -> Result<()> {
    let refuse_endpoint = |e: &EndpointArgs| {
        if e.endpoint.is_some() {
            bail!("--endpoint is for the local stage; --stack {stack} uses the stack's region and the AWS credential chain");
        }
        Ok(())
    };
    let unsupported = |what: &str, why: &str| {
        bail!("`adpipe {what}` acts on the local stage only{why}; against --stack NAME there are generate, replay, query, redrive, status, events, env and empty-buckets")
    };
    // Check what runs before the credential chain is asked anything.
    match &command {
        Command::Generate(a) => refuse_endpoint(&a.endpoint)?,
        Command::Replay(a) => {
            refuse_endpoint(&a.endpoint)?;
            if a.run {
                bail!("--run drives the local functions; against --stack {stack} the deployed functions read the streams");
            }
        }
        Command::Redrive(a) => refuse_endpoint(a)?,
        Command::Demo(_) => return unsupported("demo", ""),
        Command::Up(_) => return unsupported("up", ""),
        Command::Provision(_) => {
            return unsupported("provision", " (sam deploy creates the stack's resources)")
        }
        Command::Run(_) => {
            return unsupported(
                "run",
                " (the deployed event source mappings run the functions)",
            )
        }
        Command::Query(a) => refuse_endpoint(&a.endpoint)?,
        Command::Status(a) | Command::Env(a) => refuse_endpoint(a)?,
        Command::Events(_) | Command::EmptyBuckets(_) => {}
        Command::Chart(_) => {
            return unsupported("chart", " (the stack's dashboard charts CTR per minute)")
        }
        Command::Export(_) => return unsupported("export", " (Athena reads the tables in place)"),
    }
    let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest());
    if let Some(r) = region {
        loader = loader.region(aws_config::Region::new(r.to_owned()));
    }
    let sdk = loader.load().await;
    let cfn = aws_sdk_cloudformation::Client::new(&sdk);
    let target = StackTarget::resolve(&cfn, stack).await?;
    let kinesis = aws_sdk_kinesis::Client::new(&sdk);
    let send = |imps: Records, clicks: Records, order: Order, rate: Option<f64>| {
        let (kinesis, target) = (kinesis.clone(), target.clone());
        async move {
            let counters = (
                Counter::new("impressions", imps.len() as u64),
                Counter::new("clicks", clicks.len() as u64),
            );
            let reporter = Reporter::start("send", vec![counters.0.clone(), counters.1.clone()]);
            let started = Instant::now();
            send_rated(
                &kinesis,
                &target.impressions_stream,
                &target.clicks_stream,
                &imps,
                &clicks,
                order,
                rate,
                &counters,
            )
            .await?;
            drop(reporter);
            println!(
                "sent {} impression and {} click records to {} and {} (stack {}) in {:.1}s",
                thousands(imps.len() as u64),
                thousands(clicks.len() as u64),
                target.impressions_stream,
                target.clicks_stream,
                target.stack,
                started.elapsed().as_secs_f64()
            );
            anyhow::Ok(())
        }
    };
    match command {
        Command::Generate(a) => {
            let traffic = generate(&a.traffic.config(adpipe_lambda::now_ms()))?;
            if let Some(dir) = &a.out {
                return write_traffic(&traffic, &a.traffic, dir);
            }
            let (imps, clicks) = a.traffic.records(&traffic);
            send(imps, clicks, a.order, a.rate).await
        }
        Command::Replay(a) => {
            let (imps, clicks) = read_replay_files(&a)?;
            send(imps, clicks, a.order, None).await
        }
        Command::Redrive(_) => {
            let sqs = aws_sdk_sqs::Client::new(&sdk);
            let done = redrive(
                &kinesis,
                &sqs,
                &target.on_failure_queue_url,
                &target.joined_stream,
            )
            .await?;
            println!(
                "redrove {} records ({} joined-stream records flagged recovered) of {} discarded batches from {} (stack {})",
                thousands(done.records),
                thousands(done.flagged),
                thousands(done.batches),
                target.on_failure_queue_url,
                target.stack
            );
            Ok(())
        }
        Command::Query(a) => {
            let engine = AthenaQueries {
                client: aws_sdk_athena::Client::new(&sdk),
                workgroup: target.output(stack::WORKGROUP_OUTPUT)?.to_owned(),
                database: target.output(stack::GLUE_DATABASE_OUTPUT)?.to_owned(),
                timeout: Duration::from_secs(a.timeout_s),
            };
            let root = workspace_root();
            let files = query_files(&a.file, a.sql_dir.as_deref(), &root);
            let csv = local_dir(&root).join("out").join(stack).join("queries");
            print_queries(&engine, &files, &csv, 40).await
        }
        Command::Status(_) => {
            print!(
                "{}",
                status::render(&status::stack(&sdk, &target, None).await?)
            );
            Ok(())
        }
        Command::Env(_) => {
            print!("{}", target.lambda_env_file()?);
            Ok(())
        }
        Command::EmptyBuckets(a) => {
            let s3 = aws_sdk_s3::Client::new(&sdk);
            for bucket in target.disposable_buckets()? {
                let n = stack::empty_bucket(&s3, &bucket, !a.yes).await?;
                if a.yes {
                    println!(
                        "{bucket}: deleted {} object versions and delete markers",
                        thousands(n)
                    );
                } else {
                    println!("{bucket}: {} object versions and delete markers (add --yes to delete them)", thousands(n));
                }
            }
            if a.yes {
                println!("now: sam delete --stack-name {}", target.stack);
            }
            Ok(())
        }
        Command::Events(a) => {
            let names = events::StageNames::from_stream_arns(
                target.output(stack::IMPRESSIONS_STREAM_ARN_OUTPUT)?,
                target.output(stack::CLICKS_STREAM_ARN_OUTPUT)?,
                target.output(stack::JOINED_STREAM_ARN_OUTPUT)?,
                target.outputs.get("JoinerRoleArn").map(String::as_str),
                target.outputs.get("EnricherRoleArn").map(String::as_str),
            )?;
            let out = a
                .out
                .unwrap_or_else(|| local_dir(&workspace_root()).join("events").join(stack));
            let written = events::write_all(&out, &names)?;
            println!(
                "wrote {} events for stack {stack} to {} (e.g. sam remote invoke JoinerFunction --stack-name {stack} --event-file {})",
                written.len(),
                out.display(),
                out.join("impressions.json").display()
            );
            Ok(())
        }
        _ => unreachable!("refused above"),
    }
}

async fn pipeline(a: &EndpointArgs, root: &Path) -> Result<Pipeline> {
    let e = endpoint_of(a, root)?;
    Ok(Pipeline::connect(e, Resources::local(), root).await)
}

/// The named queries: the `--file`s, else every `*.sql` of `--sql-dir` (default `sql/`).
fn query_files(files: &[PathBuf], sql_dir: Option<&Path>, root: &Path) -> Vec<PathBuf> {
    if !files.is_empty() {
        return files.to_vec();
    }
    named_queries(&sql_dir.map_or_else(|| root.join("sql"), Path::to_path_buf))
}

async fn query_cmd(a: &QueryArgs, root: &Path) -> Result<()> {
    let p = pipeline(&a.endpoint, root).await?;
    let files = query_files(&a.file, a.sql_dir.as_deref(), root);
    print_queries(&p.lake(), &files, &local_dir(root).join("out/queries"), 40).await
}

/// Prints each query's result (up to `max_rows` rows) and writes the full results as CSV.
async fn print_queries(
    engine: &impl QueryEngine,
    files: &[PathBuf],
    csv_dir: &Path,
    max_rows: usize,
) -> Result<()> {
    if files.is_empty() {
        println!(
            "(no named queries found: sql/*.sql is empty or missing; pass --sql-dir or --file)"
        );
        return Ok(());
    }
    let results = engine.query(files).await?;
    std::fs::create_dir_all(csv_dir)?;
    for r in &results {
        println!("\n-- {} ({} rows)", r.name, r.rows.len());
        print!("{}", render_table(r, max_rows));
        let csv = csv_dir.join(r.name.replace(".sql", ".csv"));
        std::fs::write(&csv, to_csv(r))?;
    }
    println!("\n(full results as CSV in {})", csv_dir.display());
    Ok(())
}

/// Writes the chart; returns the lake's impressions and attributed clicks.
async fn write_chart(p: &Pipeline, out: &Path, subtitle: &str) -> Result<(u64, u64)> {
    let dir = local_dir(&p.root).join("out");
    std::fs::create_dir_all(&dir)?;
    let sql = dir.join("chart_ctr_per_campaign_minute.sql");
    std::fs::write(&sql, CHART_SQL)?;
    let results: Vec<QueryResult> = p.lake().query(&[sql]).await?;
    let result = results
        .first()
        .ok_or_else(|| anyhow!("the chart query returned nothing"))?;
    let points = chart::points(result).map_err(|e| anyhow!(e))?;
    let page = chart::html(
        &points,
        "adpipe: CTR per campaign per minute",
        &format!(
            "From the Iceberg tables impressions and enriched_clicks ({subtitle}), read by DuckDB."
        ),
    );
    if let Some(d) = out.parent() {
        std::fs::create_dir_all(d)?;
    }
    std::fs::write(out, page)?;
    Ok((
        points.iter().map(|p| p.impressions).sum(),
        points.iter().map(|p| p.clicks).sum(),
    ))
}

async fn export(p: &Pipeline, out: &Path) -> Result<()> {
    for t in p.lake().export(out).await? {
        println!(
            "exported {}: {} rows -> {}",
            t.table,
            thousands(t.rows),
            t.path.display()
        );
    }
    Ok(())
}

/// Sends traffic with progress.
async fn send_traffic(
    p: &Pipeline,
    impressions: &[Vec<u8>],
    clicks: &[Vec<u8>],
    order: Order,
    rate: Option<f64>,
) -> Result<Duration> {
    let counters = (
        Counter::new("impressions", impressions.len() as u64),
        Counter::new("clicks", clicks.len() as u64),
    );
    let reporter = Reporter::start("send", vec![counters.0.clone(), counters.1.clone()]);
    let started = Instant::now();
    p.send(impressions, clicks, order, rate, &counters).await?;
    drop(reporter);
    Ok(started.elapsed())
}

/// Runs the mappings with progress; function stdout goes to `log`.
async fn run_with_progress(
    p: &Pipeline,
    f: &Functions,
    options: RunOptions,
    log: &Path,
) -> Result<RunReport> {
    let mappings = p.mappings(f).await?;
    let mut counters = Vec::new();
    let mut watchers = Vec::new();
    for stage in &mappings {
        for m in stage {
            let c = Counter::new(m.name.replace(" <- ", "<-"), 0);
            counters.push(c.clone());
            watchers.push((c, m.stats.clone()));
        }
    }
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    // Mirror the runner's live counts into the progress counters.
    let mirror = std::thread::spawn(move || {
        let mut last: Vec<u64> = vec![0; watchers.len()];
        while !flag.load(Ordering::Relaxed) {
            for (i, (c, s)) in watchers.iter().enumerate() {
                let done = s.snapshot().records_done;
                c.add(done.saturating_sub(last[i]));
                last[i] = done;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    });
    let reporter = Reporter::start("run (records done per mapping)", counters);
    let capture = StdoutToFile::new(log)?;
    let result = p.run(f, mappings, options).await;
    drop(capture);
    std::thread::sleep(Duration::from_millis(250));
    stop.store(true, Ordering::Relaxed);
    let _ = mirror.join();
    drop(reporter);
    Ok(result?)
}

fn print_run_summary(report: &RunReport, f: &Functions) {
    println!("\nevent source mappings:");
    for (name, c) in &report.mappings {
        println!(
            "  {name:<32} read {:>8}  invocations {:>6}  retried {:>4}  bisected {:>3}  discarded {:>3}",
            thousands(c.records_read),
            thousands(c.invocations),
            c.retries,
            c.bisections,
            c.discarded
        );
    }
    let j = f.joiner.totals();
    println!(
        "joiner:   {} records, {} impressions, {} clicks, {} joined, {} impressions forwarded, {} duplicates ignored, {} unmatched, {} late, {} rejected",
        thousands(j.records_in),
        thousands(j.impressions),
        thousands(j.clicks),
        thousands(j.joined),
        thousands(j.forwarded),
        thousands(j.duplicates),
        thousands(j.unmatched),
        thousands(j.late),
        thousands(j.rejected_total())
    );
    if !j.rejected.is_empty() {
        let reasons: Vec<String> = j
            .rejected
            .iter()
            .map(|(r, n)| format!("{}={n}", r.as_str()))
            .collect();
        println!("          rejected by reason: {}", reasons.join(", "));
    }
    let e = f.enricher.totals();
    println!(
        "enricher: {} records, {} rows written in {} files ({} KiB), {} duplicates dropped, {} failed batches",
        thousands(e.counts.records_in),
        thousands(e.rows_written),
        e.files_written,
        e.bytes_written / 1024,
        e.duplicates_dropped,
        e.failed_batches
    );
}

/// The pairs the traffic must produce, by the join rule, from the distinct events.
fn expected_pairs(t: &Traffic) -> u64 {
    let rules = JoinRules::default();
    let by_id: BTreeMap<&str, &adpipe_core::model::Impression> = t
        .impressions
        .iter()
        .map(|i| (i.impression_id.as_str(), i))
        .collect();
    t.clicks
        .iter()
        .filter(|c| {
            by_id
                .get(c.impression_id.as_str())
                .is_some_and(|i| attributes(&rules, i, c))
        })
        .count() as u64
}

async fn demo(a: &DemoArgs, root: &Path) -> Result<()> {
    let total = Instant::now();
    let out = a.out.clone().unwrap_or_else(|| local_dir(root).join("out"));
    let cfg = a.traffic.config(adpipe_lambda::now_ms());

    step("local AWS endpoint (moto from .venv, requests applied one at a time)");
    let program = endpoint_server(root)?;
    let endpoint = LocalEndpoint::start(&program, None, &local_dir(root).join("logs"))?;
    eprintln!("endpoint {} (log {})", endpoint.url, endpoint.log.display());
    let p = Pipeline::connect(endpoint, Resources::local(), root).await;

    step("provision streams, tables, buckets");
    let t = Instant::now();
    let done = p.provision().await?;
    eprintln!(
        "{} resources created in {:.1}s",
        done.created.len(),
        t.elapsed().as_secs_f64()
    );

    step(&format!(
        "generate {} impressions (seed {}, CTR {}, {} campaigns over {} minutes)",
        thousands(cfg.impressions as u64),
        cfg.seed,
        cfg.ctr,
        cfg.campaigns,
        cfg.duration_ms / 60_000
    ));
    let traffic = generate(&cfg)?;
    let s = traffic.stats;
    eprintln!(
        "{} impressions, {} clicks ({} inside the window, {} slightly before, {} beyond), {} duplicate and {} out-of-order deliveries, {} malformed records",
        thousands(traffic.impressions.len() as u64),
        thousands(traffic.clicks.len() as u64),
        s.clicks_inside,
        s.clicks_before,
        s.clicks_beyond,
        s.duplicates,
        s.out_of_order,
        s.malformed
    );
    let input = (traffic.impression_records.len() + traffic.click_records.len()) as u64;
    let (imps, clicks) = a.traffic.records(&traffic);
    if a.traffic.kpl.is_some() {
        eprintln!(
            "sent as {} KPL-aggregated and plain Kinesis records (--kpl)",
            thousands((imps.len() + clicks.len()) as u64)
        );
    }

    // The traffic goes out while the functions run, as producers and Lambda overlap in
    // production, so the attribution latency below means what it says.
    step("send the traffic while the joiner and enricher run through their event source mappings, until drained");
    let functions = p.functions()?;
    let log = local_dir(root).join(format!("logs/functions-{}.log", stamp()));
    let mut options = RunOptions::drain(&p.resources.region);
    let producers = Arc::new(AtomicBool::new(false));
    options.producers_done = producers.clone();
    let (send_time, report) = tokio::join!(
        async {
            let sent = send_traffic(&p, &imps, &clicks, Order::Interleaved, a.rate).await;
            producers.store(true, Ordering::SeqCst);
            sent
        },
        run_with_progress(&p, &functions, options, &log)
    );
    let (send_time, report) = (send_time?, report?);
    print_run_summary(&report, &functions);
    println!("function output (EMF metric lines): {}", log.display());
    let kinesis = &p.clients.kinesis;
    let latencies = adpipe_local::latency::attribution_latencies(
        &adpipe_local::latency::read_with_arrival(kinesis, &p.resources.clicks_stream.name).await?,
        &adpipe_local::latency::read_with_arrival(kinesis, &p.resources.joined_stream.name).await?,
    );
    let pct = |q| adpipe_local::latency::percentile(&latencies, q).unwrap_or_default();

    step("named queries (sql/*.sql) on the lake, by DuckDB");
    let mut files = query_files(&[], a.sql_dir.as_deref(), root);
    files.sort_by_key(|f| {
        let name = f
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        // CTR and engagement first: they are what the demo is about.
        (
            !name.starts_with("ctr_per_campaign_per_minute"),
            !name.starts_with("engagement_by_device"),
            name,
        )
    });
    print_queries(&p.lake(), &files, &out.join("queries"), 25).await?;

    step("CTR chart");
    let chart_path = out.join("ctr.html");
    let (lake_imps, lake_clicks) = write_chart(&p, &chart_path, "adpipe demo").await?;
    println!("chart: {}", chart_path.display());

    step("export the lake as Parquet");
    export(&p, &out.join("lake")).await?;

    let expected = expected_pairs(&traffic);
    println!(
        "\nlake check: {} impressions (generated {}), {} attributed clicks (join rule on the generated events: {})",
        thousands(lake_imps),
        thousands(traffic.impressions.len() as u64),
        thousands(lake_clicks),
        thousands(expected)
    );
    let run_s = report.elapsed.as_secs_f64();
    println!(
        "attribution latency (a click's arrival on the clicks stream to its joined record on the joined stream, {} clicks): p50 {} ms, p99 {} ms",
        thousands(latencies.len() as u64),
        pct(50.0),
        pct(99.0)
    );
    println!(
        "timing: send {:.1}s ({:.0} records/s, while the functions ran), run {:.1}s ({:.0} input events/s through router, joiner and enricher), total {:.1}s",
        send_time.as_secs_f64(),
        input as f64 / send_time.as_secs_f64().max(1e-3),
        run_s,
        input as f64 / run_s.max(1e-3),
        total.elapsed().as_secs_f64()
    );
    if lake_imps != traffic.impressions.len() as u64 || lake_clicks != expected {
        bail!("the lake does not hold what the traffic should produce (see above)");
    }
    Ok(())
}

async fn up(a: &UpArgs, root: &Path) -> Result<()> {
    let port = a.port;
    let program = endpoint_server(root)?;
    let endpoint = LocalEndpoint::start(&program, Some(port), &local_dir(root).join("logs"))?;
    let p = Pipeline::connect(endpoint.clone(), Resources::local(), root).await;
    p.provision().await?;
    // The Glue database and tables, as the template creates them.
    let f = p.functions()?;
    f.enricher
        .warm_up()
        .await
        .map_err(|e| anyhow!("creating the lake tables: {e}"))?;
    let dir = local_dir(root);
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("endpoint"), format!("{}\n", endpoint.url))?;
    std::fs::write(
        dir.join("lambda.env"),
        p.resources.lambda_env_file(&endpoint.url),
    )?;
    let _ = std::fs::remove_file(checkpoint_file(root));
    println!(
        "local endpoint: {} (log {})",
        endpoint.url,
        endpoint.log.display()
    );
    println!("resources provisioned; function environment written to .local/lambda.env");
    println!();
    println!("In another terminal:");
    println!(
        "  export PATH=\"$PWD/.venv/bin:$PATH\"      # cargo-lambda (scripts/lambda-tools.sh)"
    );
    println!("  cargo lambda watch --env-file .local/lambda.env");
    println!("  cargo lambda invoke joiner --data-file events/impressions.json");
    println!("  cargo lambda invoke enricher --data-file events/joined.json");
    println!("Or drive the pipeline here: adpipe generate / replay / run / query / chart");
    println!();
    println!("For other tools, the endpoint's environment:");
    for (k, v) in p.resources.local_aws_env(&endpoint.url) {
        println!("  export {k}={v}");
    }
    println!("\nRunning until Ctrl-C.");
    // Ctrl-C ends the process, and with it the server (it is tied to this process).
    loop {
        std::thread::park();
    }
}

fn checkpoint_file(root: &Path) -> PathBuf {
    local_dir(root).join("checkpoints.json")
}

fn load_checkpoints(root: &Path) -> BTreeMap<ShardKey, String> {
    let Ok(text) = std::fs::read_to_string(checkpoint_file(root)) else {
        return BTreeMap::new();
    };
    let list: Vec<(String, String, String)> = serde_json::from_str(&text).unwrap_or_default();
    list.into_iter().map(|(s, sh, cp)| ((s, sh), cp)).collect()
}

fn save_checkpoints(root: &Path, cps: &BTreeMap<ShardKey, String>) -> Result<()> {
    let list: Vec<(&String, &String, &String)> =
        cps.iter().map(|((s, sh), cp)| (s, sh, cp)).collect();
    std::fs::create_dir_all(local_dir(root))?;
    std::fs::write(checkpoint_file(root), serde_json::to_string_pretty(&list)?)?;
    Ok(())
}

/// Runs the mappings from the saved checkpoints (so repeated runs against one `up` endpoint
/// resume where the last stopped) and saves where they stopped.
async fn run_saved(p: &Pipeline, root: &Path, producers_done: Arc<AtomicBool>) -> Result<()> {
    let functions = p.functions()?;
    let mut options = RunOptions::drain(&p.resources.region);
    options.checkpoints = load_checkpoints(root);
    options.producers_done = producers_done;
    let log = local_dir(root).join(format!("logs/functions-{}.log", stamp()));
    let report = run_with_progress(p, &functions, options, &log).await?;
    save_checkpoints(root, &report.checkpoints)?;
    print_run_summary(&report, &functions);
    println!("function output (EMF metric lines): {}", log.display());
    Ok(())
}

async fn run_cmd(a: &RunArgs, root: &Path) -> Result<()> {
    let p = pipeline(&a.endpoint, root).await?;
    // --follow: never declare the producers done, so the run follows the streams.
    let done = Arc::new(AtomicBool::new(!a.follow));
    run_saved(&p, root, done).await
}

async fn generate_cmd(a: &GenerateArgs, root: &Path) -> Result<()> {
    let cfg = a.traffic.config(adpipe_lambda::now_ms());
    let traffic = generate(&cfg)?;
    eprintln!(
        "generated {} impressions and {} clicks ({} impression and {} click records, {} malformed)",
        thousands(traffic.impressions.len() as u64),
        thousands(traffic.clicks.len() as u64),
        thousands(traffic.impression_records.len() as u64),
        thousands(traffic.click_records.len() as u64),
        traffic.stats.malformed
    );
    if let Some(dir) = &a.out {
        return write_traffic(&traffic, &a.traffic, dir);
    }
    let p = pipeline(&a.endpoint, root).await?;
    let (imps, clicks) = a.traffic.records(&traffic);
    let took = send_traffic(&p, &imps, &clicks, a.order, a.rate).await?;
    println!("sent in {:.1}s", took.as_secs_f64());
    Ok(())
}

/// Writes generated traffic as `impressions.jsonl` and `clicks.jsonl` into `dir`.
fn write_traffic(traffic: &Traffic, args: &TrafficArgs, dir: &Path) -> Result<()> {
    if args.kpl.is_some() {
        bail!("--kpl sends binary aggregates; JSONL (--out) holds one text record per line, so they do not go together");
    }
    write_jsonl(&dir.join("impressions.jsonl"), &traffic.impression_records)?;
    write_jsonl(&dir.join("clicks.jsonl"), &traffic.click_records)?;
    println!(
        "wrote {} and {}",
        dir.join("impressions.jsonl").display(),
        dir.join("clicks.jsonl").display()
    );
    Ok(())
}

/// Raw records, one per stream record.
type Records = Vec<Vec<u8>>;

/// The records of `--impressions` and `--clicks` (at least one of them holds some).
fn read_replay_files(a: &ReplayArgs) -> Result<(Records, Records)> {
    let imps = match &a.impressions {
        Some(f) => read_jsonl(f)?,
        None => Vec::new(),
    };
    let clicks = match &a.clicks {
        Some(f) => read_jsonl(f)?,
        None => Vec::new(),
    };
    if imps.is_empty() && clicks.is_empty() {
        bail!("nothing to replay: the files hold no records");
    }
    Ok((imps, clicks))
}

async fn replay_cmd(a: &ReplayArgs, root: &Path) -> Result<()> {
    let (imps, clicks) = read_replay_files(a)?;
    let order = a.order;
    let p = pipeline(&a.endpoint, root).await?;
    if !a.run {
        send_traffic(&p, &imps, &clicks, order, None).await?;
        return Ok(());
    }
    match order {
        // Clicks are sent and processed (the joiner buffers them) before any impression.
        Order::ClicksFirst => {
            send_traffic(&p, &[], &clicks, order, None).await?;
            run_saved(&p, root, Arc::new(AtomicBool::new(true))).await?;
            send_traffic(&p, &imps, &[], order, None).await?;
            run_saved(&p, root, Arc::new(AtomicBool::new(true))).await
        }
        Order::Interleaved => {
            // The functions run while the records arrive, as they would on AWS.
            let done = Arc::new(AtomicBool::new(false));
            let flag = done.clone();
            let sender = async {
                let r = send_traffic(&p, &imps, &clicks, order, None).await;
                flag.store(true, Ordering::SeqCst);
                r
            };
            let (sent, ran) = futures::join!(sender, run_saved(&p, root, done));
            sent?;
            ran
        }
    }
}
