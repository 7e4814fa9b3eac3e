//! Lambda entry point of the `Custom::IcebergTables` resource: each invocation is one
//! CloudFormation request, answered on its `ResponseURL` whatever happens.

// iceberg-rust's catalog futures nest deeply; the default limit is too low for `main`.
#![recursion_limit = "256"]

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use adpipe_aws::Clients;
use adpipe_core::config::TablesConfig;
use adpipe_tables::{handle, lake_config, send_response, Request, RequestInfo};
use lambda_runtime::{run, service_fn, Error, LambdaEvent};

/// Time kept back from the function's deadline to send the reply.
const REPLY_MARGIN: Duration = Duration::from_secs(20);

#[tokio::main]
async fn main() -> Result<(), Error> {
    lambda_runtime::tracing::init_default_subscriber();
    let clients = Clients::from_env().await;
    let http = reqwest::Client::new();
    let (clients, http) = (&clients, &http);
    run(service_fn(move |event: LambdaEvent<Request>| async move {
        let config =
            TablesConfig::from_lookup(|k| std::env::var(k).ok()).map_err(|e| e.to_string());
        let now_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or_default();
        let budget = Duration::from_millis(event.context.deadline.saturating_sub(now_ms))
            .saturating_sub(REPLY_MARGIN);
        let response = handle(
            &event.payload,
            config,
            clients,
            |c| {
                lake_config(
                    c,
                    std::env::var("AWS_ENDPOINT_URL").ok(),
                    std::env::var("AWS_REGION").ok(),
                )
            },
            budget,
        )
        .await;
        let url = RequestInfo::of(&event.payload).response_url;
        send_response(http, &url, &response).await?;
        Ok::<_, Error>(())
    }))
    .await
}
