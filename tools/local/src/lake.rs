//! The lake, read independently of the code that wrote it: the named Athena queries
//! (`sql/*.sql`) run by DuckDB, and a Parquet export of each table made by pyiceberg, both
//! through `tools/lake_check.py` in the project venv. Plus plain-text tables and CSV files of
//! query results.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

use crate::LocalError;

/// `tools/lake_check.py` against one endpoint and Glue database.
#[derive(Debug, Clone)]
pub struct LakeCheck {
    pub python: PathBuf,
    pub script: PathBuf,
    pub endpoint: String,
    pub database: String,
}

/// One query's result.
#[derive(Debug, Clone, PartialEq)]
pub struct QueryResult {
    /// The SQL file's name.
    pub name: String,
    pub columns: Vec<String>,
    pub rows: Vec<Vec<Value>>,
}

/// One exported table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportedTable {
    pub table: String,
    pub path: PathBuf,
    pub rows: u64,
}

impl LakeCheck {
    pub fn new(root: &Path, endpoint: &str, database: &str) -> Self {
        LakeCheck {
            python: root.join(".venv/bin/python"),
            script: root.join("tools/lake_check.py"),
            endpoint: endpoint.to_owned(),
            database: database.to_owned(),
        }
    }

    async fn run(&self, args: Vec<String>) -> Result<Value, LocalError> {
        let mut cmd = Command::new(&self.python);
        cmd.arg(&self.script).args(&args).args([
            "--endpoint",
            &self.endpoint,
            "--database",
            &self.database,
        ]);
        let mode = args.first().cloned().unwrap_or_default();
        let output = tokio::task::spawn_blocking(move || cmd.output())
            .await
            .map_err(|e| LocalError::Runner(format!("lake_check task: {e}")))?
            .map_err(LocalError::io("running tools/lake_check.py"))?;
        if !output.status.success() {
            return Err(LocalError::Tool {
                tool: format!("tools/lake_check.py {mode}"),
                detail: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
            });
        }
        serde_json::from_slice(&output.stdout).map_err(LocalError::json("lake_check.py output"))
    }

    /// Runs SQL files against the lake's tables (queried unqualified, as Athena's named
    /// queries are). Results come back in file-name order.
    pub async fn query(&self, files: &[PathBuf]) -> Result<Vec<QueryResult>, LocalError> {
        if files.is_empty() {
            return Ok(Vec::new());
        }
        let mut args = vec!["query".to_owned()];
        for f in files {
            args.push("--file".into());
            args.push(f.display().to_string());
        }
        let v = self.run(args).await?;
        let mut out = Vec::new();
        if let Value::Object(map) = v {
            for (name, result) in map {
                let columns = result["columns"]
                    .as_array()
                    .map(|c| {
                        c.iter()
                            .map(|s| s.as_str().unwrap_or("").to_owned())
                            .collect()
                    })
                    .unwrap_or_default();
                let rows = result["rows"]
                    .as_array()
                    .map(|rows| {
                        rows.iter()
                            .map(|r| r.as_array().cloned().unwrap_or_default())
                            .collect()
                    })
                    .unwrap_or_default();
                out.push(QueryResult {
                    name,
                    columns,
                    rows,
                });
            }
        }
        // In the order asked for (the demo puts CTR and engagement first), not the JSON
        // object's key order.
        let position = |name: &str| {
            files
                .iter()
                .position(|f| f.file_name().is_some_and(|n| n.to_string_lossy() == name))
                .unwrap_or(usize::MAX)
        };
        out.sort_by_key(|r| (position(&r.name), r.name.clone()));
        Ok(out)
    }

    /// Exports every table of the database as `<out>/<table>.parquet`.
    pub async fn export(&self, out: &Path) -> Result<Vec<ExportedTable>, LocalError> {
        let v = self
            .run(vec![
                "export".into(),
                "--out".into(),
                out.display().to_string(),
            ])
            .await?;
        let mut tables = Vec::new();
        if let Value::Object(map) = v {
            for (table, t) in map {
                tables.push(ExportedTable {
                    table,
                    path: PathBuf::from(t["path"].as_str().unwrap_or_default()),
                    rows: t["rows"].as_u64().unwrap_or_default(),
                });
            }
        }
        Ok(tables)
    }

    /// Every row of some tables, read by pyiceberg (`lake_check.py scan`).
    pub async fn scan(&self, tables: &[&str]) -> Result<Value, LocalError> {
        let mut args = vec!["scan".to_owned()];
        for t in tables {
            args.push("--table".into());
            args.push((*t).to_owned());
        }
        self.run(args).await
    }
}

/// The named queries: `*.sql` in `dir`, sorted. A missing directory has none.
pub fn named_queries(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|e| e == "sql"))
                .collect()
        })
        .unwrap_or_default();
    files.sort();
    files
}

