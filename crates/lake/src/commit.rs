//! The lake's append commit, with bounded metadata.
//!
//! iceberg-rust 0.10's fast append adds one manifest per commit and never merges them, and
//! its snapshots stay in `metadata.json` until something expires them, so every commit reads
//! and writes more than the one before. This commit does what Iceberg's merge append and
//! snapshot expiry do, in the same single catalog update as the append:
//! - the new data files go into a new manifest; once [`CommitSettings::manifest_merge_count`]
//!   manifests smaller than [`CommitSettings::manifest_target_bytes`] would be listed, they are
//!   merged into one (their live entries kept as `EXISTING` with their sequence numbers). A
//!   manifest at or over the target is never read again. So a snapshot lists at most
//!   `merge_count - 1` small manifests plus the full ones, and a commit reads at most
//!   `merge_count - 1` manifests of less than the target each;
//! - the snapshots of `main` past the last [`CommitSettings::snapshots_retained`] are removed
//!   (their files are not deleted: every data file of an append-only table stays live);
//! - the [`CommitLedger`] (which input ranges the table holds) is a table property updated
//!   in the same metadata, so exactly-once does not depend on snapshot history.
//!
//! The catalog update is Glue's `UpdateTable` with the `VersionId` read before the metadata
//! was: a concurrent change to the table (a Glue optimizer's commit) fails it, and the append
//! is retried on the new metadata. The Glue table entry keeps everything but the two
//! metadata-location parameters, exactly as iceberg-rust's Glue catalog writes it.

use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasher, Hasher};
use std::str::FromStr;

use adpipe_core::ledger::{CommitLedger, LEDGER_PROPERTY};
use adpipe_core::ports::PortError;
use iceberg::io::FileIO;
use iceberg::spec::{
    DataFile, FormatVersion, ManifestContentType, ManifestFile, ManifestListWriter, ManifestWriter,
    ManifestWriterBuilder, Operation, Snapshot, SnapshotRef, SnapshotReference, SnapshotRetention,
    SnapshotSummaryCollector, Summary, TableMetadata, MAIN_BRANCH,
};
use iceberg::table::Table;
use iceberg::MetadataLocation;

/// How the append keeps the table's metadata bounded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CommitSettings {
    /// Snapshots of `main` kept (the newest ones); at least 1.
    pub snapshots_retained: usize,
    /// Small manifests listed before they are merged into one; at least 2.
    pub manifest_merge_count: usize,
    /// A manifest this large is full: never merged again.
    pub manifest_target_bytes: i64,
    /// What the commit ledger keeps.
    pub ledger: adpipe_core::ledger::LedgerLimits,
}

impl Default for CommitSettings {
    fn default() -> Self {
        CommitSettings {
            snapshots_retained: 32,
            manifest_merge_count: 16,
            manifest_target_bytes: 512 * 1024,
            ledger: adpipe_core::ledger::LedgerLimits::default(),
        }
    }
}

/// What one commit read and did, for the metrics and the soak benchmark.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CommitStats {
    /// Manifests listed by the new snapshot.
    pub manifests: usize,
    /// Manifests read (and merged) by this commit.
    pub manifests_merged: usize,
    /// Snapshots removed by this commit.
    pub snapshots_expired: usize,
    /// Snapshots in the new metadata.
    pub snapshots: usize,
}

fn err(context: &'static str) -> impl Fn(iceberg::Error) -> PortError {
    move |e| iceberg_error(context, e)
}

pub(crate) fn iceberg_error(context: &str, e: iceberg::Error) -> PortError {
    let message = format!("{context}: {e}");
    if e.retryable() {
        PortError::Unavailable(message)
    } else {
        PortError::Rejected(message)
    }
}

/// The table's ledger: its property, or (a table written before the ledger existed) the
/// input ranges recorded in its snapshot ancestry, oldest first.
pub fn ledger_of(
    table: &Table,
    limits: adpipe_core::ledger::LedgerLimits,
) -> Result<CommitLedger, PortError> {
    if let Some(json) = table.metadata().properties().get(LEDGER_PROPERTY) {
        return CommitLedger::parse(json).map_err(PortError::Rejected);
    }
    let mut ledger = CommitLedger::default();
    let metadata = table.metadata();
    let mut history = Vec::new();
    let mut next = metadata.current_snapshot().cloned();
    while let Some(snapshot) = next {
        history.push(snapshot.clone());
        next = snapshot
            .parent_snapshot_id()
            .and_then(|p| metadata.snapshot_by_id(p).cloned());
    }
    for snapshot in history.iter().rev() {
        if let Some((id, range)) = crate::snapshot_input(snapshot) {
            ledger.record(&range, &id, snapshot.timestamp_ms(), limits);
        }
    }
    Ok(ledger)
}

