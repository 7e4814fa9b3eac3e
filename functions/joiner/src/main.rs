//! Lambda entry point: configuration, clients and the joiner are built once per execution
//! environment; each invocation is one Kinesis batch.

use adpipe_aws::Clients;
use adpipe_core::config::JoinerConfig;
use adpipe_joiner::{aws_joiner, handle, now_ms, KinesisBatch};
use lambda_runtime::{run, service_fn, Error, LambdaEvent};

#[tokio::main]
async fn main() -> Result<(), Error> {
    lambda_runtime::tracing::init_default_subscriber();
    let config = JoinerConfig::from_lookup(|k| std::env::var(k).ok())?;
    let clients = Clients::from_env().await;
    let joiner = aws_joiner(&clients, config);
    let joiner = &joiner;
    run(service_fn(
        move |event: LambdaEvent<KinesisBatch>| async move {
            let (response, _) = handle(joiner, &event.payload, now_ms()).await;
            Ok::<_, Error>(response)
        },
    ))
    .await
}