fn cell(v: &Value) -> String {
    match v {
        Value::Null => "NULL".into(),
        Value::String(s) => s.clone(),
        // Fractions (CTRs, averages) to four decimals, without trailing zeros.
        Value::Number(n) if n.is_f64() => {
            let text = format!("{:.4}", n.as_f64().unwrap_or_default());
            let text = text.trim_end_matches('0').trim_end_matches('.');
            if text.is_empty() || text == "-" {
                "0".into()
            } else {
                text.to_owned()
            }
        }
        other => other.to_string(),
    }
}

/// A query result as an aligned text table, with at most `max_rows` rows shown.
pub fn render_table(result: &QueryResult, max_rows: usize) -> String {
    let shown: Vec<Vec<String>> = result
        .rows
        .iter()
        .take(max_rows)
        .map(|r| r.iter().map(cell).collect())
        .collect();
    let mut widths: Vec<usize> = result.columns.iter().map(|c| c.chars().count()).collect();
    for row in &shown {
        for (i, c) in row.iter().enumerate() {
            if i < widths.len() {
                widths[i] = widths[i].max(c.chars().count());
            }
        }
    }
    let numeric: Vec<bool> = (0..result.columns.len())
        .map(|i| {
            result
                .rows
                .iter()
                .take(max_rows)
                .all(|r| matches!(r.get(i), Some(Value::Number(_)) | Some(Value::Null)))
        })
        .collect();
    let line = |cells: &[String]| {
        cells
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let w = widths.get(i).copied().unwrap_or(0);
                if numeric.get(i).copied().unwrap_or(false) {
                    format!("{c:>w$}")
                } else {
                    format!("{c:<w$}")
                }
            })
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_owned()
    };
    let mut out = String::new();
    out.push_str(&line(&result.columns));
    out.push('\n');
    out.push_str(
        &widths
            .iter()
            .map(|w| "-".repeat(*w))
            .collect::<Vec<_>>()
            .join("  "),
    );
    out.push('\n');
    for row in &shown {
        out.push_str(&line(row));
        out.push('\n');
    }
    if result.rows.len() > shown.len() {
        out.push_str(&format!(
            "… {} more rows ({} in all)\n",
            result.rows.len() - shown.len(),
            result.rows.len()
        ));
    }
    out
}

/// A query result as CSV (RFC 4180 quoting).
pub fn to_csv(result: &QueryResult) -> String {
    let quote = |s: &str| {
        if s.contains([',', '"', '\n', '\r']) {
            format!("\"{}\"", s.replace('"', "\"\""))
        } else {
            s.to_owned()
        }
    };
    let mut out = result
        .columns
        .iter()
        .map(|c| quote(c))
        .collect::<Vec<_>>()
        .join(",");
    out.push('\n');
    for row in &result.rows {
        let cells: Vec<String> = row
            .iter()
            .map(|v| match v {
                Value::Null => String::new(),
                Value::String(s) => quote(s),
                other => quote(&other.to_string()),
            })
            .collect();
        out.push_str(&cells.join(","));
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn result() -> QueryResult {
        QueryResult {
            name: "ctr.sql".into(),
            columns: vec![
                "minute".into(),
                "campaign_id".into(),
                "ctr".into(),
                "clicks".into(),
            ],
            rows: vec![
                vec![
                    json!("2026-11-20T10:00:00"),
                    json!("camp-00"),
                    json!(0.03124),
                    json!(12),
                ],
                vec![
                    json!("2026-11-20T10:01:00"),
                    json!("a,\"b\""),
                    json!(null),
                    json!(7),
                ],
                vec![
                    json!("2026-11-20T10:02:00"),
                    json!("c"),
                    json!(0.0),
                    json!(1.5),
                ],
            ],
        }
    }

    #[test]
    fn tables_align_text_left_and_numbers_right() {
        let text = render_table(&result(), 10);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "minute               campaign_id     ctr  clicks");
        assert_eq!(lines[2], "2026-11-20T10:00:00  camp-00      0.0312      12");
        assert_eq!(
            lines[3],
            "2026-11-20T10:01:00  a,\"b\"          NULL       7"
        );
        assert_eq!(lines[4], "2026-11-20T10:02:00  c                 0     1.5");
        let cut = render_table(&result(), 1);
        assert!(cut.ends_with("… 2 more rows (3 in all)\n"), "{cut}");
    }

    #[test]
    fn csv_quotes_what_needs_quoting() {
        let csv = to_csv(&result());
        assert_eq!(
            csv,
            "minute,campaign_id,ctr,clicks\n2026-11-20T10:00:00,camp-00,0.03124,12\n2026-11-20T10:01:00,\"a,\"\"b\"\"\",,7\n2026-11-20T10:02:00,c,0.0,1.5\n"
        );
    }

    #[test]
    fn named_queries_are_the_sql_files_in_order() {
        let dir = std::env::temp_dir().join(format!("adpipe-named-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for f in ["b.sql", "a.sql", "notes.md"] {
            std::fs::write(dir.join(f), "SELECT 1").unwrap();
        }
        let names: Vec<String> = named_queries(&dir)
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, ["a.sql", "b.sql"]);
        assert!(named_queries(&dir.join("missing")).is_empty());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
