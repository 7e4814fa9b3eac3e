//! Mapping of AWS SDK errors to the ports' [`PortError`], by the service's error code. The SDK
//! has already retried transient errors by the time one arrives here.

use adpipe_core::ports::PortError;
use aws_sdk_dynamodb::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};

/// Error codes that mean "slow down": the request may succeed later.
const THROTTLE_CODES: &[&str] = &[
    "ProvisionedThroughputExceededException",
    "ThrottlingException",
    "Throttling",
    "RequestLimitExceeded",
    "LimitExceededException",
    "SlowDown",
    "TooManyRequestsException",
];

/// Error codes of server-side trouble.
const UNAVAILABLE_CODES: &[&str] = &[
    "InternalServerError",
    "InternalFailure",
    "InternalError",
    "ServiceUnavailable",
    "ServiceUnavailableException",
    "KMSThrottlingException",
    "RequestTimeout",
];

/// Classifies an SDK error; `op` names the call for the message.
pub fn port_error<E, R>(op: &str, err: SdkError<E, R>) -> PortError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    R: std::fmt::Debug + Send + Sync + 'static,
{
    let message = format!("{op}: {}", DisplayErrorContext(&err));
    match &err {
        SdkError::TimeoutError(_) | SdkError::DispatchFailure(_) | SdkError::ResponseError(_) => {
            PortError::Unavailable(message)
        }
        SdkError::ServiceError(service) => classify_code(service.err().code(), message),
        _ => classify_code(err.code(), message),
    }
}

/// Classifies by error code alone.
pub fn classify_code(code: Option<&str>, message: String) -> PortError {
    match code {
        Some(c) if THROTTLE_CODES.contains(&c) => PortError::Throttled(message),
        Some(c) if UNAVAILABLE_CODES.contains(&c) => PortError::Unavailable(message),
        _ => PortError::Rejected(message),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_map_to_the_right_kind() {
        let m = || "m".to_owned();
        assert!(matches!(
            classify_code(Some("ProvisionedThroughputExceededException"), m()),
            PortError::Throttled(_)
        ));
        assert!(matches!(
            classify_code(Some("InternalServerError"), m()),
            PortError::Unavailable(_)
        ));
        assert!(matches!(
            classify_code(Some("ValidationException"), m()),
            PortError::Rejected(_)
        ));
        assert!(classify_code(Some("SlowDown"), m()).retryable());
        assert!(!classify_code(None, m()).retryable());
    }
}
