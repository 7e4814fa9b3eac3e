//! The `adpipe` command line (clap derive): commands, options with their defaults, and the
//! value checks that turn a bad value into an error instead of a silent default.
//!
//! The binary (`src/main.rs`) only dispatches on what this parses, so every option and every
//! refusal has a unit test here (`Cli::try_parse_from`).

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::generator::{DelayMix, Traffic, TrafficConfig};
use crate::replay::Order;

/// The demo's default size: about 20k events pass the local endpoint in a few minutes (moto
/// answers some 200-300 requests/s and the joiner makes about one request per event).
pub const DEFAULT_IMPRESSIONS: usize = 20_000;

/// The port `adpipe up` listens on, LocalStack's, so tools configured for it work unchanged.
pub const DEFAULT_PORT: u16 = 4566;

/// adpipe's pipeline on a local AWS-compatible endpoint (moto from .venv).
#[derive(Debug, Parser)]
#[command(
    name = "adpipe",
    version,
    arg_required_else_help = true,
    after_help = "Every command but demo and up talks to --endpoint URL (default: \
                  $ADPIPE_ENDPOINT, else the endpoint `adpipe up` recorded in .local/endpoint)."
)]
pub struct Cli {
    /// Where the commands act (without --stack).
    #[arg(long, global = true, value_enum, default_value_t = Stage::Local)]
    pub stage: Stage,
    /// Act on this deployed stack instead, with names from its CloudFormation outputs and the
    /// default AWS credential chain (generate, replay, query, redrive, status, events, env)
    /// [default: none]
    #[arg(long, global = true, value_name = "NAME", conflicts_with = "stage")]
    pub stack: Option<String>,
    /// Region of --stack [default: the credential chain's (AWS_REGION, the profile)]
    #[arg(long, global = true, value_name = "R", requires = "stack")]
    pub region: Option<String>,
    #[command(subcommand)]
    pub command: Command,
}

/// A stage `--stage` can name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Stage {
    /// The local endpoint, with the resource names of deploy/resources.json.
    Local,
}

#[derive(Debug, PartialEq, Subcommand)]
pub enum Command {
    /// Start an endpoint, provision, generate traffic, run both functions until the streams
    /// are drained, print the named queries, write the CTR chart, export the lake.
    Demo(DemoArgs),
    /// Start the endpoint on a fixed port, provision, write .local/lambda.env for
    /// `cargo lambda watch --env-file .local/lambda.env`, and keep running (Ctrl-C stops).
    Up(UpArgs),
    /// Create the streams, tables and buckets (idempotent).
    Provision(EndpointArgs),
    /// Send generated traffic to the input streams, or write it as JSONL with --out DIR.
    Generate(GenerateArgs),
    /// Send JSONL files of raw records (one per line, bytes unchanged) to the input streams.
    Replay(ReplayArgs),
    /// Run the event source mappings until the streams are drained, resuming from the
    /// checkpoints the last run saved.
    Run(RunArgs),
    /// Run the named queries (sql/*.sql) against the lake, by DuckDB.
    Query(QueryArgs),
    /// Write the CTR-over-time chart (CTR per campaign per minute) as HTML.
    Chart(ChartArgs),
    /// Write each lake table as Parquet.
    Export(ExportArgs),
    /// Put the records of batches the mappings gave up on (the on-failure queue holds pointers
    /// to them) back on their streams, and delete the handled messages.
    Redrive(EndpointArgs),
    /// Print the functions' environment (for `cargo lambda watch --env-file`): the local
    /// endpoint's, or with --stack the stack's resource names.
    Env(EndpointArgs),
    /// Write the sample Lambda events (events/*.json) with this stage's or stack's stream
    /// names and ARNs, for `cargo lambda invoke --data-file` and `sam remote invoke`.
    Events(EventsArgs),
    /// Show iterator age, the on-failure queue, dead letters and the tables' last commits.
    Status(EndpointArgs),
    /// With --stack only, before `sam delete` of a stage deployed with RetainData=false:
    /// delete every object version and delete marker in the stack's buckets (lake, Athena
    /// results, CloudTrail logs), so CloudFormation can delete them. Refuses a stack that
    /// keeps its data.
    EmptyBuckets(EmptyBucketsArgs),
}

