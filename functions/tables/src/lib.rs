//! The stack's `Custom::IcebergTables` resource: CloudFormation calls this function on create,
//! update and delete of the stack, and it makes the Glue database's Iceberg tables exist (with
//! their properties and partition spec) and match this version's schema, so Athena's named
//! queries work right after `sam deploy`, before any traffic.
//!
//! It runs exactly the code the enricher runs at start-up ([`IcebergLake::ensure_tables`]):
//! create a missing table, register one whose location holds retained metadata, and add the
//! columns this version has and the table lacks. A retyped or removed column is refused with an
//! error naming it, which fails the stack update (CloudFormation rolls back) and changes
//! nothing. Delete leaves the tables: their rows are the lake's, and the stack's retained
//! bucket and database keep them (see docs/DEPLOY.md, "Deleting the stack").
//!
//! Every request gets exactly one reply on its `ResponseURL`, failure included: without one,
//! CloudFormation waits an hour for the resource.

use std::collections::BTreeMap;
use std::time::Duration;

use adpipe_aws::Clients;
use adpipe_core::config::TablesConfig;
use adpipe_core::ports::{LakeTable, PortError};
use adpipe_lake::{DynamoDbCommitLease, IcebergLake, LakeConfig, TableSetup};
use aws_lambda_events::event::cloudformation::{
    CloudFormationCustomResourceRequest, CloudFormationCustomResourceResponse,
    CloudFormationCustomResourceResponseStatus,
};
use serde_json::Value;

/// The reply's `Data`: attributes of the resource (`!GetAtt IcebergTables.<key>`).
pub type Data = BTreeMap<String, String>;

/// A CloudFormation request with its properties as JSON.
pub type Request = CloudFormationCustomResourceRequest<Value, Value>;

/// The lake's schema version. The template passes the same number as the resource's
/// `SchemaVersion` property: bump both with a schema change, so that `sam deploy` sends an
/// update, and the update migrates the tables before the new enricher starts.
pub const SCHEMA_VERSION: &str = "1";

/// CloudFormation's reply (the whole JSON body) may be at most 4,096 bytes; the reason is the
/// only part of ours that can be long.
const MAX_REASON_BYTES: usize = 2_048;

/// What the request asks for and where to answer it, whatever its type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestInfo {
    pub kind: &'static str,
    pub request_id: String,
    pub response_url: String,
    pub stack_id: String,
    pub logical_resource_id: String,
    /// The id CloudFormation knows the resource by (absent on create).
    pub physical_resource_id: Option<String>,
    pub properties: Value,
    /// The properties before an update (`Null` otherwise).
    pub old_properties: Value,
}

impl RequestInfo {
    pub fn of(request: &Request) -> RequestInfo {
        match request {
            CloudFormationCustomResourceRequest::Create(r) => RequestInfo {
                kind: "Create",
                request_id: r.request_id.clone(),
                response_url: r.response_url.clone(),
                stack_id: r.stack_id.clone(),
                logical_resource_id: r.logical_resource_id.clone(),
                physical_resource_id: None,
                properties: r.resource_properties.clone(),
                old_properties: Value::Null,
            },
            CloudFormationCustomResourceRequest::Update(r) => RequestInfo {
                kind: "Update",
                request_id: r.request_id.clone(),
                response_url: r.response_url.clone(),
                stack_id: r.stack_id.clone(),
                logical_resource_id: r.logical_resource_id.clone(),
                physical_resource_id: Some(r.physical_resource_id.clone()),
                properties: r.resource_properties.clone(),
                old_properties: r.old_resource_properties.clone(),
            },
            CloudFormationCustomResourceRequest::Delete(r) => RequestInfo {
                kind: "Delete",
                request_id: r.request_id.clone(),
                response_url: r.response_url.clone(),
                stack_id: r.stack_id.clone(),
                logical_resource_id: r.logical_resource_id.clone(),
                physical_resource_id: Some(r.physical_resource_id.clone()),
                properties: r.resource_properties.clone(),
                old_properties: Value::Null,
            },
            // The enum is non-exhaustive; a new request type is answered as a failure.
            #[allow(unreachable_patterns)]
            _ => RequestInfo {
                kind: "Unknown",
                request_id: String::new(),
                response_url: String::new(),
                stack_id: String::new(),
                logical_resource_id: String::new(),
                physical_resource_id: None,
                properties: Value::Null,
                old_properties: Value::Null,
            },
        }
    }
}

