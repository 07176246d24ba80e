//! `chargegate.v1.Grants`: the access list kept in the store, when no `acl_file` is set. Tokens
//! are taken in, fingerprinted at once, and only ever stored and listed as fingerprints. With an
//! `acl_file` the file is the source of truth: the write RPCs are FAILED_PRECONDITION.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::{invalid_argument, store_unavailable};
use crate::{
    authorizer::{
        AuthorizationRequest, Authorizer, Explanation,
        acl::{AccessList, Grant as AclGrant, parse_grant_station, parse_grant_token},
    },
    decision::{DecidedBy, Micros, Reason, Verdict},
    intake::{self, FieldViolation},
    proto::{
        DeleteGrantRequest, DeleteGrantResponse, ExplainDecisionRequest, ExplainDecisionResponse,
        Grant, ListGrantsRequest, ListGrantsResponse, PutGrantRequest, PutGrantResponse,
        grants_server,
    },
    store::{GrantStore, StoredGrant},
    token::{DriverToken, Fingerprinter},
};

pub struct GrantsService {
    /// The authorizer in force, for `ExplainDecision`.
    pub authorizer: Arc<dyn Authorizer>,
    /// `None` when grants are not kept in the store (an `acl_file`, or a remote authorizer).
    pub store: Option<Arc<dyn GrantStore>>,
    /// The list in force, updated after each committed write.
    pub list: Arc<AccessList>,
    pub fingerprinter: Fingerprinter,
    /// Why writes are refused when `store` is `None`.
    pub read_only_reason: &'static str,
    /// Held from a write's commit through its update of `list`, so that two writes of one grant
    /// reach the list in the order they reached the store.
    pub writing: tokio::sync::Mutex<()>,
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
        let _writing = self.writing.lock().await;
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
        let _writing = self.writing.lock().await;
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

    async fn explain_decision(
        &self,
        request: Request<ExplainDecisionRequest>,
    ) -> Result<Response<ExplainDecisionResponse>, Status> {
        crate::audit::note(&request, &request.get_ref().station_id, "");
        self.explain(request.into_inner()).await.map(Response::new)
    }
}

impl GrantsService {
    /// `ExplainDecision`: validated as `Authorize` validates, then the format check and the
    /// authorizer's explanation, recording nothing.
    async fn explain(
        &self,
        request: ExplainDecisionRequest,
    ) -> Result<ExplainDecisionResponse, Status> {
        let station = intake::parse_station_id(&request.station_id);
        let token = match request.driver_token.is_empty() {
            true => Err(FieldViolation::new("driver_token", "is required")),
            false => Ok(DriverToken::new(request.driver_token)),
        };
        let (station_id, token) = match (station, token) {
            (Ok(s), Ok(t)) => (s, t),
            (s, t) => {
                return Err(invalid_argument(
                    s.err().into_iter().chain(t.err()).collect(),
                ));
            }
        };
        let fingerprint = self.fingerprinter.fingerprint(&token);
        let explanation = if token.is_well_formed() {
            self.authorizer
                .explain(AuthorizationRequest {
                    request_id: "",
                    station_id: &station_id,
                    token: &token,
                    fingerprint: &fingerprint,
                })
                .await
        } else {
            Explanation {
                verdict: Verdict::new(Reason::TokenFormat, DecidedBy::Format),
                matched: Vec::new(),
                detail: "the token does not match ^[A-Za-z0-9._~-]{20,80}$: it is decided INVALID without asking the authorizer".into(),
            }
        };
        let Explanation {
            verdict,
            matched,
            detail,
        } = explanation;
        Ok(ExplainDecisionResponse {
            status: verdict.status().to_proto() as i32,
            reason: verdict.reason.as_str().to_owned(),
            authorizer: verdict.decided_by.as_str().to_owned(),
            matched: matched
                .into_iter()
                .map(|(station_id, g)| {
                    to_proto(&StoredGrant {
                        station_id,
                        fingerprint: fingerprint.clone(),
                        expires_at: g.expires_at,
                        blocked: g.blocked,
                    })
                })
                .collect(),
            detail,
        })
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

#[cfg(test)]
mod tests {
    use std::{
        collections::BTreeSet,
        sync::{Arc, Mutex},
        time::Duration,
    };

    use tokio::sync::Notify;

    use super::*;
    use crate::{proto::grants_server::Grants, store::StoreError, token::Fingerprint};

    /// Grants in memory; a put holds after it has "committed" until `release` is notified.
    #[derive(Default)]
    struct GatedStore {
        grants: Mutex<BTreeSet<(String, String)>>,
        put_committed: Notify,
        release: Notify,
    }

    #[async_trait::async_trait]
    impl GrantStore for GatedStore {
        async fn put_grant(&self, grant: StoredGrant) -> Result<(), StoreError> {
            let key = (grant.station_id, grant.fingerprint.as_str().to_owned());
            self.grants.lock().unwrap().insert(key);
            self.put_committed.notify_one();
            self.release.notified().await;
            Ok(())
        }
        async fn delete_grant(
            &self,
            station_id: &str,
            fingerprint: &Fingerprint,
        ) -> Result<bool, StoreError> {
            let key = (station_id.to_owned(), fingerprint.as_str().to_owned());
            Ok(self.grants.lock().unwrap().remove(&key))
        }
        async fn list_grants(&self) -> Result<Vec<StoredGrant>, StoreError> {
            Ok(Vec::new())
        }
    }

    /// A delete that runs while a put of the same grant is between its commit and its update of
    /// the list in force: the list must end as the store does.
    #[tokio::test]
    async fn a_delete_racing_a_put_leaves_the_list_as_the_store() {
        const STATION: &str = "6f1c2d3e-4a5b-4c6d-8e7f-0123456789ab";
        const TOKEN: &str = "TOKEN-granted-0001-f3a9c2";
        let store = Arc::new(GatedStore::default());
        let service = Arc::new(GrantsService {
            authorizer: Arc::new(AccessList::empty()),
            store: Some(store.clone()),
            list: Arc::new(AccessList::empty()),
            fingerprinter: Fingerprinter::new(b"test-key").unwrap(),
            read_only_reason: "",
            writing: Default::default(),
        });
        let put = tokio::spawn({
            let service = service.clone();
            async move {
                service
                    .put_grant(Request::new(PutGrantRequest {
                        station_id: STATION.into(),
                        driver_token: TOKEN.into(),
                        ..Default::default()
                    }))
                    .await
            }
        });
        store.put_committed.notified().await;
        let delete = tokio::spawn({
            let service = service.clone();
            async move {
                service
                    .delete_grant(Request::new(DeleteGrantRequest {
                        station_id: STATION.into(),
                        driver_token: TOKEN.into(),
                    }))
                    .await
            }
        });
        // Without serialised writes the delete finishes here, inside the put; with them it
        // waits for the put, and this bounded wait simply ends.
        let mut delete = delete;
        let finished_early = tokio::time::timeout(Duration::from_millis(200), &mut delete)
            .await
            .is_ok();
        store.release.notify_one();
        put.await.unwrap().expect("put");
        if !finished_early {
            delete.await.unwrap().expect("delete");
        }
        let stored = !store.grants.lock().unwrap().is_empty();
        let in_force = !service.list.grants().is_empty();
        assert_eq!(in_force, stored, "the list in force against the store");
    }
}
