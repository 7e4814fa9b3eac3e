//! The duplicate-key check around an append: which rows are candidates, the scope (campaigns
//! and impression times) they lie in, and which of their keys the table already holds, found
//! through the lake's own plan ([`crate::keycheck`]) or, for a table with delete files,
//! iceberg-rust's scan.

use std::collections::{BTreeMap, HashSet};

use adpipe_core::ports::{LakeAppend, LakeTable, PortError};
use arrow_array::{RecordBatch, TimestampMicrosecondArray};
use futures::TryStreamExt;
use iceberg::expr::Reference;
use iceberg::spec::Datum;
use iceberg::table::Table;

use crate::{keycheck, lake_error, string_column, IcebergLake, KeyCheckPlan, ManifestReads};

impl IcebergLake {
    /// What the duplicate-key check of rows within `scope` plans against `table`: the data
    /// files left after pruning by partition and column statistics, planned over this writer's
    /// manifest cache ([`keycheck`]). For a table with delete files, iceberg-rust's plan.
    pub async fn key_check_plan(
        &self,
        table: &Table,
        scope: &KeyScope,
    ) -> Result<KeyCheckPlan, PortError> {
        match keycheck::plan(table, &self.manifests, scope).await? {
            Some(plan) => Ok(plan),
            None => Ok(KeyCheckPlan {
                files: query_plan(table, scope).await?,
                ..KeyCheckPlan::default()
            }),
        }
    }

    /// Manifests the key check has fetched from storage, and served from its cache.
    pub fn manifest_reads(&self) -> ManifestReads {
        self.manifests.reads()
    }

    /// The keys among `candidates` that the table already holds, looked for within `scope`.
    pub(crate) async fn existing_keys(
        &self,
        table: &Table,
        lake_table: LakeTable,
        candidates: &[(String, String)],
        scope: &KeyScope,
    ) -> Result<HashSet<(String, String)>, PortError> {
        if candidates.is_empty() || table.metadata().current_snapshot().is_none() {
            return Ok(HashSet::new());
        }
        match keycheck::plan(table, &self.manifests, scope).await? {
            Some(plan) => {
                let wanted: HashSet<(String, String)> = candidates.iter().cloned().collect();
                keycheck::read_keys(table, lake_table, &plan, &wanted).await
            }
            None => existing_keys_by_scan(table, lake_table, candidates, scope).await,
        }
    }
}

/// Where a row holding one of the candidate keys can be: in the candidates' campaigns and
/// within their impression-time range. Every copy of a record carries the same `campaign_id`
/// and `impression_time` as the first (they are the impression's, fixed when the joiner
/// stored it), so the scope is exact. It lets iceberg skip, before opening them, the files of
/// other partitions (`campaign_id`, day) and, by their column statistics, the files of the
/// same day whose impression times do not overlap: the check reads the files around the
/// batch's event time, not the table's history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyScope {
    pub campaigns: std::collections::BTreeSet<String>,
    /// Impression times (zone-less microseconds, as the column), both ends inclusive.
    pub min_time_us: i64,
    pub max_time_us: i64,
}

impl KeyScope {
    /// The scope of the rows of `rows` selected by `pick`; `None` when none is.
    pub fn of_rows(rows: &RecordBatch, pick: &[bool]) -> Result<Option<KeyScope>, PortError> {
        let campaigns = string_column(rows, "campaign_id")?;
        let times = rows
            .column_by_name("impression_time")
            .and_then(|c| c.as_any().downcast_ref::<TimestampMicrosecondArray>())
            .ok_or_else(|| PortError::Rejected("batch has no impression_time column".into()))?;
        let mut scope: Option<KeyScope> = None;
        for (row, _) in pick.iter().enumerate().filter(|(_, p)| **p) {
            let (campaign, t) = (campaigns.value(row), times.value(row));
            let s = scope.get_or_insert_with(|| KeyScope {
                campaigns: Default::default(),
                min_time_us: t,
                max_time_us: t,
            });
            s.campaigns.insert(campaign.to_owned());
            s.min_time_us = s.min_time_us.min(t);
            s.max_time_us = s.max_time_us.max(t);
        }
        Ok(scope)
    }

    fn predicate(&self) -> iceberg::expr::Predicate {
        let time = || Reference::new("impression_time");
        Reference::new("campaign_id")
            .is_in(self.campaigns.iter().map(|c| Datum::string(c.as_str())))
            .and(time().greater_than_or_equal_to(Datum::timestamp_micros(self.min_time_us)))
            .and(time().less_than_or_equal_to(Datum::timestamp_micros(self.max_time_us)))
    }
}

