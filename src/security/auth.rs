//! Authentication and roles: one tower layer in front of every service (CONTRACT §12).
//!
//! Health and reflection are open (mesh probes, grpcurl). With `clients_file` set, every other
//! call needs exactly one `authorization: Bearer <token>` header naming a known client, else
//! `UNAUTHENTICATED`; a client whose roles do not cover the method gets `PERMISSION_DENIED`.
//! The layer puts the [`Caller`] into the request's extensions, where handlers check the
//! stations a message names (after validating it: `INVALID_ARGUMENT` comes first), and notes
//! the client's name for the call record. Without `clients_file` every call is open.

use std::{
    sync::Arc,
    task::{Context, Poll},
};

use futures::future::{Either, Ready, ready};
use tonic::Status;
use tower::{Layer, Service};

use super::clients::{Client, Clients, Stations};
use crate::{audit::AuditSlot, store::StationFilter};

/// What a method asks of its caller.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Need {
    /// Health and reflection.
    Nothing,
    /// The `station` role: the authorization service.
    Station,
    /// The `admin` role: grants, audit, webhooks.
    Admin,
    /// A known client, whatever its roles (a path no service serves: UNIMPLEMENTED follows).
    Identity,
}

fn need(path: &str) -> Need {
    let service = path.trim_start_matches('/').split('/').next().unwrap_or("");
    match service {
        "grpc.health.v1.Health"
        | "grpc.reflection.v1.ServerReflection"
        | "grpc.reflection.v1alpha.ServerReflection" => Need::Nothing,
        "chargegate.v1.ChargingAuthorization" => Need::Station,
        "chargegate.v1.Grants" | "chargegate.v1.Audit" | "chargegate.v1.Webhooks" => Need::Admin,
        _ => Need::Identity,
    }
}

/// Health and reflection: open to every caller, never limited.
pub fn is_open(path: &str) -> bool {
    need(path) == Need::Nothing
}

/// Who is calling, as handlers see it.
#[derive(Clone, Debug)]
pub enum Caller {
    /// No `clients_file`: every call is open.
    Open,
    Client(Arc<Client>),
}

impl Caller {
    /// The caller of `request` (open when the layer put none there: no `clients_file`).
    pub fn of<T>(request: &tonic::Request<T>) -> Self {
        request
            .extensions()
            .get::<Caller>()
            .cloned()
            .unwrap_or(Caller::Open)
    }

    /// `PERMISSION_DENIED` unless the caller may speak for `station` (canonical).
    pub fn check_station(&self, station: &str) -> Result<(), Status> {
        match self {
            Caller::Client(c) if !c.covers(station) => Err(Status::permission_denied(format!(
                "client {:?} may not speak for station {station}",
                c.name
            ))),
            _ => Ok(()),
        }
    }

    /// The stations a subscription watches: every station it may see when it names none;
    /// `PERMISSION_DENIED` when it names one outside its scope.
    pub fn subscription(&self, filter: StationFilter) -> Result<StationFilter, Status> {
        let Caller::Client(client) = self else {
            return Ok(filter);
        };
        match (filter, &client.stations) {
            (filter, Stations::All) => Ok(filter),
            (StationFilter::All, Stations::Only(own)) => {
                let mut own: Vec<String> = own.iter().cloned().collect();
                own.sort();
                Ok(StationFilter::Only(own))
            }
            (StationFilter::Only(named), Stations::Only(_)) => {
                for station in &named {
                    self.check_station(station)?;
                }
                Ok(StationFilter::Only(named))
            }
        }
    }
}

/// The layer: `clients` when `clients_file` is set; `require_certificate` with mutual TLS
/// and no `clients_file` (any certificate the CA signed is then an identity).
#[derive(Clone)]
pub struct AuthLayer {
    clients: Option<Arc<Clients>>,
    require_certificate: bool,
}

impl AuthLayer {
    pub fn new(clients: Option<Arc<Clients>>, require_certificate: bool) -> Self {
        Self {
            clients,
            require_certificate,
        }
    }
}

