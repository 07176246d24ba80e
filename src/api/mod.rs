//! The gRPC edge: service implementations and the one place where internal errors become
//! `tonic::Status`.

pub mod audit;
pub mod authorization;
pub mod grants;
pub mod webhooks;

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::{intake::FieldViolation, store::StoreError};

/// `INVALID_ARGUMENT` with a `google.rpc.BadRequest` naming each bad field.
pub fn invalid_argument(violations: Vec<FieldViolation>) -> Status {
    let fields: Vec<&str> = violations.iter().map(|v| v.field).collect();
    let message = match violations.as_slice() {
        [only] => format!("{} {}", only.field, only.description),
        _ => format!("invalid fields: {}", fields.join(", ")),
    };
    let details = ErrorDetails::with_bad_request(
        violations
            .into_iter()
            .map(|v| tonic_types::FieldViolation::new(v.field, v.description))
            .collect::<Vec<_>>(),
    );
    Status::with_error_details(Code::InvalidArgument, message, details)
}

/// A store failure as clients see it: retryable, without internals.
pub fn store_unavailable(e: &StoreError) -> Status {
    tracing::warn!(error = %e, "store unavailable");
    Status::unavailable("the store is unavailable; retry later")
}