/// The rows of `append` the key check looks for (per row), and their keys: the flagged ones, or
/// all of them when the batch overlaps a committed range.
pub fn key_check_candidates(
    append: &LakeAppend,
    overlap: bool,
) -> (Vec<bool>, Vec<(String, String)>) {
    let pick: Vec<bool> = append.in_doubt.iter().map(|d| overlap || *d).collect();
    let keys = append
        .keys
        .iter()
        .zip(&pick)
        .filter(|(_, p)| **p)
        .map(|(k, _)| k.clone())
        .collect();
    (pick, keys)
}

/// The scan of the key check: the candidates' key columns, filtered on their ids within
/// `scope`.
fn key_scan(
    table: &Table,
    lake_table: LakeTable,
    candidates: &[(String, String)],
    scope: &KeyScope,
) -> Result<iceberg::scan::TableScan, PortError> {
    let ids: BTreeMap<&str, ()> = candidates.iter().map(|(i, _)| (i.as_str(), ())).collect();
    let filter = scope
        .predicate()
        .and(Reference::new("impression_id").is_in(ids.keys().map(|i| Datum::string(*i))));
    let columns: Vec<&str> = match lake_table {
        LakeTable::Clicks => vec!["impression_id", "click_id"],
        LakeTable::Impressions => vec!["impression_id"],
    };
    table
        .scan()
        .select(columns)
        .with_filter(filter)
        .build()
        .map_err(|e| lake_error("planning the key check", e))
}

/// What a query of `scope` (campaigns and an impression-time range, as a dashboard asks)
/// plans with iceberg-rust's scan: the data files (path and bytes) left after partition and
/// column-statistics pruning. Athena prunes with the same metadata, so this is the check that a
/// one-campaign, one-hour query reads few files; the key check's own planning
/// ([`IcebergLake::key_check_plan`]) is tested against it.
pub async fn query_plan(table: &Table, scope: &KeyScope) -> Result<Vec<(String, u64)>, PortError> {
    if table.metadata().current_snapshot().is_none() {
        return Ok(Vec::new());
    }
    let tasks: Vec<iceberg::scan::FileScanTask> = table
        .scan()
        .with_filter(scope.predicate())
        .build()
        .map_err(|e| lake_error("planning the query", e))?
        .plan_files()
        .await
        .map_err(|e| lake_error("planning the query", e))?
        .try_collect()
        .await
        .map_err(|e| lake_error("planning the query", e))?;
    Ok(tasks
        .into_iter()
        .map(|t| (t.data_file_path, t.file_size_in_bytes))
        .collect())
}

/// The keys among `candidates` that the table already holds, looked for within `scope` with
/// iceberg-rust's scan (tables with delete files, which it applies). The caller has checked
/// that there are candidates and a snapshot.
async fn existing_keys_by_scan(
    table: &Table,
    lake_table: LakeTable,
    candidates: &[(String, String)],
    scope: &KeyScope,
) -> Result<HashSet<(String, String)>, PortError> {
    let scan = key_scan(table, lake_table, candidates, scope)?;
    let batches: Vec<RecordBatch> = scan
        .to_arrow()
        .await
        .map_err(|e| lake_error("scanning for existing keys", e))?
        .try_collect()
        .await
        .map_err(|e| lake_error("reading existing keys", e))?;
    let mut out = HashSet::new();
    for b in &batches {
        let imp = string_column(b, "impression_id")?;
        let click = match lake_table {
            LakeTable::Clicks => Some(string_column(b, "click_id")?),
            LakeTable::Impressions => None,
        };
        for row in 0..b.num_rows() {
            let c = click.map(|c| c.value(row).to_owned()).unwrap_or_default();
            out.insert((imp.value(row).to_owned(), c));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    use arrow_array::{Array, StringArray};

    #[test]
    fn the_key_scope_covers_exactly_the_picked_rows() {
        let rows = RecordBatch::try_from_iter([
            (
                "campaign_id",
                Arc::new(StringArray::from(vec!["c1", "c2", "c3", "c1"])) as Arc<dyn Array>,
            ),
            (
                "impression_time",
                Arc::new(TimestampMicrosecondArray::from(vec![50, 10, 99, 20])) as Arc<dyn Array>,
            ),
        ])
        .unwrap();
        let scope = KeyScope::of_rows(&rows, &[true, false, false, true])
            .unwrap()
            .unwrap();
        assert_eq!(
            scope,
            KeyScope {
                campaigns: ["c1".to_owned()].into(),
                min_time_us: 20,
                max_time_us: 50,
            }
        );
        let all = KeyScope::of_rows(&rows, &[true; 4]).unwrap().unwrap();
        assert_eq!(all.campaigns.len(), 3);
        assert_eq!((all.min_time_us, all.max_time_us), (10, 99));
        assert_eq!(KeyScope::of_rows(&rows, &[false; 4]).unwrap(), None);
        let text = format!("{}", scope.predicate());
        assert!(
            text.contains("campaign_id") && text.contains("impression_time"),
            "{text}"
        );
    }
}
