//! Lambda entry point: configuration, clients and the joiner are built once per execution
//! environment; each invocation is one Kinesis batch.

use adpipe_aws::Clients;
use adpipe_core::config::JoinerConfig;
use adpipe_core::metrics::{ColdStart, Invocation};
use adpipe_joiner::{aws_joiner, handle_invocation, now_ms, KinesisBatch};
use lambda_runtime::{run, service_fn, Error, LambdaEvent};

#[tokio::main]
async fn main() -> Result<(), Error> {
    lambda_runtime::tracing::init_default_subscriber();
    let config = JoinerConfig::from_lookup(|k| std::env::var(k).ok())?;
    let clients = Clients::from_env().await;
    let joiner = aws_joiner(&clients, config);
    let (joiner, cold) = (&joiner, &ColdStart::new());
    run(service_fn(
        move |event: LambdaEvent<KinesisBatch>| async move {
            let invocation = Invocation::new(event.context.request_id, cold.take());
            let (response, _) =
                handle_invocation(joiner, &event.payload, now_ms(), &invocation).await;
            Ok::<_, Error>(response)
        },
    ))
    .await
}
