//! The joiner's code against `deploy/resources.json`, the deploy contract that `template.yaml`
//! and the local tooling follow (the template side is checked by `tools/test_template.py`):
//! the variables it reads, the defaults the template sets, and the EMF metrics the dashboard
//! and alarms chart.

use std::collections::{BTreeSet, HashMap};

use adpipe_core::config::{JoinerConfig, JOINER_ENV};
use adpipe_core::metrics::{emf_line, Counts};
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
    let line: Value = serde_json::from_str(&emf_line("adpipe", "joiner", &Counts::default(), 0))
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
    // Every metric the joiner emits must be charted. The contract may list one more than this
    // code emits: `ImpressionsForwarded`, which the joiner on the main branch adds.
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
