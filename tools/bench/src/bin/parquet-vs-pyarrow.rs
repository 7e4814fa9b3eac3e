//! The enricher's Parquet encoding against pyarrow's, on the same rows, in one run.
//!
//! Usage: cargo build --release --workspace && bash scripts/venv.sh && \
//!        ./target/release/parquet-vs-pyarrow [--rows 100000] [--rounds 7]
//!
//! For each lake table: the rows are built as the enricher builds them (decode, enrich,
//! Arrow); the Rust side times only its encode into a `Vec` with the lake's writer settings,
//! `--rounds` times; the last file goes to `target/bench-tmp/`, from which
//! `tools/bench/pyarrow_bench.py` loads the same rows into memory and times only
//! `pq.write_table` into a `BytesIO`, with the same codec, level and row-group size.

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use adpipe_bench::{encode_parquet, enriched_batches, joined_records, Spread};
use adpipe_enricher::ROW_GROUP_ROWS;
use adpipe_lake::writer_properties;
use clap::Parser;
use parquet::basic::Compression;
use parquet::schema::types::ColumnPath;

/// The enricher's Parquet encoding against pyarrow's, on the same rows.
#[derive(Debug, Parser)]
#[command(name = "parquet-vs-pyarrow")]
struct Args {
    /// Rows of each lake table
    #[arg(long, value_name = "N", default_value_t = 100_000,
          value_parser = clap::value_parser!(u32).range(1..))]
    rows: u32,
    /// Rounds of each encoder (the figure is their median)
    #[arg(long, value_name = "N", default_value_t = 7,
          value_parser = clap::value_parser!(u32).range(1..))]
    rounds: u32,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let (rows, rounds) = (args.rows as usize, args.rounds as usize);
    let root = adpipe_local::endpoint::workspace_root();
    let python = root.join(".venv/bin/python");
    anyhow::ensure!(
        python.exists(),
        "no {}: run `bash scripts/venv.sh` first",
        python.display()
    );
    let props = writer_properties(ROW_GROUP_ROWS);
    let level = match props.compression(&ColumnPath::from("any")) {
        Compression::ZSTD(level) => level.compression_level(),
        other => anyhow::bail!("the lake writes {other:?}, not zstd"),
    };
    let tmp = root.join("target/bench-tmp");
    std::fs::create_dir_all(&tmp)?;

    // Half clicks, half impressions: `rows` of each table.
    let (clicks, impressions) = enriched_batches(&joined_records(rows * 2, 0.5))?;
    println!(
        "## Parquet encoding, zstd level {level}, row groups of at most {ROW_GROUP_ROWS} rows, {rounds} rounds"
    );
    println!("| table | rows | Rust (parquet crate) rows/s: median (min–max) | pyarrow rows/s: median (min–max) | Rust ÷ pyarrow | bytes Rust / pyarrow |");
    println!("|---|---|---|---|---|---|");
    for (name, batch) in [("clicks", clicks), ("impressions", impressions)] {
        let n = batch.num_rows();
        let mut rates = Vec::new();
        let mut out = Vec::new();
        for _ in 0..rounds {
            let t = Instant::now();
            out = encode_parquet(&batch, &props)?;
            rates.push(n as f64 / t.elapsed().as_secs_f64());
        }
        let rust = Spread::of(rates);
        let file = tmp.join(format!("{name}.parquet"));
        std::fs::write(&file, &out)?;
        let py = pyarrow(&python, &root, &file, rounds, level)?;
        anyhow::ensure!(
            py.rows == n,
            "pyarrow read {} rows, Rust wrote {n}",
            py.rows
        );
        let pyrates = Spread::of(py.seconds.iter().map(|s| n as f64 / s).collect());
        println!(
            "| {name} | {n} | {rust} | {pyrates} | **{:.2}** | {} / {} ({:+.1} %) |",
            rust.median / pyrates.median,
            out.len(),
            py.bytes,
            (out.len() as f64 / py.bytes as f64 - 1.0) * 100.0
        );
        eprintln!("  {name}: pyarrow {}", py.version);
    }
    Ok(())
}

/// What `pyarrow_bench.py` measured.
struct PyArrow {
    rows: usize,
    bytes: usize,
    seconds: Vec<f64>,
    version: String,
}

fn pyarrow(
    python: &Path,
    root: &Path,
    file: &Path,
    rounds: usize,
    level: i32,
) -> anyhow::Result<PyArrow> {
    let out = Command::new(python)
        .arg(root.join("tools/bench/pyarrow_bench.py"))
        .arg(file)
        .args(["--rounds", &rounds.to_string()])
        .args(["--level", &level.to_string()])
        .args(["--row-group-rows", &ROW_GROUP_ROWS.to_string()])
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "pyarrow_bench.py failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let field = |k: &str| {
        v.get(k)
            .ok_or_else(|| anyhow::anyhow!("pyarrow_bench.py printed no {k}"))
    };
    Ok(PyArrow {
        rows: field("rows")?.as_u64().unwrap_or_default() as usize,
        bytes: field("bytes")?.as_u64().unwrap_or_default() as usize,
        seconds: field("seconds")?
            .as_array()
            .map(|a| a.iter().filter_map(serde_json::Value::as_f64).collect())
            .unwrap_or_default(),
        version: field("pyarrow")?.as_str().unwrap_or_default().to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn options_parse_with_their_defaults_and_refuse_typos_and_bad_values() {
        Args::command().debug_assert();
        let a = Args::try_parse_from(["parquet-vs-pyarrow"]).expect("defaults");
        assert!(a.rows == 100_000 && a.rounds == 7, "{a:?}");
        let a = Args::try_parse_from(["parquet-vs-pyarrow", "--rows", "10", "--rounds", "1"])
            .expect("options");
        assert!(a.rows == 10 && a.rounds == 1, "{a:?}");
        for args in [
            &["parquet-vs-pyarrow", "--row", "10"][..],
            &["parquet-vs-pyarrow", "--rounds", "x"][..],
        ] {
            assert!(Args::try_parse_from(args).is_err(), "{args:?}");
        }
    }
}