fn random_id(seed: &str, taken: &HashSet<i64>) -> i64 {
    loop {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write(seed.as_bytes());
        h.write_u128(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or_default(),
        );
        let id = (h.finish() >> 1) as i64;
        if id != 0 && !taken.contains(&id) {
            return id;
        }
    }
}

/// Sums a `total-*` summary value with what this commit adds.
fn total(previous: Option<&Summary>, key: &str, added: u64) -> Option<String> {
    let before = match previous {
        None => 0,
        Some(s) => s.additional_properties.get(key)?.parse::<u64>().ok()?,
    };
    Some((before + added).to_string())
}

/// Stages the append: writes the manifests and the manifest list, and returns the new
/// metadata (not yet written or committed) with what it did.
pub(crate) async fn stage_append(
    table: &Table,
    files: &[DataFile],
    properties: HashMap<String, String>,
    ledger: &CommitLedger,
    settings: &CommitSettings,
) -> Result<(TableMetadata, CommitStats), PortError> {
    let metadata = table.metadata();
    if metadata.format_version() != FormatVersion::V2 {
        return Err(PortError::Rejected(format!(
            "the lake writes Iceberg format v2 tables; this one is {:?}",
            metadata.format_version()
        )));
    }
    let taken: HashSet<i64> = metadata.snapshots().map(|s| s.snapshot_id()).collect();
    let snapshot_id = random_id(
        properties.get(crate::BATCH_ID).map_or("", |s| s.as_str()),
        &taken,
    );
    let parent = metadata.current_snapshot();
    let sequence_number = metadata.next_sequence_number();
    let meta_dir = format!("{}/metadata", metadata.location());

    let existing = listed_manifests(table, parent).await?;
    let (listed, merged, added) =
        write_manifest(table, snapshot_id, &meta_dir, existing, files, settings).await?;
    let manifests = listed.len();
    let list_path = format!("{meta_dir}/snap-{snapshot_id}-0-adpipe.avro");
    write_manifest_list(
        table,
        &list_path,
        snapshot_id,
        parent,
        sequence_number,
        listed,
    )
    .await?;

    let snapshot = Snapshot::builder()
        .with_snapshot_id(snapshot_id)
        .with_parent_snapshot_id(parent.map(|p| p.snapshot_id()))
        .with_sequence_number(sequence_number)
        .with_timestamp_ms(crate::lease::now_ms())
        .with_manifest_list(list_path)
        .with_summary(snapshot_summary(parent, added, properties))
        .with_schema_id(metadata.current_schema_id())
        .build();
    let expire = expired_snapshots(metadata, parent, settings.snapshots_retained);
    let staged = updated_metadata(table, snapshot, &expire, ledger)?;
    let stats = CommitStats {
        manifests,
        manifests_merged: merged,
        snapshots_expired: expire.len(),
        snapshots: staged.snapshots().len(),
    };
    Ok((staged, stats))
}

/// The manifests the parent snapshot lists (none for a table's first snapshot).
async fn listed_manifests(
    table: &Table,
    parent: Option<&SnapshotRef>,
) -> Result<Vec<ManifestFile>, PortError> {
    Ok(match parent {
        Some(p) => table
            .manifest_list_reader(p)
            .load()
            .await
            .map_err(err("reading the manifest list"))?
            .consume_entries()
            .into_iter()
            .collect(),
        None => Vec::new(),
    })
}

