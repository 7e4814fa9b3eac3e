//! The functions' code against `deploy/resources.json`, the deploy contract that `template.yaml`
//! and the local tooling follow (the template side is checked by `tools/test_template.py`):
//! the variables each function reads, the defaults the template sets, the EMF metrics the
//! dashboard and alarms chart, and what the tables function (the `IcebergTables` custom
//! resource) is given.

use std::collections::{BTreeSet, HashMap};

use adpipe_core::config::{JoinerConfig, JOINER_ENV};
use adpipe_core::metrics::{emf_line, Counts, Invocation};
use serde_json::Value;

fn contract() -> Value {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/resources.json");
    let text = std::fs::read_to_string(path).expect("deploy/resources.json is readable");
    serde_json::from_str(&text).expect("deploy/resources.json is JSON")
}

fn joiner_env(contract: &Value) -> &serde_json::Map<String, Value> {
    contract["env"]["joiner"]
        .as_object()
        .expect("env.joiner is an object")
}

#[test]
fn contract_lists_exactly_the_variables_the_joiner_reads() {
    let contract = contract();
    let listed: BTreeSet<&str> = joiner_env(&contract).keys().map(String::as_str).collect();
    let read: BTreeSet<&str> = JOINER_ENV.iter().copied().collect();
    assert_eq!(listed, read);
}

#[test]
fn template_values_and_parameter_defaults_are_the_code_defaults() {
    // Resource-backed variables get stand-in names; every other variable is set to the value
    // the template gives it (a literal, or its parameter's default). The result must be the
    // configuration the joiner builds when those variables are absent: deploying with default
    // parameters then behaves exactly like the code's documented defaults.
    let contract = contract();
    let mut resources_only = HashMap::new();
    let mut everything = HashMap::new();
    for (var, source) in joiner_env(&contract) {
        if source.get("resource").is_some() {
            resources_only.insert(var.clone(), format!("stand-in-{}", var.to_lowercase()));
            everything.insert(var.clone(), format!("stand-in-{}", var.to_lowercase()));
        } else {
            let value = source
                .get("value")
                .or_else(|| source.get("default"))
                .and_then(Value::as_str)
                .unwrap_or_else(|| panic!("{var}: needs a value or a default"));
            everything.insert(var.clone(), value.to_owned());
        }
    }
    let defaults = JoinerConfig::from_lookup(|k| resources_only.get(k).cloned()).unwrap();
    let templated = JoinerConfig::from_lookup(|k| everything.get(k).cloned()).unwrap();
    assert_eq!(templated, defaults);
}

#[test]
fn contract_lists_every_joiner_emf_metric() {
    let contract = contract();
    let line: Value = serde_json::from_str(&emf_line(
        "adpipe",
        "joiner",
        &Counts::default(),
        0,
        &Invocation::default(),
    ))
    .expect("EMF line is JSON");
    let emitted: Vec<&str> = line["_aws"]["CloudWatchMetrics"][0]["Metrics"]
        .as_array()
        .expect("metrics array")
        .iter()
        .map(|m| m["Name"].as_str().expect("metric name"))
        .collect();
    let listed: BTreeSet<&str> = contract["metrics"]["joiner"]
        .as_array()
        .expect("metrics.joiner is an array")
        .iter()
        .map(|m| m.as_str().expect("metric name"))
        .collect();
    // Every metric the joiner emits, `ImpressionsForwarded` (first-seen impressions forwarded
    // to the joined stream) included, must be in the contract, which the template's dashboard
    // is checked against (tools/test_template.py). `Rejected.<reason>` appear only with
    // rejections, so this line of empty counts has none.
    let missing: Vec<&&str> = emitted.iter().filter(|m| !listed.contains(**m)).collect();
    assert!(
        missing.is_empty(),
        "not in deploy/resources.json: {missing:?}"
    );
    assert_eq!(
        line["_aws"]["CloudWatchMetrics"][0]["Dimensions"][0][0],
        contract["metrics"]["dimension"]
    );
}

#[test]
fn contract_lists_exactly_the_variables_the_enricher_reads() {
    let contract = contract();
    let listed: BTreeSet<&str> = contract["env"]["enricher"]
        .as_object()
        .expect("env.enricher is an object")
        .keys()
        .map(String::as_str)
        .collect();
    let read: BTreeSet<&str> = adpipe_core::config::ENRICHER_ENV.iter().copied().collect();
    assert_eq!(listed, read);
}

#[test]
fn contract_lists_exactly_the_variables_the_tables_function_reads() {
    let contract = contract();
    let listed: BTreeSet<&str> = contract["env"]["tables"]
        .as_object()
        .expect("env.tables is an object")
        .keys()
        .map(String::as_str)
        .collect();
    let read: BTreeSet<&str> = adpipe_core::config::TABLES_ENV.iter().copied().collect();
    assert_eq!(listed, read);
}

/// A function's environment from the contract: a stand-in name per resource (the same for
/// every variable naming that resource), literals, and parameter defaults.
fn contract_env(contract: &Value, function: &str) -> HashMap<String, String> {
    contract["env"][function]
        .as_object()
        .unwrap_or_else(|| panic!("env.{function} is an object"))
        .iter()
        .map(|(var, source)| {
            let value = match source.get("resource").and_then(Value::as_str) {
                Some(resource) => format!("stand-in-{}", resource.replace('_', "-")),
                None => source
                    .get("value")
                    .or_else(|| source.get("default"))
                    .and_then(Value::as_str)
                    .unwrap_or_else(|| panic!("{function} {var}: needs a value or a default"))
                    .to_owned(),
            };
            (var.clone(), value)
        })
        .collect()
}

#[test]
fn the_tables_function_sets_up_the_tables_the_enricher_writes() {
    // The same database, tables and warehouse for both, and the custom resource's properties
    // agree with the function's configuration (it refuses a request whose properties do not)
    // and with the code's schema version.
    let contract = contract();
    let tables_env = contract_env(&contract, "tables");
    let enricher_env = contract_env(&contract, "enricher");
    let tables = adpipe_core::config::TablesConfig::from_lookup(|k| tables_env.get(k).cloned())
        .expect("the contract's tables environment is a complete configuration");
    let enricher =
        adpipe_core::config::EnricherConfig::from_lookup(|k| enricher_env.get(k).cloned())
            .expect("the contract's enricher environment is a complete configuration");
    assert_eq!(tables.warehouse(), enricher.warehouse());
    assert_eq!(tables.database, enricher.database);
    assert_eq!(tables.clicks_table, enricher.clicks_table);
    assert_eq!(tables.impressions_table, enricher.impressions_table);
    assert_eq!(tables.commit_lease_table, enricher.commit_lease_table);

    let resource = &contract["custom_resources"]["iceberg_tables"];
    assert_eq!(resource["service_token"], "tables_function");
    let properties = &resource["properties"];
    let warehouse = properties["Warehouse"]["format"]
        .as_str()
        .expect("Warehouse is a format")
        .replace("{lake_bucket}", "stand-in-lake-bucket");
    let database = format!(
        "stand-in-{}",
        properties["Database"]["resource"]
            .as_str()
            .expect("Database names a resource")
            .replace('_', "-")
    );
    let request = serde_json::json!({"Database": database, "Warehouse": warehouse});
    assert_eq!(adpipe_tables::check_properties(&request, &tables), Ok(()));
    assert_eq!(
        properties["SchemaVersion"]["value"],
        adpipe_tables::SCHEMA_VERSION,
        "bump SchemaVersion in template.yaml and deploy/resources.json with the code's"
    );
}