#[derive(Debug, Clone, PartialEq, Eq, Args)]
pub struct EventsArgs {
    /// Directory to write the events to [default: events/ of the workspace for the local
    /// stage, .local/events/<stack> with --stack]
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
}

/// The endpoint of a running `adpipe up`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Args)]
pub struct EndpointArgs {
    /// URL of the local endpoint [default: $ADPIPE_ENDPOINT, else the one `adpipe up` recorded
    /// in .local/endpoint]
    #[arg(long, value_name = "URL")]
    pub endpoint: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Args)]
pub struct DemoArgs {
    #[command(flatten)]
    pub traffic: TrafficArgs,
    /// Directory of the named queries [default: sql/ of the workspace]
    #[arg(long, value_name = "DIR")]
    pub sql_dir: Option<PathBuf>,
    /// Directory for query results, chart and export [default: .local/out of the workspace]
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// Records per second over both streams, sent while the functions run [default: as fast
    /// as the endpoint takes them]. The endpoint answers one request at a time, so a full-speed
    /// send delays the functions' reads, and the attribution latency with them
    #[arg(long, value_name = "RECORDS_PER_S", value_parser = positive_rate)]
    pub rate: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Args)]
pub struct UpArgs {
    /// Port of the endpoint on 127.0.0.1
    #[arg(long, default_value_t = DEFAULT_PORT)]
    pub port: u16,
}

#[derive(Debug, Clone, PartialEq, Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub endpoint: EndpointArgs,
    #[command(flatten)]
    pub traffic: TrafficArgs,
    /// Records per second over both streams [default: as fast as the endpoint takes them]
    #[arg(long, value_name = "RECORDS_PER_S", value_parser = positive_rate)]
    pub rate: Option<f64>,
    /// Write impressions.jsonl and clicks.jsonl into DIR instead of sending them [default: send
    /// them to the input streams]
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// In which order the streams receive the records
    #[arg(long, value_enum, default_value_t = Order::Interleaved)]
    pub order: Order,
}

#[derive(Debug, Clone, PartialEq, Eq, Args)]
#[command(group = clap::ArgGroup::new("input").required(true).multiple(true))]
pub struct ReplayArgs {
    #[command(flatten)]
    pub endpoint: EndpointArgs,
    /// JSONL file of impression records [default: none]
    #[arg(long, value_name = "FILE", group = "input")]
    pub impressions: Option<PathBuf>,
    /// JSONL file of click records [default: none]
    #[arg(long, value_name = "FILE", group = "input")]
    pub clicks: Option<PathBuf>,
    /// In which order the streams receive the records (with --run and clicks-first, every
    /// click is processed before any impression is sent)
    #[arg(long, value_enum, default_value_t = Order::Interleaved)]
    pub order: Order,
    /// Run the functions too, until the streams are drained
    #[arg(long)]
    pub run: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub endpoint: EndpointArgs,
    /// Keep following the streams until Ctrl-C (saves no checkpoints)
    #[arg(long)]
    pub follow: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Args)]
pub struct QueryArgs {
    #[command(flatten)]
    pub endpoint: EndpointArgs,
    /// Directory of the named queries [default: sql/ of the workspace]
    #[arg(long, value_name = "DIR")]
    pub sql_dir: Option<PathBuf>,
    /// Run only this query file (repeatable) [default: every *.sql of --sql-dir]
    #[arg(long, value_name = "F.sql", conflicts_with = "sql_dir")]
    pub file: Vec<PathBuf>,
    /// With --stack: seconds one Athena query may run before it is stopped
    #[arg(long, value_name = "S", default_value_t = 300, value_parser = clap::value_parser!(u64).range(1..))]
    pub timeout_s: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Args)]