/// Writes the new snapshot's manifest: the new data files and, once
/// [`CommitSettings::manifest_merge_count`] small manifests would be listed, the live entries
/// of the small ones merged into it. Returns the manifests the snapshot lists (the new one
/// last), how many were merged, and the summary of what the new files add.
async fn write_manifest(
    table: &Table,
    snapshot_id: i64,
    meta_dir: &str,
    existing: Vec<ManifestFile>,
    files: &[DataFile],
    settings: &CommitSettings,
) -> Result<(Vec<ManifestFile>, usize, HashMap<String, String>), PortError> {
    let metadata = table.metadata();
    let file_io = table.file_io();
    let schema = metadata.current_schema().clone();
    let spec = metadata.default_partition_spec().as_ref().clone();
    let target = settings.manifest_target_bytes.max(1);
    let is_small = |m: &ManifestFile| {
        m.content == ManifestContentType::Data
            && m.manifest_length < target
            && m.partition_spec_id == spec.spec_id()
    };
    let small = existing.iter().filter(|m| is_small(m)).count();
    let merge = small + 1 >= settings.manifest_merge_count.max(2);

    let output = file_io
        .new_output(format!("{meta_dir}/{snapshot_id}-m0.avro"))
        .map_err(err("naming the manifest"))?;
    let mut writer =
        ManifestWriterBuilder::new(output, Some(snapshot_id), schema.clone(), spec.clone())
            .build_v2_data();
    let mut listed = Vec::new();
    let mut merged = 0;
    for manifest in existing {
        if !(merge && is_small(&manifest)) {
            listed.push(manifest);
            continue;
        }
        merged += 1;
        merge_manifest(&mut writer, &manifest, file_io).await?;
    }
    let mut summary = SnapshotSummaryCollector::default();
    for file in files {
        summary.add_file(
            file,
            schema.clone(),
            metadata.default_partition_spec().clone(),
        );
        writer
            .add_file(file.clone(), -1)
            .map_err(err("listing a new data file"))?;
    }
    listed.push(
        writer
            .write_manifest_file()
            .await
            .map_err(err("writing the manifest"))?,
    );
    Ok((listed, merged, summary.build()))
}

/// Adds the live entries of `manifest` to `writer` as `EXISTING`, with their snapshot ids and
/// sequence numbers.
async fn merge_manifest(
    writer: &mut ManifestWriter,
    manifest: &ManifestFile,
    file_io: &FileIO,
) -> Result<(), PortError> {
    let entries = manifest
        .load_manifest(file_io)
        .await
        .map_err(err("reading a manifest to merge"))?;
    for entry in entries.entries() {
        if !entry.is_alive() {
            continue;
        }
        let (Some(snap), Some(seq)) = (entry.snapshot_id(), entry.sequence_number()) else {
            return Err(PortError::Rejected(format!(
                "manifest {} has a live entry without its snapshot id or sequence number",
                manifest.manifest_path
            )));
        };
        writer
            .add_existing_file(
                entry.data_file().clone(),
                snap,
                seq,
                entry.file_sequence_number.or(Some(seq)),
            )
            .map_err(err("merging a manifest entry"))?;
    }
    Ok(())
}

/// Writes the new snapshot's manifest list at `list_path`.
async fn write_manifest_list(
    table: &Table,
    list_path: &str,
    snapshot_id: i64,
    parent: Option<&SnapshotRef>,
    sequence_number: i64,
    listed: Vec<ManifestFile>,
) -> Result<(), PortError> {
    let list_out = table
        .file_io()
        .new_output(list_path)
        .map_err(err("naming the manifest list"))?
        .writer()
        .await
        .map_err(err("opening the manifest list"))?;
    let mut list = ManifestListWriter::v2(
        list_out,
        snapshot_id,
        parent.map(|p| p.snapshot_id()),
        sequence_number,
    );
    list.add_manifests(listed.into_iter())
        .map_err(err("listing the manifests"))?;
    list.close().await.map_err(err("writing the manifest list"))
}

