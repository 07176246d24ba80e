//! The generated `chargegate.v1` protobuf and gRPC code, the encoded descriptor set that server
//! reflection serves, and the hand-written `Debug` of messages that carry a plain driver token.

#![allow(clippy::all, missing_docs)]

use std::fmt;

tonic::include_proto!("chargegate.v1");

/// Every file of `proto/` with its imports, for `grpc.reflection.v1` and `v1alpha`.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("chargegate_descriptor");

/// Fully qualified name of the authorization service, as health checks and routers see it.
pub const AUTHORIZATION_SERVICE: &str = "chargegate.v1.ChargingAuthorization";

const REDACTED: &str = "<redacted>";

impl fmt::Debug for AuthorizeRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuthorizeRequest")
            .field("station_id", &self.station_id)
            .field("driver_token", &REDACTED)
            .field("callback_url", &self.callback_url)
            .field("request_id", &self.request_id)
            .finish()
    }
}

impl fmt::Debug for PutGrantRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PutGrantRequest")
            .field("station_id", &self.station_id)
            .field("driver_token", &REDACTED)
            .field("expires_at", &self.expires_at)
            .field("blocked", &self.blocked)
            .finish()
    }
}

impl fmt::Debug for DeleteGrantRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeleteGrantRequest")
            .field("station_id", &self.station_id)
            .field("driver_token", &REDACTED)
            .finish()
    }
}

impl fmt::Debug for ExplainDecisionRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ExplainDecisionRequest")
            .field("station_id", &self.station_id)
            .field("driver_token", &REDACTED)
            .finish()
    }
}