impl<S> Layer<S> for AuthLayer {
    type Service = Authenticated<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Authenticated {
            inner,
            clients: self.clients.clone(),
            require_certificate: self.require_certificate,
        }
    }
}

#[derive(Clone)]
pub struct Authenticated<S> {
    inner: S,
    clients: Option<Arc<Clients>>,
    require_certificate: bool,
}

impl<S, B> Service<http::Request<B>> for Authenticated<S>
where
    S: Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Either<Ready<Result<Self::Response, Self::Error>>, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        let need = need(request.uri().path());
        if need == Need::Nothing {
            return Either::Right(self.inner.call(request));
        }
        let Some(clients) = &self.clients else {
            if self.require_certificate
                && super::peer_certificate_name(request.extensions()).is_none()
            {
                return Either::Left(ready(Ok(Status::unauthenticated(
                    "this server needs a client certificate for every call but health and reflection",
                )
                .into_http())));
            }
            return Either::Right(self.inner.call(request));
        };
        match identify(clients, &request).and_then(|client| permit(client, need)) {
            Ok(client) => {
                if let Some(slot) = request.extensions().get::<Arc<AuditSlot>>() {
                    slot.note_client(&client.name);
                }
                request.extensions_mut().insert(Caller::Client(client));
                Either::Right(self.inner.call(request))
            }
            Err(status) => Either::Left(ready(Ok(status.into_http()))),
        }
    }
}

/// The client a request's credential names: its bearer token, or else the subject CN of its
/// verified client certificate. Messages never repeat the credential.
fn identify<B>(clients: &Clients, request: &http::Request<B>) -> Result<Arc<Client>, Status> {
    let mut values = request
        .headers()
        .get_all(http::header::AUTHORIZATION)
        .iter();
    let first = values.next();
    if first.is_none()
        && let Some(name) = super::peer_certificate_name(request.extensions())
    {
        return clients.table().by_name(&name).ok_or_else(|| {
            Status::unauthenticated("the client certificate names no client of clients_file")
        });
    }
    let (Some(value), None) = (first, values.next()) else {
        return Err(Status::unauthenticated(
            "send one `authorization: Bearer <token>` header",
        ));
    };
    let token = value
        .to_str()
        .ok()
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token.trim())
        .filter(|token| !token.is_empty() && !token.contains(' '))
        .ok_or_else(|| {
            Status::unauthenticated("the authorization header is not `Bearer <token>`")
        })?;
    clients
        .table()
        .by_token(token)
        .ok_or_else(|| Status::unauthenticated("the bearer token is not a known client's"))
}

/// The client, when its roles cover what the method needs.
fn permit(client: Arc<Client>, need: Need) -> Result<Arc<Client>, Status> {
    let allowed = match need {
        Need::Nothing | Need::Identity => true,
        Need::Station => client.station_role,
        Need::Admin => client.admin,
    };
    if !allowed {
        let role = if need == Need::Admin {
            "admin"
        } else {
            "station"
        };
        return Err(Status::permission_denied(format!(
            "client {:?} lacks the {role} role this method needs",
            client.name
        )));
    }
    Ok(client)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn methods_need_their_service_s_role() {
        assert_eq!(need("/grpc.health.v1.Health/Check"), Need::Nothing);
        assert_eq!(
            need("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"),
            Need::Nothing
        );
        assert_eq!(
            need("/chargegate.v1.ChargingAuthorization/Authorize"),
            Need::Station
        );
        assert_eq!(need("/chargegate.v1.Audit/QueryCalls"), Need::Admin);
        assert_eq!(need("/chargegate.v1.Grants/PutGrant"), Need::Admin);
        assert_eq!(need("/chargegate.v1.Webhooks/ListDeliveries"), Need::Admin);
        assert_eq!(need("/grpc.health.v1.Healthy/Check"), Need::Identity);
        assert_eq!(need("/"), Need::Identity);
    }
}