/// The new snapshot's summary: `properties` (the input range), what the new files add, and
/// the parent's `total-*` values with the additions.
fn snapshot_summary(
    parent: Option<&SnapshotRef>,
    added: HashMap<String, String>,
    mut properties: HashMap<String, String>,
) -> Summary {
    let get = |k: &str| {
        added
            .get(k)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let previous = parent.map(|p| p.summary());
    for (key, add) in [
        ("total-records", get("added-records")),
        ("total-data-files", get("added-data-files")),
        ("total-files-size", get("added-files-size")),
        ("total-delete-files", 0),
        ("total-position-deletes", 0),
        ("total-equality-deletes", 0),
    ] {
        if let Some(v) = total(previous, key, add) {
            properties.insert(key.to_owned(), v);
        }
    }
    properties.extend(added);
    Summary {
        operation: Operation::Append,
        additional_properties: properties,
    }
}

/// The snapshots of main's ancestry past the newest `retained` (the new one counts). The
/// lake's tables have no other branch or tag (iceberg-rust does not list a table's refs).
fn expired_snapshots(
    metadata: &TableMetadata,
    parent: Option<&SnapshotRef>,
    retained: usize,
) -> Vec<i64> {
    let mut expire = Vec::new();
    let mut kept = 1;
    let mut next = parent.cloned();
    while let Some(s) = next {
        if kept < retained.max(1) {
            kept += 1;
        } else {
            expire.push(s.snapshot_id());
        }
        next = s
            .parent_snapshot_id()
            .and_then(|p| metadata.snapshot_by_id(p).cloned());
    }
    expire
}

/// The table's metadata with `snapshot` added as main's head, the `expire` snapshots removed
/// and the ledger recorded.
fn updated_metadata(
    table: &Table,
    snapshot: Snapshot,
    expire: &[i64],
    ledger: &CommitLedger,
) -> Result<TableMetadata, PortError> {
    let metadata = table.metadata();
    let snapshot_id = snapshot.snapshot_id();
    let mut props = metadata.properties().clone();
    props.insert(LEDGER_PROPERTY.to_owned(), ledger.to_json());
    Ok(metadata
        .clone()
        .into_builder(table.metadata_location().map(str::to_owned))
        .add_snapshot(snapshot)
        .map_err(err("adding the snapshot"))?
        .set_ref(
            MAIN_BRANCH,
            SnapshotReference::new(snapshot_id, SnapshotRetention::branch(None, None, None)),
        )
        .map_err(err("moving main"))?
        .remove_snapshots(expire)
        .set_properties(props)
        .map_err(err("recording the ledger"))?
        .build()
        .map_err(err("building the new metadata"))?
        .metadata)
}

/// The Glue side of a commit: the table entry as read, to be updated conditionally.
pub(crate) struct GlueEntry {
    pub version_id: Option<String>,
    pub metadata_location: String,
    table: aws_sdk_glue::types::Table,
}

fn glue_error<E: std::fmt::Debug>(context: &str, e: aws_sdk_glue::error::SdkError<E>) -> PortError {
    let retryable = matches!(
        e,
        aws_sdk_glue::error::SdkError::TimeoutError(_)
            | aws_sdk_glue::error::SdkError::DispatchFailure(_)
            | aws_sdk_glue::error::SdkError::ResponseError(_)
    ) || e.raw_response().is_some_and(|r| {
        let s = r.status().as_u16();
        s >= 500 || s == 429
    }) || format!("{e:?}").contains("ConcurrentModification");
    let message = format!("{context}: {e:?}");
    if retryable {
        PortError::Unavailable(message)
    } else {
        PortError::Rejected(message)
    }
}

pub(crate) async fn glue_entry(
    glue: &aws_sdk_glue::Client,
    database: &str,
    name: &str,
) -> Result<GlueEntry, PortError> {
    let out = glue
        .get_table()
        .database_name(database)
        .name(name)
        .send()
        .await
        .map_err(|e| glue_error("reading the table's catalog entry", e))?;
    let table = out
        .table
        .ok_or_else(|| PortError::Rejected(format!("{database}.{name}: no table returned")))?;
    let metadata_location = table
        .parameters()
        .and_then(|p| p.get("metadata_location"))
        .cloned()
        .ok_or_else(|| {
            PortError::Rejected(format!(
                "{database}.{name} is not an Iceberg table (no metadata_location)"
            ))
        })?;
    Ok(GlueEntry {
        version_id: table.version_id().map(str::to_owned),
        metadata_location,
        table,
    })
}

/// Writes the staged metadata next to the current one and points the catalog at it, if the
/// catalog entry is still the one read.
pub(crate) async fn publish(
    glue: &aws_sdk_glue::Client,
    database: &str,
    entry: &GlueEntry,
    table: &Table,
    staged: &TableMetadata,
) -> Result<String, PortError> {
    let location = MetadataLocation::from_str(&entry.metadata_location)
        .map_err(err("reading the metadata location"))?
        .with_next_version()
        .with_new_metadata(staged);
    staged
        .write_to(table.file_io(), &location)
        .await
        .map_err(err("writing the metadata"))?;
    let location = location.to_string();
    let current = &entry.table;
    let mut parameters = current.parameters().cloned().unwrap_or_default();
    parameters.insert("metadata_location".into(), location.clone());
    parameters.insert(
        "previous_metadata_location".into(),
        entry.metadata_location.clone(),
    );
    let input = aws_sdk_glue::types::TableInput::builder()
        .name(current.name())
        .set_description(current.description().map(str::to_owned))
        .set_table_type(current.table_type().map(str::to_owned))
        .set_storage_descriptor(current.storage_descriptor().cloned())
        .set_parameters(Some(parameters))
        .build()
        .map_err(|e| PortError::Rejected(format!("building the catalog update: {e}")))?;
    let mut update = glue
        .update_table()
        .database_name(database)
        .skip_archive(true)
        .table_input(input);
    if let Some(v) = &entry.version_id {
        update = update.version_id(v);
    }
    update
        .send()
        .await
        .map_err(|e| glue_error("updating the table's catalog entry", e))?;
    Ok(location)
}
