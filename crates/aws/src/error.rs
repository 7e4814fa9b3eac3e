//! Mapping of AWS SDK errors to the ports' [`PortError`], by the HTTP status and the service's
//! error code. The SDK has already retried transient errors by the time one arrives here.
//!
//! The status decides first: any 5xx is server-side trouble, whatever its code says (a gateway's
//! 502 carries no AWS code at all), so the request may or may not have been applied and is never
//! taken for a refusal; a 429 is a throttle. Only a 4xx is judged by its code.

use adpipe_core::ports::PortError;
use aws_sdk_dynamodb::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_smithy_runtime_api::http::Response as HttpResponse;

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
pub fn port_error<E>(op: &str, err: SdkError<E, HttpResponse>) -> PortError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    let message = format!("{op}: {}", DisplayErrorContext(&err));
    match &err {
        SdkError::TimeoutError(_) | SdkError::DispatchFailure(_) | SdkError::ResponseError(_) => {
            PortError::Unavailable(message)
        }
        SdkError::ServiceError(service) => classify(
            Some(service.raw().status().as_u16()),
            service.err().code(),
            message,
        ),
        _ => classify(
            err.raw_response().map(|r| r.status().as_u16()),
            err.code(),
            message,
        ),
    }
}

/// Classifies by HTTP status (when there was a response) and error code.
pub fn classify(status: Option<u16>, code: Option<&str>, message: String) -> PortError {
    match (status, code) {
        (_, Some(c)) if THROTTLE_CODES.contains(&c) => PortError::Throttled(message),
        (Some(429), _) => PortError::Throttled(message),
        (Some(s), _) if s >= 500 => PortError::Unavailable(message),
        (_, Some(c)) if UNAVAILABLE_CODES.contains(&c) => PortError::Unavailable(message),
        _ => PortError::Rejected(message),
    }
}

/// Classifies by error code alone (per-entry failures of a batch call carry no status).
pub fn classify_code(code: Option<&str>, message: String) -> PortError {
    classify(None, code, message)
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

    fn service_error(status: u16, code: Option<&str>) -> PortError {
        use aws_sdk_kinesis::operation::put_records::PutRecordsError;
        use aws_smithy_types::body::SdkBody;
        use aws_smithy_types::error::ErrorMetadata;
        let mut meta = ErrorMetadata::builder().message("from the test");
        if let Some(code) = code {
            meta = meta.code(code);
        }
        let raw = HttpResponse::new(status.try_into().unwrap(), SdkBody::empty());
        port_error(
            "PutRecords",
            SdkError::service_error(PutRecordsError::generic(meta.build()), raw),
        )
    }

    #[test]
    fn any_5xx_is_unavailable_whatever_its_code() {
        // A gateway's 502 has no AWS code; a new server-side code is unknown to the table above.
        for (status, code) in [
            (502, None),
            (500, Some("SomeNewInternalException")),
            (503, Some("ValidationException")),
            (504, Some("")),
        ] {
            let e = service_error(status, code);
            assert!(
                matches!(e, PortError::Unavailable(_)),
                "{status} {code:?} -> {e:?}"
            );
        }
    }

    #[test]
    fn status_429_is_a_throttle_and_4xx_go_by_their_code() {
        assert!(matches!(service_error(429, None), PortError::Throttled(_)));
        assert!(matches!(
            service_error(400, Some("ProvisionedThroughputExceededException")),
            PortError::Throttled(_)
        ));
        assert!(matches!(
            service_error(400, Some("ValidationException")),
            PortError::Rejected(_)
        ));
        assert!(matches!(
            service_error(400, Some("InternalFailure")),
            PortError::Unavailable(_)
        ));
        assert!(matches!(service_error(403, None), PortError::Rejected(_)));
    }
}