/// The resource's physical id: the tables it stands for. Stable across updates, so an update
/// never makes CloudFormation delete the "old" resource.
pub fn physical_id(config: &TablesConfig) -> String {
    format!(
        "{}/{},{}",
        config.database, config.clicks_table, config.impressions_table
    )
}

/// Whether an update goes back to an older `SchemaVersion`: CloudFormation rolling back a
/// failed deploy that had migrated the tables. Iceberg columns are never dropped (rows written
/// with them keep them), so such an update leaves the tables as they are and succeeds; failing
/// it would leave the stack in `UPDATE_ROLLBACK_FAILED`.
pub fn is_schema_rollback(info: &RequestInfo) -> bool {
    let version = |p: &Value| {
        p.get("SchemaVersion")
            .and_then(|v| {
                v.as_str()
                    .map(str::to_owned)
                    .or_else(|| Some(v.to_string()))
            })
            .and_then(|v| v.trim().parse::<u64>().ok())
    };
    info.kind == "Update"
        && matches!(
            (version(&info.properties), version(&info.old_properties)),
            (Some(new), Some(old)) if new < old
        )
}

/// Refuses a request whose properties name another database than the function's
/// configuration: the template passes the same values to both, and a mismatch is a template
/// edit that would otherwise create tables nobody reads.
pub fn check_properties(properties: &Value, config: &TablesConfig) -> Result<(), String> {
    if let Some(database) = properties.get("Database") {
        if database.as_str() != Some(config.database.as_str()) {
            return Err(format!(
                "property Database is {database}, but the function's GLUE_DATABASE is {}",
                config.database
            ));
        }
    }
    if let Some(warehouse) = properties.get("Warehouse") {
        if warehouse.as_str() != Some(config.warehouse().as_str()) {
            return Err(format!(
                "property Warehouse is {warehouse}, but the function's warehouse is {}",
                config.warehouse()
            ));
        }
    }
    Ok(())
}

/// The reply to `info`: success with the tables' names and what was done to each as `Data`
/// (readable with `!GetAtt IcebergTables.ClicksTable`), or failure with the reason.
pub fn response(
    info: &RequestInfo,
    physical_id: &str,
    outcome: Result<Data, String>,
) -> CloudFormationCustomResourceResponse {
    let mut r = CloudFormationCustomResourceResponse::default();
    r.stack_id = info.stack_id.clone();
    r.request_id = info.request_id.clone();
    r.logical_resource_id = info.logical_resource_id.clone();
    r.physical_resource_id = info
        .physical_resource_id
        .clone()
        .unwrap_or_else(|| physical_id.to_owned());
    match outcome {
        Ok(data) => {
            r.status = CloudFormationCustomResourceResponseStatus::Success;
            r.data = data.into_iter().collect();
        }
        Err(reason) => {
            r.status = CloudFormationCustomResourceResponseStatus::Failed;
            r.reason = Some(truncate(&reason, MAX_REASON_BYTES));
        }
    }
    r
}

