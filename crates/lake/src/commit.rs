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
//! - snapshots expire by age, as Iceberg's `ExpireSnapshots` does with the table's
//!   `history.expire.*` properties: a snapshot of a branch's ancestry is kept while it is younger
//!   than [`CommitSettings::snapshot_max_age_ms`] or among the branch's newest
//!   [`CommitSettings::min_snapshots`]; a tag's snapshot and every branch head are always kept,
//!   and a ref's own retention settings take precedence; a snapshot no ref reaches goes once it
//!   is older than the age. So another writer (Glue compaction, an Athena `DELETE`), whose
//!   commit validates against the snapshot it started from, finds it for as long as it is
//!   younger than the age, however busy the table. Data files are never deleted here;
//! - the metadata files that fall out of the metadata log (`write.metadata.previous-versions-max`)
//!   are deleted after the commit when `write.metadata.delete-after-commit.enabled` is set;
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
    /// Snapshots younger than this are never expired (milliseconds): the table property
    /// `history.expire.max-snapshot-age-ms`.
    pub snapshot_max_age_ms: i64,
    /// Snapshots of a branch kept whatever their age, the newest ones; at least 1:
    /// `history.expire.min-snapshots-to-keep`.
    pub min_snapshots: usize,
    /// Previous metadata files listed in the metadata log, the older ones deleted:
    /// `write.metadata.previous-versions-max`.
    pub previous_metadata: usize,
    /// At most this many snapshots stay, whatever their age: a table committed to faster than
    /// `max_snapshots / snapshot_max_age_ms` keeps a shorter history (counted as
    /// [`CommitStats::snapshots_expired_early`]) instead of a `metadata.json` that grows with
    /// the commit rate. Ref heads, tags and `min_snapshots` are kept even past it.
    pub max_snapshots: usize,
    /// Small manifests listed before they are merged into one; at least 2.
    pub manifest_merge_count: usize,
    /// A manifest this large is full: never merged again.
    pub manifest_target_bytes: i64,
    /// What the commit ledger keeps.
    pub ledger: adpipe_core::ledger::LedgerLimits,
}

/// Snapshot retention by default: one hour (`docs/DESIGN.md`, "Sharing the tables").
pub const DEFAULT_SNAPSHOT_MAX_AGE_MS: i64 = 3_600_000;

