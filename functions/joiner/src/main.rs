//! Lambda entry point: configuration, clients and the joiner are built once per execution
//! environment; each invocation is one Kinesis batch, routed if it comes from an input stream,
//! joined if it comes from the keyed stream.

use adpipe_aws::Clients;
use adpipe_core::config::JoinerConfig;
use adpipe_core::metrics::{ColdStart, Invocation};
use adpipe_joiner::{aws_function, handle_routed};
use adpipe_lambda::{now_ms, KinesisBatch};
use lambda_runtime::{run, service_fn, Error, LambdaEvent};

#[tokio::main]
async fn main() -> Result<(), Error> {
    lambda_runtime::tracing::init_default_subscriber();
    let config = JoinerConfig::from_lookup(|k| std::env::var(k).ok())?;
    let clients = Clients::from_env().await;
    let function = aws_function(&clients, config);
    let (function, cold) = (&function, &ColdStart::new());
    run(service_fn(
        move |event: LambdaEvent<KinesisBatch>| async move {
            let invocation = Invocation::new(event.context.request_id, cold.take());
            let (response, _) = handle_routed(
                &function.router,
                &function.keyed,
                &event.payload,
                now_ms(),
                &invocation,
            )
            .await;
            Ok::<_, Error>(response)
        },
    ))
    .await
}