fn truncate(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_owned();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

/// The lake configuration of the tables function (it writes no data files).
pub fn lake_config(
    config: &TablesConfig,
    endpoint: Option<String>,
    region: Option<String>,
) -> LakeConfig {
    LakeConfig::of_tables(config, endpoint, region, 1)
}

/// Creates or migrates the tables (create and update); nothing on delete. Returns the reply's
/// `Data`, or the reason of the failure.
pub async fn apply(
    info: &RequestInfo,
    config: &TablesConfig,
    clients: &Clients,
    lake: LakeConfig,
) -> Result<Data, String> {
    let mut data = Data::new();
    data.insert("Database".into(), config.database.clone());
    data.insert("ClicksTable".into(), config.clicks_table.clone());
    data.insert("ImpressionsTable".into(), config.impressions_table.clone());
    data.insert("SchemaVersion".into(), SCHEMA_VERSION.to_owned());
    match info.kind {
        "Delete" => {
            tracing::info!(tables = %physical_id(config), "delete: the tables and their rows stay");
            return Ok(data);
        }
        "Create" | "Update" => {}
        other => return Err(format!("unknown request type {other}")),
    }
    check_properties(&info.properties, config)?;
    if is_schema_rollback(info) {
        tracing::warn!(
            tables = %physical_id(config),
            "rollback to an older schema version: the tables keep their columns"
        );
        data.insert(
            "ClicksTableSetup".into(),
            "rollback: left as it is".to_owned(),
        );
        data.insert(
            "ImpressionsTableSetup".into(),
            "rollback: left as it is".to_owned(),
        );
        return Ok(data);
    }
    let lease = DynamoDbCommitLease::new(clients.dynamodb.clone(), &config.commit_lease_table);
    let owner = format!("tables-{}", info.request_id);
    let describe = |e: PortError| format!("{e}");
    let lake = IcebergLake::connect(lake, lease, owner)
        .await
        .map_err(describe)?;
    let done = lake.ensure_tables(&clients.s3).await.map_err(describe)?;
    for (table, setup) in &done {
        let key = match table {
            LakeTable::Clicks => "ClicksTableSetup",
            LakeTable::Impressions => "ImpressionsTableSetup",
        };
        tracing::info!(table = %lake.ident(*table), %setup, "table ready");
        data.insert(key.into(), setup.to_string());
    }
    if done.iter().any(|(_, s)| matches!(s, TableSetup::Created)) {
        tracing::info!(database = %config.database, "tables created");
    }
    Ok(data)
}

/// Everything one request needs, answered within `budget`: a request that would outlive the
/// function's timeout is answered as failed first (CloudFormation otherwise waits an hour).
pub async fn handle(
    request: &Request,
    config: Result<TablesConfig, String>,
    clients: &Clients,
    lake_config: impl FnOnce(&TablesConfig) -> LakeConfig,
    budget: Duration,
) -> CloudFormationCustomResourceResponse {
    let info = RequestInfo::of(request);
    let config = match config {
        Ok(c) => c,
        Err(reason) => {
            let fallback = info
                .physical_resource_id
                .clone()
                .unwrap_or_else(|| format!("{}-{}", info.logical_resource_id, info.request_id));
            // A delete of a resource that never worked must not block the stack's deletion.
            let outcome = if info.kind == "Delete" {
                Ok(Data::new())
            } else {
                Err(format!("configuration: {reason}"))
            };
            return response(&info, &fallback, outcome);
        }
    };
    let id = physical_id(&config);
    let lake = lake_config(&config);
    let outcome = match tokio::time::timeout(budget, apply(&info, &config, clients, lake)).await {
        Ok(outcome) => outcome,
        Err(_) => Err(format!(
            "the tables were not ready within {} s; nothing is half-applied \
             (each schema update is one Iceberg commit), so the update can be retried",
            budget.as_secs()
        )),
    };
    if let Err(reason) = &outcome {
        tracing::error!(request = info.kind, %reason, "custom resource failed");
    }
    response(&info, &id, outcome)
}

/// PUTs the reply to the request's pre-signed `ResponseURL` (an S3 object). The body is the
/// JSON CloudFormation expects; the URL is signed without a content type, so none is sent.
pub async fn send_response(
    http: &reqwest::Client,
    url: &str,
    response: &CloudFormationCustomResourceResponse,
) -> Result<(), String> {
    let body = serde_json::to_vec(response).map_err(|e| e.to_string())?;
    let mut last = String::new();
    for attempt in 0..5u32 {
        if attempt > 0 {
            tokio::time::sleep(Duration::from_millis(200 << attempt)).await;
        }
        match http
            .put(url)
            .header(reqwest::header::CONTENT_TYPE, "")
            .body(body.clone())
            .send()
            .await
        {
            Ok(r) if r.status().is_success() => return Ok(()),
            Ok(r) => last = format!("HTTP {}", r.status()),
            Err(e) => last = e.to_string(),
        }
    }
    Err(format!(
        "the reply to CloudFormation was not accepted: {last}"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn config() -> TablesConfig {
        TablesConfig::from_lookup(|k| {
            Some(
                match k {
                    "LAKE_BUCKET" => "lake-bucket",
                    "GLUE_DATABASE" => "adpipe_dev",
                    "COMMIT_LEASE_TABLE" => "lease",
                    _ => return None,
                }
                .to_owned(),
            )
        })
        .unwrap()
    }

    fn request(kind: &str, properties: Value) -> Request {
        let mut v = json!({
            "RequestType": kind,
            "RequestId": "req-1",
            "ResponseURL": "https://example.invalid/reply",
            "StackId": "arn:aws:cloudformation:us-east-1:123456789012:stack/s/1",
            "ResourceType": "Custom::IcebergTables",
            "LogicalResourceId": "IcebergTables",
            "ResourceProperties": properties,
        });
        if kind != "Create" {
            v["PhysicalResourceId"] = json!("adpipe_dev/enriched_clicks,impressions");
        }
        if kind == "Update" {
            v["OldResourceProperties"] = json!({});
        }
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn requests_of_every_type_are_read() {
        for kind in ["Create", "Update", "Delete"] {
            let info = RequestInfo::of(&request(kind, json!({"SchemaVersion": "1"})));
            assert_eq!(info.kind, kind);
            assert_eq!(info.request_id, "req-1");
            assert_eq!(info.physical_resource_id.is_some(), kind != "Create");
        }
    }

    #[test]
    fn the_physical_id_names_the_tables_and_survives_an_update() {
        let c = config();
        assert_eq!(physical_id(&c), "adpipe_dev/enriched_clicks,impressions");
        let info = RequestInfo::of(&request("Update", json!({})));
        let r = response(&info, "something-else", Ok(Data::new()));
        assert_eq!(
            r.physical_resource_id,
            "adpipe_dev/enriched_clicks,impressions"
        );
        assert_eq!(
            r.status,
            CloudFormationCustomResourceResponseStatus::Success
        );
    }

    #[test]
    fn only_an_update_to_a_lower_schema_version_is_a_rollback() {
        let update = |new: Value, old: Value| {
            let mut r = RequestInfo::of(&request("Update", json!({ "SchemaVersion": new })));
            r.old_properties = json!({ "SchemaVersion": old });
            r
        };
        assert!(is_schema_rollback(&update(json!("1"), json!("2"))));
        assert!(is_schema_rollback(&update(json!(1), json!("2"))));
        assert!(!is_schema_rollback(&update(json!("2"), json!("1"))));
        assert!(!is_schema_rollback(&update(json!("2"), json!("2"))));
        assert!(!is_schema_rollback(&update(json!("x"), json!("2"))));
        assert!(!is_schema_rollback(&RequestInfo::of(&request(
            "Create",
            json!({"SchemaVersion": "1"})
        ))));
    }

    #[test]
    fn properties_must_name_the_configured_database_and_warehouse() {
        let c = config();
        let ok = json!({"Database": "adpipe_dev", "Warehouse": "s3://lake-bucket/lake"});
        assert_eq!(check_properties(&ok, &c), Ok(()));
        let e = check_properties(&json!({"Database": "other"}), &c).unwrap_err();
        assert!(e.contains("other") && e.contains("adpipe_dev"), "{e}");
        assert!(check_properties(&json!({"Warehouse": "s3://x/lake"}), &c).is_err());
    }

    #[test]
    fn a_failure_carries_a_bounded_reason_and_the_reply_is_small() {
        let info = RequestInfo::of(&request("Create", json!({})));
        let r = response(&info, "id", Err("é".repeat(10_000)));
        assert_eq!(r.status, CloudFormationCustomResourceResponseStatus::Failed);
        let body = serde_json::to_vec(&r).unwrap();
        assert!(body.len() < 4_096, "{}", body.len());
        let v: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["Status"], "FAILED");
        assert_eq!(v["PhysicalResourceId"], "id");
        assert_eq!(v["LogicalResourceId"], "IcebergTables");
    }

    #[test]
    fn a_missing_variable_fails_create_but_never_blocks_a_delete() {
        let missing = Err("GLUE_DATABASE is not set".to_owned());
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let sdk = aws_config_stub().await;
            let clients = Clients::new(&sdk);
            let create = handle(
                &request("Create", json!({})),
                missing.clone(),
                &clients,
                |c| lake_config(c, None, None),
                Duration::from_secs(1),
            )
            .await;
            assert_eq!(
                create.status,
                CloudFormationCustomResourceResponseStatus::Failed
            );
            assert!(create.reason.unwrap().contains("GLUE_DATABASE"));
            let delete = handle(
                &request("Delete", json!({})),
                missing,
                &clients,
                |c| lake_config(c, None, None),
                Duration::from_secs(1),
            )
            .await;
            assert_eq!(
                delete.status,
                CloudFormationCustomResourceResponseStatus::Success
            );
        });
    }

    async fn aws_config_stub() -> aws_config::SdkConfig {
        aws_config::SdkConfig::builder()
            .behavior_version(aws_config::BehaviorVersion::latest())
            .region(aws_config::Region::new("us-east-1"))
            .build()
    }
}