pub struct ChartArgs {
    #[command(flatten)]
    pub endpoint: EndpointArgs,
    /// The chart's HTML file [default: .local/out/ctr.html of the workspace]
    #[arg(long, value_name = "FILE.html")]
    pub out: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq, Eq, Args)]
pub struct EmptyBucketsArgs {
    /// Really delete: without it, only count what would be deleted
    #[arg(long)]
    pub yes: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Args)]
pub struct ExportArgs {
    #[command(flatten)]
    pub endpoint: EndpointArgs,
    /// Directory for the Parquet files [default: .local/out/lake of the workspace]
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
}

/// The traffic generator's knobs (`TrafficConfig`), with its defaults.
#[derive(Debug, Clone, PartialEq, Args)]
#[command(next_help_heading = "Traffic options")]
pub struct TrafficArgs {
    /// Distinct impressions to generate
    #[arg(long, value_name = "N", default_value_t = DEFAULT_IMPRESSIONS)]
    pub impressions: usize,
    /// Seed of the generator (the same seed gives the same traffic)
    #[arg(long, value_name = "N", default_value_t = TrafficConfig::default().seed)]
    pub seed: u64,
    /// Campaigns
    #[arg(long, value_name = "N", default_value_t = TrafficConfig::default().campaigns,
          value_parser = at_least_one)]
    pub campaigns: usize,
    /// Ads
    #[arg(long, value_name = "N", default_value_t = TrafficConfig::default().ads,
          value_parser = at_least_one)]
    pub ads: usize,
    /// Publishers
    #[arg(long, value_name = "N", default_value_t = TrafficConfig::default().publishers,
          value_parser = at_least_one)]
    pub publishers: usize,
    /// Mean click-through rate (varies by campaign and over time)
    #[arg(long, value_name = "P", default_value_t = TrafficConfig::default().ctr,
          value_parser = share)]
    pub ctr: f64,
    /// Share of clicked impressions clicked a second time
    #[arg(long, value_name = "P", default_value_t = TrafficConfig::default().second_click,
          value_parser = share)]
    pub second_click: f64,
    /// Impression times spread over this many minutes
    #[arg(long, value_name = "N", default_value_t = TrafficConfig::default().duration_ms / 60_000,
          value_parser = clap::value_parser!(i64).range(1..))]
    pub minutes: i64,
    /// Event time of the first impression (RFC 3339) [default: the start of the last --minutes
    /// whole minutes before now]
    #[arg(long, value_name = "RFC3339", value_parser = event_time)]
    pub start: Option<i64>,
    /// Share of clicks within 30 s after their impression
    #[arg(long, value_name = "P", default_value_t = DelayMix::default().inside,
          value_parser = share)]
    pub delay_inside: f64,
    /// Share of clicks up to 2 s before their impression (clock skew; they still join)
    #[arg(long, value_name = "P", default_value_t = DelayMix::default().before,
          value_parser = share)]
    pub delay_before: f64,
    /// Share of clicks beyond the 30 s window (they must not join)
    #[arg(long, value_name = "P", default_value_t = DelayMix::default().beyond,
          value_parser = share)]
    pub delay_beyond: f64,
    /// Share of deliveries that arrive out of order
    #[arg(long, value_name = "P", default_value_t = TrafficConfig::default().out_of_order,
          value_parser = share)]
    pub out_of_order: f64,
    /// Share of deliveries sent twice
    #[arg(long, value_name = "P", default_value_t = TrafficConfig::default().duplicates,
          value_parser = share)]
    pub duplicates: f64,
    /// Malformed records added, as a share of each stream's valid deliveries
    #[arg(long, value_name = "P", default_value_t = TrafficConfig::default().malformed,
          value_parser = share)]
    pub malformed: f64,
    /// Share of clicks without a click_id (the joiner derives one)
    #[arg(long, value_name = "P", default_value_t = TrafficConfig::default().derived_click_ids,
          value_parser = share)]
    pub derived_click_ids: f64,
    /// Send KPL-aggregated records of up to N user records each (at most 51,200 bytes, the
    /// Kinesis Producer Library's default), as KPL producers do [default: plain records]
    #[arg(long, value_name = "N", value_parser = at_least_one)]
    pub kpl: Option<usize>,
}

