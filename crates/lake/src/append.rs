//! The append path: the `TableWriter` port. A batch found in the table's ledger is skipped,
//! rows whose keys the table already holds are dropped, the rest written as data files and
//! committed under the table's lease, with bounded retries that never re-append a batch that
//! may have landed.

use std::collections::{HashMap, HashSet};

use adpipe_core::ports::{AppendReport, InputRange, LakeAppend, PortError, TableWriter};
use arrow_array::BooleanArray;
use iceberg::spec::DataFile;
use iceberg::table::Table;
use iceberg::TableIdent;

use crate::{
    commit, key_check_candidates, lease, CommitStats, IcebergLake, KeyScope, BATCH_ID, INPUT_FIRST,
    INPUT_LAST, INPUT_SHARD, INPUT_STREAM,
};

impl IcebergLake {
    /// One commit attempt under the lease. `Ok(None)`: the range was already in the table.
    async fn commit_once(
        &self,
        ident: &TableIdent,
        batch_id: &str,
        input: &InputRange,
        files: &[DataFile],
        loaded: &Table,
    ) -> Result<Option<CommitStats>, PortError> {
        let lease = self.lease.acquire(&ident.to_string(), &self.owner).await?;
        let result = async {
            // The catalog entry first: its version guards the update, so whatever changes the
            // table after this read fails the commit instead of being overwritten. The table
            // loaded before the lease is reused when it is still the current one (the usual
            // case: the lease holder's time is what bounds a table's commits per second).
            let entry = commit::glue_entry(&self.glue, &self.config.database, ident.name()).await?;
            let table = if loaded.metadata_location() == Some(entry.metadata_location.as_str()) {
                loaded.clone()
            } else {
                self.load(ident).await?
            };
            if table.metadata_location() != Some(entry.metadata_location.as_str()) {
                return Err(PortError::Unavailable(format!(
                    "{ident} changed while it was being read; retrying"
                )));
            }
            let mut ledger = commit::ledger_of(&table, self.config.commit.ledger)?;
            if ledger.has_batch(input, batch_id) {
                return Ok(None);
            }
            ledger.record(input, batch_id, lease::now_ms(), self.config.commit.ledger);
            let props = HashMap::from([
                (BATCH_ID.to_owned(), batch_id.to_owned()),
                (INPUT_STREAM.to_owned(), input.stream.clone()),
                (INPUT_SHARD.to_owned(), input.shard.clone()),
                (INPUT_FIRST.to_owned(), input.first_sequence.clone()),
                (INPUT_LAST.to_owned(), input.last_sequence.clone()),
            ]);
            let (staged, stats) =
                commit::stage_append(&table, files, props, &ledger, &self.config.commit).await?;
            commit::publish(&self.glue, &self.config.database, &entry, &table, &staged).await?;
            Ok(Some(stats))
        }
        .await;
        let released = self.lease.release(lease).await;
        let stats = result?;
        released?;
        Ok(stats)
    }

    /// Whether the table's ledger holds exactly this batch (after a commit whose outcome is
    /// unknown).
    async fn has_batch(&self, ident: &TableIdent, input: &InputRange, batch_id: &str) -> bool {
        match self.load(ident).await {
            Ok(table) => commit::ledger_of(&table, self.config.commit.ledger)
                .is_ok_and(|l| l.has_batch(input, batch_id)),
            Err(_) => false,
        }
    }
}

impl TableWriter for IcebergLake {
    async fn append(&self, append: LakeAppend) -> Result<AppendReport, PortError> {
        let ident = self.ident(append.table);
        let batch_id = append.input.batch_id();
        let mut report = AppendReport::default();
        let table = self.load(&ident).await?;
        let ledger = commit::ledger_of(&table, self.config.commit.ledger)?;
        if ledger.has_batch(&append.input, &batch_id) {
            report.already_committed = true;
            return Ok(report);
        }

        // Rows that may already be there: flagged repeats, and every row of a batch that
        // overlaps a committed range (a re-split retry of work that landed).
        let overlap = ledger.overlaps(&append.input);
        let (pick, doubtful) = key_check_candidates(&append, overlap);
        let existing = match KeyScope::of_rows(&append.rows, &pick)? {
            Some(scope) => {
                self.existing_keys(&table, append.table, &doubtful, &scope)
                    .await?
            }
            None => HashSet::new(),
        };
        let keep: Vec<bool> = append
            .keys
            .iter()
            .zip(&append.in_doubt)
            .map(|(k, d)| !((overlap || *d) && existing.contains(k)))
            .collect();
        report.duplicates_dropped = keep.iter().filter(|k| !**k).count() as u64;
        let rows = if report.duplicates_dropped == 0 {
            append.rows
        } else {
            arrow_select::filter::filter_record_batch(&append.rows, &BooleanArray::from(keep))
                .map_err(|e| PortError::Rejected(format!("dropping duplicate rows: {e}")))?
        };
        if rows.num_rows() == 0 {
            return Ok(report);
        }

        let files = self.write_files(&table, &batch_id, &rows).await?;
        report.files_written = files.len() as u64;
        report.bytes_written = files.iter().map(|f| f.file_size_in_bytes()).sum();
        report.rows_written = files.iter().map(|f| f.record_count()).sum();

        let attempts = self.config.max_commit_attempts.max(1);
        for attempt in 1..=attempts {
            match self
                .commit_once(&ident, &batch_id, &append.input, &files, &table)
                .await
            {
                Ok(stats) => {
                    report.already_committed = stats.is_none();
                    if stats.is_none() {
                        report.rows_written = 0;
                    }
                    return Ok(report);
                }
                Err(e) => {
                    // Never re-append blindly: the failed attempt may have landed.
                    if self.has_batch(&ident, &append.input, &batch_id).await {
                        return Ok(report);
                    }
                    if attempt == attempts {
                        return Err(e);
                    }
                    report.commit_retries += 1;
                    tracing::warn!(table = %ident, attempt, error = %e, "lake commit failed; retrying");
                }
            }
        }
        Ok(report)
    }
}
