//! The named queries' port: `adpipe query` runs the files of `sql/` through a [`QueryEngine`]
//! and prints the same tables whichever it is. Locally the engine is DuckDB over the Iceberg
//! tables ([`crate::lake::LakeCheck`]); against a deployed stack it is Athena, in the stack's
//! workgroup and Glue database ([`AthenaQueries`]), as the named queries of `template.yaml`
//! run in the console.

use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;

use aws_sdk_athena::types::{QueryExecutionContext, QueryExecutionState};
use serde_json::Value;

use crate::lake::{LakeCheck, QueryResult};
use crate::LocalError;

/// Runs named query files and returns one result per file, in the order given.
pub trait QueryEngine {
    fn query(
        &self,
        files: &[PathBuf],
    ) -> impl Future<Output = Result<Vec<QueryResult>, LocalError>> + Send;
}

impl QueryEngine for LakeCheck {
    fn query(
        &self,
        files: &[PathBuf],
    ) -> impl Future<Output = Result<Vec<QueryResult>, LocalError>> + Send {
        LakeCheck::query(self, files)
    }
}

/// Athena in one workgroup (which sets the results location and the bytes-scanned cutoff)
/// and one Glue database (the tables' names in `sql/` are unqualified).
#[derive(Debug, Clone)]
pub struct AthenaQueries {
    pub client: aws_sdk_athena::Client,
    pub workgroup: String,
    pub database: String,
    /// How long one query may take before the command gives up on it (and cancels it).
    pub timeout: Duration,
}

impl AthenaQueries {
    async fn run_one(&self, name: String, sql: String) -> Result<QueryResult, LocalError> {
        let started = self
            .client
            .start_query_execution()
            .query_string(sql)
            .work_group(&self.workgroup)
            .query_execution_context(
                QueryExecutionContext::builder()
                    .database(&self.database)
                    .build(),
            )
            .send()
            .await
            .map_err(|e| LocalError::aws("Athena StartQueryExecution", e))?;
        let id = started
            .query_execution_id()
            .ok_or_else(|| LocalError::Stack("Athena returned no query execution id".into()))?
            .to_owned();
        let deadline = tokio::time::Instant::now() + self.timeout;
        let mut wait = Duration::from_millis(200);
        loop {
            let e = self
                .client
                .get_query_execution()
                .query_execution_id(&id)
                .send()
                .await
                .map_err(|e| LocalError::aws("Athena GetQueryExecution", e))?;
            let status = e.query_execution().and_then(|q| q.status());
            match status.and_then(|s| s.state()) {
                Some(QueryExecutionState::Succeeded) => break,
                Some(state @ (QueryExecutionState::Failed | QueryExecutionState::Cancelled)) => {
                    return Err(LocalError::Stack(format!(
                        "{name}: Athena query {id} {}: {}",
                        state.as_str(),
                        status
                            .and_then(|s| s.state_change_reason())
                            .unwrap_or("no reason given")
                    )));
                }
                _ => {}
            }
            if tokio::time::Instant::now() >= deadline {
                let _ = self
                    .client
                    .stop_query_execution()
                    .query_execution_id(&id)
                    .send()
                    .await;
                return Err(LocalError::Stack(format!(
                    "{name}: Athena query {id} did not finish within {} s (stopped)",
                    self.timeout.as_secs()
                )));
            }
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(Duration::from_secs(2));
        }
        let mut pages = self
            .client
            .get_query_results()
            .query_execution_id(&id)
            .into_paginator()
            .send();
        let mut columns: Vec<(String, String)> = Vec::new();
        let mut rows = Vec::new();
        let mut first = true;
        while let Some(page) = pages.next().await {
            let page = page.map_err(|e| LocalError::aws("Athena GetQueryResults", e))?;
            let Some(set) = page.result_set() else {
                continue;
            };
            if columns.is_empty() {
                columns = set
                    .result_set_metadata()
                    .map(|m| {
                        m.column_info()
                            .iter()
                            .map(|c| (c.name().to_owned(), c.r#type().to_owned()))
                            .collect()
                    })
                    .unwrap_or_default();
            }
            for row in set.rows() {
                let cells: Vec<Option<&str>> =
                    row.data().iter().map(|d| d.var_char_value()).collect();
                // A SELECT's first row is its header.
                let header = first
                    && cells.len() == columns.len()
                    && cells
                        .iter()
                        .zip(&columns)
                        .all(|(c, (n, _))| *c == Some(n.as_str()));
                first = false;
                if header {
                    continue;
                }
                rows.push(
                    cells
                        .iter()
                        .enumerate()
                        .map(|(i, c)| typed(*c, columns.get(i).map_or("", |(_, t)| t)))
                        .collect(),
                );
            }
        }
        Ok(QueryResult {
            name,
            columns: columns.into_iter().map(|(n, _)| n).collect(),
            rows,
        })
    }
}

/// An Athena cell (always text) as the JSON value DuckDB would give: numbers for numeric
/// columns, null for a missing value.
pub fn typed(cell: Option<&str>, athena_type: &str) -> Value {
    let Some(text) = cell else {
        return Value::Null;
    };
    match athena_type {
        "tinyint" | "smallint" | "integer" | "bigint" => text
            .parse::<i64>()
            .map(Value::from)
            .unwrap_or_else(|_| Value::from(text)),
        "float" | "real" | "double" | "decimal" => text
            .parse::<f64>()
            .ok()
            .and_then(serde_json::Number::from_f64)
            .map(Value::Number)
            .unwrap_or_else(|| Value::from(text)),
        t if t.starts_with("decimal") => text
            .parse::<f64>()
            .ok()
            .and_then(serde_json::Number::from_f64)
            .map(Value::Number)
            .unwrap_or_else(|| Value::from(text)),
        "boolean" => match text {
            "true" => Value::Bool(true),
            "false" => Value::Bool(false),
            _ => Value::from(text),
        },
        _ => Value::from(text),
    }
}

impl QueryEngine for AthenaQueries {
    async fn query(&self, files: &[PathBuf]) -> Result<Vec<QueryResult>, LocalError> {
        let mut out = Vec::new();
        for f in files {
            let sql = std::fs::read_to_string(f).map_err(LocalError::io("reading a query file"))?;
            let name = f
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            out.push(self.run_one(name, sql).await?);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cells_get_the_type_of_their_column() {
        assert_eq!(typed(Some("42"), "bigint"), Value::from(42));
        assert_eq!(typed(Some("0.25"), "double"), Value::from(0.25));
        assert_eq!(typed(Some("1.50"), "decimal(10,2)"), Value::from(1.5));
        assert_eq!(typed(Some("true"), "boolean"), Value::Bool(true));
        assert_eq!(typed(Some("camp-1"), "varchar"), Value::from("camp-1"));
        assert_eq!(
            typed(Some("2026-11-20 10:15:00.000"), "timestamp"),
            Value::from("2026-11-20 10:15:00.000")
        );
        assert_eq!(typed(None, "bigint"), Value::Null);
        assert_eq!(typed(Some("n/a"), "bigint"), Value::from("n/a"));
    }
}
