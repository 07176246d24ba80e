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
        Self::in_extensions(request.extensions())
    }

    /// The caller the layer put into these extensions (open when it put none).
    pub fn in_extensions(extensions: &http::Extensions) -> Self {
        extensions.get::<Caller>().cloned().unwrap_or(Caller::Open)
    }

    /// What limits count this caller by: its client's name, or without `clients_file` its
    /// peer's IP address.
    pub fn limit_key(&self, peer: Option<std::net::SocketAddr>) -> String {
        match self {
            Caller::Client(c) => c.name.clone(),
            Caller::Open => peer.map(|p| p.ip().to_string()).unwrap_or_default(),
        }
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
        if self.clients.is_none() && !self.require_certificate {
            return Either::Right(self.inner.call(request));
        }
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
    use std::collections::{BTreeSet, HashSet};

    use proptest::prelude::*;

    use super::*;

    const UNIVERSE: [&str; 4] = [
        "00000000-0000-4000-8000-000000000001",
        "00000000-0000-4000-8000-000000000002",
        "00000000-0000-4000-8000-000000000003",
        "00000000-0000-4000-8000-000000000004",
    ];
    const PATHS: [&str; 6] = [
        "/chargegate.v1.ChargingAuthorization/Authorize",
        "/chargegate.v1.ChargingAuthorization/SubscribeDecisions",
        "/chargegate.v1.Grants/PutGrant",
        "/chargegate.v1.Audit/QueryCalls",
        "/grpc.health.v1.Health/Check",
        "/elsewhere.v1.Other/Call",
    ];

    /// The contract's rules written plainly: what each call may do.
    mod reference {
        pub fn may_call(path: &str, station_role: bool, admin: bool) -> bool {
            if path.starts_with("/grpc.health.v1.") {
                return true;
            }
            if path.starts_with("/chargegate.v1.ChargingAuthorization/") {
                return station_role;
            }
            if [
                "/chargegate.v1.Grants/",
                "/chargegate.v1.Audit/",
                "/chargegate.v1.Webhooks/",
            ]
            .iter()
            .any(|p| path.starts_with(p))
            {
                return admin;
            }
            true
        }
    }

    fn client() -> impl Strategy<Value = Client> {
        (
            any::<bool>(),
            proptest::collection::btree_set(0..UNIVERSE.len(), 0..=UNIVERSE.len()),
            any::<bool>(),
            any::<bool>(),
        )
            .prop_map(|(all, own, station_role, admin)| Client {
                name: "c".into(),
                stations: match all {
                    true => Stations::All,
                    false => Stations::Only(own.iter().map(|i| UNIVERSE[*i].to_owned()).collect()),
                },
                station_role,
                admin,
                rate_per_s: None,
            })
    }

    proptest! {
        #[test]
        fn scope_checks_agree_with_the_reference(
            client in client(),
            path in 0..PATHS.len(),
            asked in proptest::collection::btree_set(0..UNIVERSE.len(), 0..=UNIVERSE.len()),
        ) {
            let path = PATHS[path];
            let covers = |s: &str| match &client.stations {
                Stations::All => true,
                Stations::Only(own) => own.contains(s),
            };
            // Roles.
            let permitted = need(path) == Need::Nothing
                || permit(Arc::new(client.clone()), need(path)).is_ok();
            prop_assert_eq!(permitted, reference::may_call(path, client.station_role, client.admin));
            // One station.
            let caller = Caller::Client(Arc::new(client.clone()));
            for s in UNIVERSE {
                prop_assert_eq!(caller.check_station(s).is_ok(), covers(s));
            }
            // A subscription: the stations named, all inside the scope, or PERMISSION_DENIED;
            // naming none watches exactly the client's own.
            let asked: BTreeSet<String> = asked.iter().map(|i| UNIVERSE[*i].to_owned()).collect();
            let filter = match asked.is_empty() {
                true => StationFilter::All,
                false => StationFilter::Only(asked.iter().cloned().collect()),
            };
            match caller.subscription(filter) {
                Ok(StationFilter::All) => {
                    prop_assert!(asked.is_empty() && client.stations == Stations::All)
                }
                Ok(StationFilter::Only(watched)) => {
                    let watched: HashSet<String> = watched.into_iter().collect();
                    let expected: HashSet<String> = match asked.is_empty() {
                        true => UNIVERSE.iter().filter(|s| covers(s)).map(|s| s.to_string()).collect(),
                        false => asked.iter().cloned().collect(),
                    };
                    prop_assert_eq!(&watched, &expected);
                    prop_assert!(watched.iter().all(|s| covers(s)));
                }
                Err(status) => {
                    prop_assert_eq!(status.code(), tonic::Code::PermissionDenied);
                    prop_assert!(asked.iter().any(|s| !covers(s)));
                }
            }
        }
    }

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
