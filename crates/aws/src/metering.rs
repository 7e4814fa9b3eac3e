//! `RequestCounter`: an SDK interceptor that counts every HTTP attempt by service and
//! operation (retries included), for the cost benchmarks — counted from the real requests sent.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use aws_sdk_dynamodb::config::interceptors::BeforeTransmitInterceptorContextRef;
use aws_sdk_dynamodb::config::{ConfigBag, Intercept, RuntimeComponents};
use aws_smithy_runtime_api::box_error::BoxError;
use aws_smithy_runtime_api::client::orchestrator::Metadata;

/// Counts of requests sent, keyed by `(service, operation)`.
#[derive(Debug, Clone, Default)]
pub struct RequestCounter {
    counts: Arc<Mutex<BTreeMap<(String, String), u64>>>,
}

impl RequestCounter {
    pub fn snapshot(&self) -> BTreeMap<(String, String), u64> {
        self.counts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Requests of one operation (e.g. `("DynamoDB", "UpdateItem")`).
    pub fn get(&self, service: &str, operation: &str) -> u64 {
        self.snapshot()
            .get(&(service.to_owned(), operation.to_owned()))
            .copied()
            .unwrap_or(0)
    }

    pub fn total(&self) -> u64 {
        self.snapshot().values().sum()
    }
}

impl Intercept for RequestCounter {
    fn name(&self) -> &'static str {
        "RequestCounter"
    }

    fn read_before_transmit(
        &self,
        _context: &BeforeTransmitInterceptorContextRef<'_>,
        _runtime_components: &RuntimeComponents,
        cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        if let Some(m) = cfg.load::<Metadata>() {
            let key = (m.service().to_owned(), m.name().to_owned());
            *self
                .counts
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .entry(key)
                .or_default() += 1;
        }
        Ok(())
    }
}
