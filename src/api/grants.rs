//! `chargegate.v1.Grants`: the access list kept in the store, when no `acl_file` is set. Tokens
//! are taken in, fingerprinted at once, and only ever stored and listed as fingerprints. With an
//! `acl_file` the file is the source of truth: the write RPCs are FAILED_PRECONDITION.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::{invalid_argument, store_unavailable};
use crate::{
    authorizer::acl::{AccessList, Grant as AclGrant, parse_grant_station, parse_grant_token},
    decision::Micros,
    proto::{
        DeleteGrantRequest, DeleteGrantResponse, Grant, ListGrantsRequest, ListGrantsResponse,
        PutGrantRequest, PutGrantResponse, grants_server,
    },
    store::{GrantStore, StoredGrant},
    token::{DriverToken, Fingerprinter},
};

pub struct GrantsService {
    /// `None` when grants are not kept in the store (an `acl_file`, or a remote authorizer).
    pub store: Option<Arc<dyn GrantStore>>,
    /// The list in force, updated after each committed write.
    pub list: Arc<AccessList>,
    pub fingerprinter: Fingerprinter,
    /// Why writes are refused when `store` is `None`.
    pub read_only_reason: &'static str,
}

/// Both fields, reporting each bad one.
fn station_and_token(station: &str, raw_token: &str) -> Result<(String, DriverToken), Status> {
    match (parse_grant_station(station), parse_grant_token(raw_token)) {
        (Ok(s), Ok(t)) => Ok((s, t)),
        (s, t) => Err(invalid_argument(
            s.err().into_iter().chain(t.err()).collect(),
        )),
    }
}

impl GrantsService {
    fn store(&self) -> Result<&Arc<dyn GrantStore>, Status> {
        self.store
            .as_ref()
            .ok_or_else(|| Status::failed_precondition(self.read_only_reason))
    }
}

#[tonic::async_trait]
impl grants_server::Grants for GrantsService {
    async fn put_grant(
        &self,
        request: Request<PutGrantRequest>,
    ) -> Result<Response<PutGrantResponse>, Status> {
        crate::audit::note(&request, &request.get_ref().station_id, "");
        let request = request.into_inner();
        let (station_id, token) = station_and_token(&request.station_id, &request.driver_token)?;
        let store = self.store()?;
        let stored = StoredGrant {
            station_id,
            fingerprint: self.fingerprinter.fingerprint(&token),
            expires_at: request.expires_at.as_ref().map(Micros::from_proto),
            blocked: request.blocked,
        };
        store
            .put_grant(stored.clone())
            .await
            .map_err(|e| store_unavailable(&e))?;
        self.list.upsert(
            &stored.station_id,
            &stored.fingerprint,
            AclGrant {
                expires_at: stored.expires_at,
                blocked: stored.blocked,
            },
        );
        tracing::info!(station_id = %stored.station_id, fingerprint = %stored.fingerprint, "grant put");
        Ok(Response::new(PutGrantResponse {
            grant: Some(to_proto(&stored)),
        }))
    }

    async fn delete_grant(
        &self,
        request: Request<DeleteGrantRequest>,
    ) -> Result<Response<DeleteGrantResponse>, Status> {
        crate::audit::note(&request, &request.get_ref().station_id, "");
        let request = request.into_inner();
        let (station_id, token) = station_and_token(&request.station_id, &request.driver_token)?;
        let store = self.store()?;
        let fingerprint = self.fingerprinter.fingerprint(&token);
        let deleted = store
            .delete_grant(&station_id, &fingerprint)
            .await
            .map_err(|e| store_unavailable(&e))?;
        self.list.remove(&station_id, &fingerprint);
        tracing::info!(%station_id, %fingerprint, deleted, "grant deleted");
        Ok(Response::new(DeleteGrantResponse { deleted }))
    }

    async fn list_grants(
        &self,
        request: Request<ListGrantsRequest>,
    ) -> Result<Response<ListGrantsResponse>, Status> {
        crate::audit::note(&request, &request.get_ref().station_id, "");
        let filter = match request.into_inner().station_id.as_str() {
            "" => None,
            raw => Some(parse_grant_station(raw).map_err(|v| invalid_argument(vec![v]))?),
        };
        let grants = self
            .list
            .grants()
            .into_iter()
            .filter(|(station, _, _)| filter.as_ref().is_none_or(|f| f == station))
            .map(|(station_id, fingerprint, g)| {
                to_proto(&StoredGrant {
                    station_id,
                    fingerprint,
                    expires_at: g.expires_at,
                    blocked: g.blocked,
                })
            })
            .collect();
        Ok(Response::new(ListGrantsResponse { grants }))
    }
}

fn to_proto(g: &StoredGrant) -> Grant {
    Grant {
        station_id: g.station_id.clone(),
        driver_token_fingerprint: g.fingerprint.as_str().to_owned(),
        expires_at: g.expires_at.map(Micros::to_proto),
        blocked: g.blocked,
    }
}