impl Default for CommitSettings {
    fn default() -> Self {
        CommitSettings {
            snapshot_max_age_ms: DEFAULT_SNAPSHOT_MAX_AGE_MS,
            min_snapshots: 1,
            previous_metadata: 20,
            max_snapshots: 2_000,
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
    /// Previous metadata files deleted after the commit.
    pub metadata_deleted: usize,
    /// Snapshots expired younger than the age, because of [`CommitSettings::max_snapshots`].
    pub snapshots_expired_early: usize,
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

/// A staged append: the new metadata (not yet written or committed), what the commit did, and
/// the previous metadata files to delete once it is committed.
pub(crate) struct Staged {
    pub metadata: TableMetadata,
    pub stats: CommitStats,
    pub expired_metadata: Vec<String>,
}

/// Stages the append: writes the manifests and the manifest list, and returns the new
/// metadata with what it did.
pub(crate) async fn stage_append(
    table: &Table,
    files: &[DataFile],
    properties: HashMap<String, String>,
    ledger: &CommitLedger,
    settings: &CommitSettings,
) -> Result<Staged, PortError> {
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

    let now_ms = crate::lease::now_ms();
    let snapshot = Snapshot::builder()
        .with_snapshot_id(snapshot_id)
        .with_parent_snapshot_id(parent.map(|p| p.snapshot_id()))
        .with_sequence_number(sequence_number)
        .with_timestamp_ms(now_ms)
        .with_manifest_list(list_path)
        .with_summary(snapshot_summary(parent, added, properties))
        .with_schema_id(metadata.current_schema_id())
        .build();
    let mut refs = table_refs(metadata)?;
    let main = refs
        .remove(MAIN_BRANCH)
        .map(|r| r.retention)
        .unwrap_or_else(|| SnapshotRetention::branch(None, None, None));
    let mut history: HashMap<i64, (Option<i64>, i64)> = metadata
        .snapshots()
        .map(|s| (s.snapshot_id(), (s.parent_snapshot_id(), s.timestamp_ms())))
        .collect();
    history.insert(
        snapshot_id,
        (parent.map(|p| p.snapshot_id()), snapshot.timestamp_ms()),
    );
    let mut kept: Vec<(String, SnapshotReference)> = refs.into_iter().collect();
    kept.push((
        MAIN_BRANCH.to_owned(),
        SnapshotReference::new(snapshot_id, main.clone()),
    ));
    let Expiry { expire, early } = snapshots_to_expire(&history, &kept, settings, now_ms);
    let (staged, expired_metadata) = updated_metadata(table, snapshot, main, &expire, ledger)?;
    let delete_old = metadata
        .properties()
        .get("write.metadata.delete-after-commit.enabled")
        .is_some_and(|v| v.eq_ignore_ascii_case("true"));
    let stats = CommitStats {
        manifests,
        manifests_merged: merged,
        snapshots_expired: expire.len(),
        snapshots: staged.snapshots().len(),
        metadata_deleted: 0,
        snapshots_expired_early: early,
    };
    Ok(Staged {
        metadata: staged,
        stats,
        expired_metadata: if delete_old {
            expired_metadata
        } else {
            Vec::new()
        },
    })
}

/// The table's refs (branches and tags) with their retention settings. iceberg-rust 0.10 does
/// not list them, so they are read from the metadata's JSON form (format v2: `refs`).
fn table_refs(metadata: &TableMetadata) -> Result<HashMap<String, SnapshotReference>, PortError> {
    let json = serde_json::to_value(metadata)
        .map_err(|e| PortError::Rejected(format!("reading the table's refs: {e}")))?;
    match json.get("refs") {
        None | Some(serde_json::Value::Null) => Ok(HashMap::new()),
        Some(refs) => serde_json::from_value(refs.clone())
            .map_err(|e| PortError::Rejected(format!("reading the table's refs: {e}"))),
    }
}

/// What an expiry removes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expiry {
    /// The snapshot ids, ascending.
    pub expire: Vec<i64>,
    /// How many of them were younger than the age ([`CommitSettings::max_snapshots`]).
    pub early: usize,
}

/// The snapshots an expiry at `now_ms` removes, as Iceberg's `ExpireSnapshots` decides with
/// the table's `history.expire.*` properties ([`CommitSettings`]):
/// - each branch keeps, along its ancestry, its newest `min_snapshots_to_keep` and every
///   snapshot younger than `max_snapshot_age_ms` (the ref's own settings, else the table's);
///   the first ancestor past both ends the walk;
/// - each tag keeps its snapshot;
/// - any other snapshot goes once it is older than the table's age;
/// - then, while more than [`CommitSettings::max_snapshots`] would stay, main's oldest kept
///   ancestors go (never a ref's snapshot or one of main's newest `min_snapshots`).
///
/// `history` maps every snapshot id to its parent and timestamp; `refs` are all the refs,
/// main included (its head the new snapshot).
pub fn snapshots_to_expire(
    history: &HashMap<i64, (Option<i64>, i64)>,
    refs: &[(String, SnapshotReference)],
    settings: &CommitSettings,
    now_ms: i64,
) -> Expiry {
    let mut kept: HashSet<i64> = HashSet::new();
    let mut main_kept: Vec<i64> = Vec::new();
    for (name, reference) in refs {
        kept.insert(reference.snapshot_id);
        let SnapshotRetention::Branch {
            min_snapshots_to_keep,
            max_snapshot_age_ms,
            ..
        } = &reference.retention
        else {
            continue;
        };
        let min_keep = min_snapshots_to_keep
            .map_or(settings.min_snapshots, |n| n.max(1) as usize)
            .max(1);
        let cutoff = now_ms - max_snapshot_age_ms.unwrap_or(settings.snapshot_max_age_ms);
        let mut walked = 0;
        let mut next = Some(reference.snapshot_id);
        while let Some(id) = next {
            let Some((parent, at)) = history.get(&id) else {
                break;
            };
            if walked >= min_keep && *at < cutoff {
                break;
            }
            kept.insert(id);
            if name == MAIN_BRANCH && walked >= min_keep {
                main_kept.push(id);
            }
            walked += 1;
            next = *parent;
        }
    }
    let cutoff = now_ms - settings.snapshot_max_age_ms;
    let mut expire: Vec<i64> = history
        .iter()
        .filter(|(id, (_, at))| !kept.contains(id) && *at < cutoff)
        .map(|(id, _)| *id)
        .collect();
    let protected: HashSet<i64> = refs.iter().map(|(_, r)| r.snapshot_id).collect();
    let mut staying = history.len() - expire.len();
    let mut early = 0;
    for id in main_kept.iter().rev() {
        if staying <= settings.max_snapshots.max(1) {
            break;
        }
        if protected.contains(id) {
            continue;
        }
        expire.push(*id);
        staying -= 1;
        early += 1;
    }
    expire.sort_unstable();
    Expiry { expire, early }
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

/// The table's metadata with `snapshot` added as main's head (main keeping its retention
/// settings), the `expire` snapshots removed and the ledger recorded; and the previous
/// metadata files that fell out of the metadata log.
fn updated_metadata(
    table: &Table,
    snapshot: Snapshot,
    main: SnapshotRetention,
    expire: &[i64],
    ledger: &CommitLedger,
) -> Result<(TableMetadata, Vec<String>), PortError> {
    let metadata = table.metadata();
    let snapshot_id = snapshot.snapshot_id();
    let mut props = metadata.properties().clone();
    props.insert(LEDGER_PROPERTY.to_owned(), ledger.to_json());
    let built = metadata
        .clone()
        .into_builder(table.metadata_location().map(str::to_owned))
        .add_snapshot(snapshot)
        .map_err(err("adding the snapshot"))?
        .set_ref(MAIN_BRANCH, SnapshotReference::new(snapshot_id, main))
        .map_err(err("moving main"))?
        .remove_snapshots(expire)
        .set_properties(props)
        .map_err(err("recording the ledger"))?
        .build()
        .map_err(err("building the new metadata"))?;
    let expired = built
        .expired_metadata_logs
        .into_iter()
        .map(|l| l.metadata_file)
        .collect();
    Ok((built.metadata, expired))
}

/// Deletes the previous metadata files a committed append let go (best effort: a file left
/// behind is only storage, which orphan file deletion also removes). Returns how many went.
pub(crate) async fn delete_expired_metadata(table: &Table, files: &[String]) -> usize {
    let mut deleted = 0;
    for file in files {
        match table.file_io().delete(file).await {
            Ok(()) => deleted += 1,
            Err(e) => tracing::warn!(%file, error = %e, "could not delete an old metadata file"),
        }
    }
    deleted
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

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: i64 = 60_000;
    const NOW: i64 = 1_000 * MIN;

    /// A chain of snapshots 1..=n, one a minute, the last at `NOW`.
    fn chain(n: i64) -> HashMap<i64, (Option<i64>, i64)> {
        (1..=n)
            .map(|id| (id, ((id > 1).then_some(id - 1), NOW - (n - id) * MIN)))
            .collect()
    }

    fn main_at(id: i64) -> (String, SnapshotReference) {
        (
            MAIN_BRANCH.to_owned(),
            SnapshotReference::new(id, SnapshotRetention::branch(None, None, None)),
        )
    }

    fn settings(age_min: i64, min_snapshots: usize) -> CommitSettings {
        CommitSettings {
            snapshot_max_age_ms: age_min * MIN,
            min_snapshots,
            ..CommitSettings::default()
        }
    }

    #[test]
    fn snapshots_younger_than_the_age_stay_however_many_commits_there_were() {
        // 120 commits in two hours, an hour's retention: the last 61 (ages 0..=60 min) stay.
        let history = chain(120);
        let expire = snapshots_to_expire(&history, &[main_at(120)], &settings(60, 1), NOW).expire;
        assert_eq!(expire, (1..=59).collect::<Vec<_>>());
        // A foreign operation that started from snapshot 60 (60 minutes old) still finds it.
        assert!(!expire.contains(&60));
        // min-snapshots-to-keep holds whatever the age.
        let expire = snapshots_to_expire(&history, &[main_at(120)], &settings(0, 5), NOW).expire;
        assert_eq!(expire, (1..=115).collect::<Vec<_>>());
    }

    #[test]
    fn past_the_snapshot_cap_main_keeps_its_newest_and_the_early_ones_are_counted() {
        // An hour's retention, but 120 commits in the last hour and a cap of 50.
        let history: HashMap<i64, (Option<i64>, i64)> = (1..=120)
            .map(|id| (id, ((id > 1).then_some(id - 1), NOW - (120 - id) * 20_000)))
            .collect();
        let refs = vec![
            main_at(120),
            (
                "audit".to_owned(),
                SnapshotReference::new(
                    3,
                    SnapshotRetention::Tag {
                        max_ref_age_ms: None,
                    },
                ),
            ),
        ];
        let capped = CommitSettings {
            max_snapshots: 50,
            ..settings(60, 1)
        };
        let e = snapshots_to_expire(&history, &refs, &capped, NOW);
        let staying: Vec<i64> = (1..=120).filter(|id| !e.expire.contains(id)).collect();
        assert_eq!(staying.len(), 50);
        assert!(staying.contains(&3), "the tag stays");
        assert_eq!(staying.last(), Some(&120));
        assert_eq!(
            staying[1..],
            (72..=120).collect::<Vec<_>>()[..],
            "the newest"
        );
        assert_eq!(e.early, 70);
        // Under the cap nothing goes early.
        let e = snapshots_to_expire(&history, &refs, &settings(60, 1), NOW);
        assert_eq!((e.expire.len(), e.early), (0, 0));
    }

    #[test]
    fn tags_branches_and_a_refs_own_retention_are_kept() {
        let mut history = chain(100);
        // A side branch off snapshot 10, its head 200 (old), and a young unreferenced snapshot.
        history.insert(200, (Some(10), NOW - 90 * MIN));
        history.insert(300, (Some(50), NOW - MIN));
        let refs = vec![
            main_at(100),
            (
                "audit".to_owned(),
                SnapshotReference::new(
                    5,
                    SnapshotRetention::Tag {
                        max_ref_age_ms: None,
                    },
                ),
            ),
            (
                "experiment".to_owned(),
                SnapshotReference::new(200, SnapshotRetention::branch(Some(2), Some(MIN), None)),
            ),
        ];
        let expire = snapshots_to_expire(&history, &refs, &settings(30, 1), NOW).expire;
        for kept in [5, 200, 10, 300, 70, 100] {
            assert!(!expire.contains(&kept), "{kept} expired: {expire:?}");
        }
        for gone in [1, 4, 6, 9, 11, 69] {
            assert!(expire.contains(&gone), "{gone} kept: {expire:?}");
        }
        // Main's own retention overrides the table's.
        let long_main = vec![(
            MAIN_BRANCH.to_owned(),
            SnapshotReference::new(100, SnapshotRetention::branch(None, Some(200 * MIN), None)),
        )];
        assert!(
            snapshots_to_expire(&chain(100), &long_main, &settings(30, 1), NOW)
                .expire
                .is_empty()
        );
    }
}
