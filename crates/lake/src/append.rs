//! The append path: the `TableWriter` port. A batch found in the table's ledger is skipped,
//! rows whose keys the table already holds are dropped, the rest written as data files and
//! committed under the table's lease, with bounded retries that never re-append a batch that
//! may have landed.

use std::collections::{HashMap, HashSet};

use adpipe_core::ports::{AppendReport, InputRange, LakeAppend, PortError, TableWriter};
use arrow_array::{BooleanArray, RecordBatch};
use iceberg::spec::DataFile;
use iceberg::table::Table;
use iceberg::TableIdent;

use crate::{
    commit, key_check_candidates, lease, CommitStats, IcebergLake, KeyScope, BATCH_ID, INPUT_FIRST,
    INPUT_LAST, INPUT_SHARD, INPUT_STREAM,
};

impl IcebergLake {
    /// One commit attempt under the lease, of `files` written for partition spec `spec_id`.
    async fn commit_once(
        &self,
        ident: &TableIdent,
        batch_id: &str,
        input: &InputRange,
        (spec_id, files): (i32, &[DataFile]),
        loaded: &Table,
    ) -> Result<Attempt, PortError> {
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
                return Ok(Attempt::AlreadyThere);
            }
            ledger.record(input, batch_id, lease::now_ms(), self.config.commit.ledger);
            let props = HashMap::from([
                (BATCH_ID.to_owned(), batch_id.to_owned()),
                (INPUT_STREAM.to_owned(), input.stream.clone()),
                (INPUT_SHARD.to_owned(), input.shard.clone()),
                (INPUT_FIRST.to_owned(), input.first_sequence.clone()),
                (INPUT_LAST.to_owned(), input.last_sequence.clone()),
            ]);
            // Files written for another partition spec than the table's current one (another
            // writer changed the spec since) would be listed under the wrong spec: write
            // them again for the current one.
            if table.metadata().default_partition_spec_id() != spec_id {
                return Ok(Attempt::SpecChanged);
            }
            let staged =
                commit::stage_append(&table, files, props, &ledger, &self.config.commit).await?;
            commit::publish(
                &self.glue,
                &self.config.database,
                &entry,
                &table,
                &staged.metadata,
            )
            .await?;
            let mut stats = staged.stats;
            stats.metadata_deleted =
                commit::delete_expired_metadata(&table, &staged.expired_metadata).await;
            Ok(Attempt::Committed(stats))
        }
        .await;
        let released = self.lease.release(lease).await;
        let attempt = result?;
        released?;
        Ok(attempt)
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

        let mut table = table;
        let (mut spec_id, mut files) = self
            .write_report(&table, &batch_id, &rows, &mut report)
            .await?;
        let attempts = self.config.max_commit_attempts.max(1);
        for attempt in 1..=attempts {
            let outcome = self
                .commit_once(&ident, &batch_id, &append.input, (spec_id, &files), &table)
                .await;
            match outcome {
                Ok(Attempt::Committed(stats)) => {
                    report.metadata_deleted = stats.metadata_deleted as u64;
                    report.snapshots_expired_early = stats.snapshots_expired_early as u64;
                    return Ok(report);
                }
                Ok(Attempt::AlreadyThere) => {
                    report.already_committed = true;
                    report.rows_written = 0;
                    return Ok(report);
                }
                Ok(Attempt::SpecChanged) if attempt < attempts => {
                    report.commit_retries += 1;
                    tracing::warn!(table = %ident, "partition spec changed; writing the batch's files again");
                    table = self.load(&ident).await?;
                    (spec_id, files) = self
                        .write_report(&table, &batch_id, &rows, &mut report)
                        .await?;
                }
                Ok(Attempt::SpecChanged) => {
                    return Err(PortError::Unavailable(format!(
                        "{ident}: the partition spec kept changing while the batch was written"
                    )));
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

impl IcebergLake {
    /// Writes the rows' data files for `table`'s current partition spec and schema, and counts
    /// them in `report`. Returns the spec id they were written for.
    async fn write_report(
        &self,
        table: &Table,
        batch_id: &str,
        rows: &RecordBatch,
        report: &mut AppendReport,
    ) -> Result<(i32, Vec<DataFile>), PortError> {
        let spec_id = table.metadata().default_partition_spec_id();
        let written = self.write_files(table, batch_id, rows).await?;
        report.files_written = written.files.len() as u64;
        report.bytes_written = written.files.iter().map(|f| f.file_size_in_bytes()).sum();
        report.rows_written = written.files.iter().map(|f| f.record_count()).sum();
        report.foreign_columns = written.foreign_columns as u64;
        Ok((spec_id, written.files))
    }
}

/// How one commit attempt ended, short of an error.
enum Attempt {
    Committed(CommitStats),
    /// The batch's range was already in the table (a lost response of an earlier attempt).
    AlreadyThere,
    /// The table's partition spec is not the one the files were written for.
    SpecChanged,
}