impl TrafficArgs {
    /// The traffic's records as they are sent: plain, or KPL-aggregated with `--kpl`.
    pub fn records(&self, traffic: &Traffic) -> (Vec<Vec<u8>>, Vec<Vec<u8>>) {
        let (imps, clicks) = (&traffic.impression_records, &traffic.click_records);
        match self.kpl {
            Some(n) => (
                crate::replay::kpl_aggregates(imps, n),
                crate::replay::kpl_aggregates(clicks, n),
            ),
            None => (imps.clone(), clicks.clone()),
        }
    }

    /// The generator's configuration; without `--start`, traffic ends at the last whole minute
    /// before `now_ms`, so it looks recent.
    pub fn config(&self, now_ms: i64) -> TrafficConfig {
        let duration_ms = self.minutes * 60_000;
        let start_ms = self
            .start
            .unwrap_or_else(|| now_ms - now_ms.rem_euclid(60_000) - duration_ms);
        let d = TrafficConfig::default();
        TrafficConfig {
            seed: self.seed,
            impressions: self.impressions,
            start_ms,
            duration_ms,
            campaigns: self.campaigns,
            ads: self.ads,
            publishers: self.publishers,
            ctr: self.ctr,
            second_click: self.second_click,
            delays: DelayMix {
                inside: self.delay_inside,
                before: self.delay_before,
                beyond: self.delay_beyond,
            },
            derived_click_ids: self.derived_click_ids,
            out_of_order: self.out_of_order,
            reorder_distance: d.reorder_distance,
            duplicates: self.duplicates,
            malformed: self.malformed,
            id_prefix: d.id_prefix,
        }
    }
}

/// A probability or share: a number in 0..=1.
pub fn share(s: &str) -> Result<f64, String> {
    let v: f64 = s
        .parse()
        .map_err(|_| format!("{s:?} is not a number (expected a share between 0 and 1)"))?;
    if (0.0..=1.0).contains(&v) {
        Ok(v)
    } else {
        Err(format!("{v} is outside 0..=1"))
    }
}

/// A count that must be at least 1.
pub fn at_least_one(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(0) => Err("expected at least 1".to_owned()),
        Ok(n) => Ok(n),
        Err(e) => Err(format!("{s:?} is not a whole number: {e}")),
    }
}

/// A rate in records per second: a finite number above 0.
pub fn positive_rate(s: &str) -> Result<f64, String> {
    let v: f64 = s.parse().map_err(|_| format!("{s:?} is not a number"))?;
    if v.is_finite() && v > 0.0 {
        Ok(v)
    } else {
        Err(format!("{v} is not a rate above 0"))
    }
}

