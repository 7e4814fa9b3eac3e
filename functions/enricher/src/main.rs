//! Lambda entry point: configuration, clients, the catalog connection and the tables are set
//! up once per execution environment; each invocation is one joined-stream batch.

// iceberg-rust's catalog futures nest deeply; the default limit is too low for `main`.
#![recursion_limit = "256"]

use adpipe_aws::Clients;
use adpipe_core::config::EnricherConfig;
use adpipe_core::metrics::{ColdStart, Invocation};
use adpipe_enricher::{aws_enricher, handle_invocation, lake_config};
use adpipe_lambda::{now_ms, KinesisBatch};
use lambda_runtime::{run, service_fn, Error, LambdaEvent};

#[tokio::main]
async fn main() -> Result<(), Error> {
    lambda_runtime::tracing::init_default_subscriber();
    let config = EnricherConfig::from_lookup(|k| std::env::var(k).ok())?;
    let namespace = config.metrics_namespace.clone();
    let clients = Clients::from_env().await;
    let lake = lake_config(
        &config,
        std::env::var("AWS_ENDPOINT_URL").ok(),
        std::env::var("AWS_REGION").ok(),
    );
    // The lease owner: this execution environment (log stream names are unique per sandbox).
    let owner = std::env::var("AWS_LAMBDA_LOG_STREAM_NAME")
        .unwrap_or_else(|_| format!("pid-{}", std::process::id()));
    let enricher = aws_enricher(&clients, config, lake, owner).await?;
    let (enricher, namespace, cold) = (&enricher, namespace.as_str(), &ColdStart::new());
    run(service_fn(
        move |event: LambdaEvent<KinesisBatch>| async move {
            let invocation = Invocation::new(event.context.request_id, cold.take());
            let (response, _) =
                handle_invocation(enricher, namespace, &event.payload, now_ms(), &invocation).await;
            Ok::<_, Error>(response)
        },
    ))
    .await
}