/// An RFC 3339 time, as epoch milliseconds.
fn event_time(s: &str) -> Result<i64, String> {
    adpipe_core::time::parse_event_time(s).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::error::ErrorKind;
    use clap::CommandFactory;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("adpipe").chain(args.iter().copied()))
    }

    fn command(args: &[&str]) -> Command {
        parse(args)
            .unwrap_or_else(|e| panic!("{args:?}: {e}"))
            .command
    }

    fn error(args: &[&str]) -> clap::Error {
        match parse(args) {
            Ok(cli) => panic!("{args:?} parsed: {cli:?}"),
            Err(e) => e,
        }
    }

    fn defaults() -> TrafficArgs {
        match command(&["demo"]) {
            Command::Demo(d) => d.traffic,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn the_command_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn traffic_defaults_are_the_generators_but_for_the_demo_size() {
        let t = defaults();
        let now = 1_795_169_730_123; // 2026-11-20T10:15:30.123Z
        let cfg = t.config(now);
        let d = TrafficConfig::default();
        assert_eq!(cfg.impressions, DEFAULT_IMPRESSIONS);
        assert_eq!(
            TrafficConfig {
                impressions: d.impressions,
                start_ms: d.start_ms,
                ..cfg.clone()
            },
            d
        );
        // The last 15 whole minutes before now.
        assert_eq!(cfg.start_ms, 1_795_169_700_000 - 15 * 60_000);
        assert_eq!(cfg.duration_ms, 15 * 60_000);
    }

    #[test]
    fn demo_takes_traffic_options_sql_dir_and_out() {
        let Command::Demo(d) = command(&[
            "demo",
            "--impressions",
            "5000",
            "--seed",
            "9",
            "--campaigns",
            "3",
            "--ads",
            "7",
            "--publishers",
            "2",
            "--ctr",
            "0.05",
            "--second-click",
            "0.1",
            "--minutes",
            "4",
            "--start",
            "2026-11-20T10:00:00Z",
            "--delay-inside",
            "0.8",
            "--delay-before",
            "0.1",
            "--delay-beyond",
            "0.1",
            "--out-of-order",
            "0",
            "--duplicates",
            "1",
            "--malformed",
            "0.01",
            "--derived-click-ids",
            "0.5",
            "--sql-dir",
            "q",
            "--out",
            "o",
            "--rate",
            "2000",
        ]) else {
            panic!()
        };
        assert_eq!(d.rate, Some(2000.0));
        let cfg = d.traffic.config(0);
        assert_eq!(
            cfg,
            TrafficConfig {
                seed: 9,
                impressions: 5000,
                start_ms: 1_795_168_800_000,
                duration_ms: 4 * 60_000,
                campaigns: 3,
                ads: 7,
                publishers: 2,
                ctr: 0.05,
                second_click: 0.1,
                delays: DelayMix {
                    inside: 0.8,
                    before: 0.1,
                    beyond: 0.1
                },
                derived_click_ids: 0.5,
                out_of_order: 0.0,
                reorder_distance: TrafficConfig::default().reorder_distance,
                duplicates: 1.0,
                malformed: 0.01,
                id_prefix: String::new(),
            }
        );
        assert_eq!(d.sql_dir, Some(PathBuf::from("q")));
        assert_eq!(d.out, Some(PathBuf::from("o")));
        // `--name=value` works as `--name value`.
        let Command::Demo(d) = command(&["demo", "--ctr=0.5"]) else {
            panic!()
        };
        assert_eq!(d.traffic.ctr, 0.5);
    }

    #[test]
    fn demo_and_up_take_no_endpoint() {
        for cmd in ["demo", "up"] {
            let e = error(&[cmd, "--endpoint", "http://127.0.0.1:1"]);
            assert_eq!(e.kind(), ErrorKind::UnknownArgument, "{cmd}");
        }
    }

    #[test]
    fn up_takes_a_port() {
        assert_eq!(command(&["up"]), Command::Up(UpArgs { port: 4566 }));
        assert_eq!(
            command(&["up", "--port", "5000"]),
            Command::Up(UpArgs { port: 5000 })
        );
        assert_eq!(
            error(&["up", "--port", "70000"]).kind(),
            ErrorKind::ValueValidation
        );
        assert_eq!(
            error(&["up", "--port", "x"]).kind(),
            ErrorKind::ValueValidation
        );
    }

    #[test]
    fn endpoint_commands_take_an_endpoint_or_none() {
        let url = "http://127.0.0.1:4566";
        let with = EndpointArgs {
            endpoint: Some(url.into()),
        };
        for (cmd, wrap) in [
            (
                "provision",
                Command::Provision as fn(EndpointArgs) -> Command,
            ),
            ("redrive", Command::Redrive),
            ("env", Command::Env),
            ("status", Command::Status),
        ] {
            assert_eq!(command(&[cmd]), wrap(EndpointArgs::default()), "{cmd}");
            assert_eq!(command(&[cmd, "--endpoint", url]), wrap(with.clone()));
            assert_eq!(
                error(&[cmd, "--endpoint"]).kind(),
                ErrorKind::InvalidValue,
                "{cmd}"
            );
            assert_eq!(
                error(&[cmd, "--out", "x"]).kind(),
                ErrorKind::UnknownArgument
            );
        }
    }

    #[test]
    fn generate_takes_traffic_rate_out_and_order() {
        let Command::Generate(g) = command(&["generate"]) else {
            panic!()
        };
        assert_eq!(g.traffic, defaults());
        assert_eq!((g.rate, g.out, g.order), (None, None, Order::Interleaved));
        assert_eq!(g.endpoint, EndpointArgs::default());
        let Command::Generate(g) = command(&[
            "generate",
            "--endpoint",
            "http://e",
            "--impressions",
            "10",
            "--rate",
            "250.5",
            "--out",
            "d",
            "--order",
            "clicks-first",
        ]) else {
            panic!()
        };
        assert_eq!(g.traffic.impressions, 10);
        assert_eq!(g.rate, Some(250.5));
        assert_eq!(g.out, Some(PathBuf::from("d")));
        assert_eq!(g.order, Order::ClicksFirst);
        assert_eq!(g.endpoint.endpoint.as_deref(), Some("http://e"));
    }

    #[test]
    fn bad_values_are_errors_not_defaults() {
        for args in [
            &["generate", "--impressions", "many"][..],
            &["generate", "--impressions=-1"],
            &["generate", "--seed", "1.5"],
            &["generate", "--ctr", "1.5"],
            &["generate", "--ctr=-0.1"],
            &["generate", "--ctr", "abc"],
            &["generate", "--ctr", "NaN"],
            &["generate", "--second-click", "2"],
            &["generate", "--duplicates", "1.01"],
            &["generate", "--malformed=-1"],
            &["generate", "--out-of-order", "7"],
            &["generate", "--derived-click-ids", "x"],
            &["generate", "--delay-inside", "1.1"],
            &["generate", "--delay-before=-0.5"],
            &["generate", "--delay-beyond", "2"],
            &["generate", "--campaigns", "0"],
            &["generate", "--ads", "0"],
            &["generate", "--publishers", "zero"],
            &["generate", "--minutes", "0"],
            &["generate", "--minutes=-3"],
            &["generate", "--start", "yesterday"],
            &["generate", "--rate", "0"],
            &["generate", "--rate=-5"],
            &["generate", "--rate", "fast"],
            &["generate", "--rate", "inf"],
            &["generate", "--order", "random"],
            &["replay", "--clicks", "c", "--order", "shuffled"],
            &["demo", "--ctr", "3"],
            &["--stage", "prod", "env"],
        ] {
            let e = error(args);
            assert!(
                matches!(
                    e.kind(),
                    ErrorKind::ValueValidation | ErrorKind::InvalidValue
                ),
                "{args:?}: {:?} {e}",
                e.kind()
            );
            let text = e.to_string();
            assert!(text.contains("invalid value"), "{args:?}: {text}");
        }
        let text = error(&["generate", "--ctr", "1.5"]).to_string();
        assert!(
            text.contains("--ctr") && text.contains("outside 0..=1"),
            "{text}"
        );
        let text = error(&["generate", "--order", "random"]).to_string();
        assert!(text.contains("clicks-first"), "{text}");
    }

    #[test]
    fn unknown_options_and_commands_are_errors() {
        for args in [
            &["generate", "--impresions", "10"][..],
            &["generate", "--follow"],
            &["run", "--order", "clicks-first"],
            &["replay", "--clicks", "c", "--rate", "5"],
            &["query", "--out", "x"],
            &["chart", "--file", "x.sql"],
            &["export", "--sql-dir", "sql"],
            &["demo", "--follow"],
            &["up", "--follow"],
            &["provision", "extra"],
        ] {
            let e = error(args);
            assert_eq!(e.kind(), ErrorKind::UnknownArgument, "{args:?}: {e}");
        }
        assert_eq!(error(&["launch"]).kind(), ErrorKind::InvalidSubcommand);
        let text = error(&["generate", "--impresions", "10"]).to_string();
        assert!(
            text.contains("--impressions"),
            "suggests the option: {text}"
        );
    }

    #[test]
    fn replay_takes_files_order_and_run() {
        let Command::Replay(r) = command(&["replay", "--impressions", "i.jsonl"]) else {
            panic!()
        };
        assert_eq!(
            r,
            ReplayArgs {
                endpoint: EndpointArgs::default(),
                impressions: Some("i.jsonl".into()),
                clicks: None,
                order: Order::Interleaved,
                run: false,
            }
        );
        let Command::Replay(r) = command(&[
            "replay",
            "--impressions",
            "i.jsonl",
            "--clicks",
            "c.jsonl",
            "--order",
            "clicks-first",
            "--run",
            "--endpoint",
            "http://e",
        ]) else {
            panic!()
        };
        assert_eq!(r.clicks, Some("c.jsonl".into()));
        assert_eq!(r.order, Order::ClicksFirst);
        assert!(r.run);
        assert_eq!(
            error(&["replay"]).kind(),
            ErrorKind::MissingRequiredArgument
        );
        assert_eq!(
            error(&["replay", "--order", "clicks-first", "--run"]).kind(),
            ErrorKind::MissingRequiredArgument
        );
    }

    #[test]
    fn booleans_are_flags() {
        let Command::Run(r) = command(&["run"]) else {
            panic!()
        };
        assert!(!r.follow);
        let Command::Run(r) = command(&["run", "--follow"]) else {
            panic!()
        };
        assert!(r.follow);
        // `--follow=false` used to mean following; now a flag takes no value.
        for v in ["--follow=false", "--follow=true"] {
            assert_eq!(error(&["run", v]).kind(), ErrorKind::TooManyValues, "{v}");
        }
        assert_eq!(
            error(&["replay", "--clicks", "c", "--run=no"]).kind(),
            ErrorKind::TooManyValues
        );
    }

    #[test]
    fn events_take_an_output_directory_and_nothing_else() {
        assert_eq!(
            command(&["events"]),
            Command::Events(EventsArgs { out: None })
        );
        assert_eq!(
            command(&["--stack", "adpipe-dev", "events", "--out", "ev"]),
            Command::Events(EventsArgs {
                out: Some(PathBuf::from("ev"))
            })
        );
        assert_eq!(
            error(&["events", "--endpoint", "http://x"]).kind(),
            ErrorKind::UnknownArgument
        );
        assert_eq!(error(&["events", "--out"]).kind(), ErrorKind::InvalidValue);
    }

    #[test]
    fn query_takes_a_directory_or_files() {
        assert_eq!(
            command(&["query"]),
            Command::Query(QueryArgs {
                endpoint: EndpointArgs::default(),
                sql_dir: None,
                file: vec![],
                timeout_s: 300,
            })
        );
        let Command::Query(q) = command(&["query", "--timeout-s", "30"]) else {
            panic!()
        };
        assert_eq!(q.timeout_s, 30);
        for bad in ["0", "-1", "soon"] {
            assert!(parse(&["query", "--timeout-s", bad]).is_err(), "{bad}");
        }
        let Command::Query(q) = command(&["query", "--file", "a.sql", "--file", "b.sql"]) else {
            panic!()
        };
        assert_eq!(q.file, vec![PathBuf::from("a.sql"), PathBuf::from("b.sql")]);
        let Command::Query(q) = command(&["query", "--sql-dir", "more"]) else {
            panic!()
        };
        assert_eq!(q.sql_dir, Some(PathBuf::from("more")));
        assert_eq!(
            error(&["query", "--sql-dir", "d", "--file", "a.sql"]).kind(),
            ErrorKind::ArgumentConflict
        );
    }

    #[test]
    fn chart_and_export_take_out() {
        assert_eq!(
            command(&["chart", "--out", "c.html"]),
            Command::Chart(ChartArgs {
                endpoint: EndpointArgs::default(),
                out: Some("c.html".into()),
            })
        );
        assert_eq!(
            command(&["export"]),
            Command::Export(ExportArgs {
                endpoint: EndpointArgs::default(),
                out: None,
            })
        );
        assert_eq!(
            command(&["export", "--out", "lake", "--endpoint", "http://e"]),
            Command::Export(ExportArgs {
                endpoint: EndpointArgs {
                    endpoint: Some("http://e".into())
                },
                out: Some("lake".into()),
            })
        );
    }

    #[test]
    fn stack_and_region_are_global_and_region_needs_a_stack() {
        let cli = parse(&["generate", "--stack", "adpipe-dev", "--region", "eu-west-1"]).unwrap();
        assert_eq!(cli.stack.as_deref(), Some("adpipe-dev"));
        assert_eq!(cli.region.as_deref(), Some("eu-west-1"));
        let cli = parse(&["--stack", "adpipe-dev", "redrive"]).unwrap();
        assert_eq!(
            (cli.stack.as_deref(), cli.region),
            (Some("adpipe-dev"), None)
        );
        assert_eq!(parse(&["env"]).unwrap().stack, None);
        assert_eq!(
            error(&["generate", "--region", "eu-west-1"]).kind(),
            ErrorKind::MissingRequiredArgument
        );
        assert_eq!(
            error(&["generate", "--stack", "s", "--stage", "local"]).kind(),
            ErrorKind::ArgumentConflict
        );
        assert_eq!(
            error(&["generate", "--stack"]).kind(),
            ErrorKind::InvalidValue
        );
    }

    #[test]
    fn stage_is_local_by_default_and_global() {
        assert_eq!(parse(&["env"]).unwrap().stage, Stage::Local);
        assert_eq!(
            parse(&["--stage", "local", "env"]).unwrap().stage,
            Stage::Local
        );
        assert_eq!(
            parse(&["env", "--stage", "local"]).unwrap().stage,
            Stage::Local
        );
    }

    #[test]
    fn help_lists_every_option_with_its_default() {
        let mut cli = Cli::command();
        cli.build();
        let mut missing = Vec::new();
        for sub in cli.get_subcommands() {
            let help = sub.clone().render_long_help().to_string();
            for arg in sub.get_arguments() {
                let Some(long) = arg.get_long() else { continue };
                if ["help", "version"].contains(&long) {
                    continue;
                }
                if !help.contains(&format!("--{long}")) {
                    missing.push(format!("{}: --{long} not listed", sub.get_name()));
                }
                let is_flag = matches!(arg.get_action(), clap::ArgAction::SetTrue);
                let has_default = !arg.get_default_values().is_empty()
                    || arg
                        .get_long_help()
                        .or(arg.get_help())
                        .is_some_and(|h| h.to_string().contains("[default: "));
                if !is_flag && !has_default {
                    missing.push(format!("{}: --{long} has no default", sub.get_name()));
                }
            }
        }
        assert!(missing.is_empty(), "{missing:#?}");
        let demo = cli
            .find_subcommand("demo")
            .expect("demo")
            .clone()
            .render_long_help()
            .to_string();
        assert!(demo.contains("[default: 20000]"), "{demo}");
        assert!(demo.contains("[default: 0.03]"), "{demo}");
    }
}
