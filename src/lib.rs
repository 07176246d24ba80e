//! chargegate authorizes EV-charging sessions asynchronously: a station's gateway calls
//! `Authorize`, is acknowledged once the request is durable, and the decision is pushed to
//! `SubscribeDecisions` streams and recorded in the decision log.
//!
//! # Layout
//! The path of a request reads like the module list:
//! - [`intake`]: validates an `AuthorizeRequest` into a [`intake::NewRequest`], or field violations.
//! - [`queue`]: the port where acknowledged requests wait; [`queue::sqlite`] is the embedded queue.
//! - [`decide`]: the pipeline that claims queued requests and decides them under a deadline.
//! - [`authorizer`]: the port that says allowed or not; [`authorizer::acl`] is the access list.
//! - [`store`]: the decision log port; [`store::sqlite`] is the embedded store (and group commit).
//! - [`fanout`]: pushes recorded decisions to subscribers, catching lagging ones up from the log.
//! - [`webhook`]: the outbox of callback deliveries and the engine that POSTs them, signed,
//!   retried and kept off private networks.
//! - [`api`]: the gRPC services and the mapping of errors to `tonic::Status`.
//! - [`audit`]: the record of every RPC (a tower layer) and the tamper-evident decision log.
//!
//! Around them: [`settings`] (the one list of keys, defaults and meanings), [`config`] (every
//! key, parsed once into types), [`backends`] (the ports' backends, chosen from the config),
//! [`server`] (wiring and ordered shutdown), [`security`] (who may call what, and how much), [`reload`] (files re-read while serving),
//! [`health`] (grpc.health.v1 and readiness), [`telemetry`] (logs, Prometheus), [`cli`] (the
//! command line), [`token`] (driver tokens and their fingerprints), [`cursor`] (opaque log
//! positions), [`decision`] (statuses, reasons, records), [`fuzzing`] (the fuzz targets' entry points) and
//! [`proto`] (generated code).

/// The version and the commit it was built from, as `chargegate --version` prints it and the
/// server logs it at start.
pub const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("CHARGEGATE_GIT_COMMIT"),
    ")"
);

pub mod api;
pub mod archive;
pub mod audit;
pub mod authorizer;
pub mod backends;
pub mod cli;
pub mod config;
pub mod cursor;
pub mod decide;
pub mod decision;
pub mod failpoint;
pub mod fanout;
pub mod fuzzing;
pub mod health;
pub mod intake;
pub mod proto;
pub mod queue;
pub mod reload;
pub mod revise;
pub mod security;
pub mod server;
pub mod settings;
pub mod store;
pub mod telemetry;
pub mod token;
pub mod webhook;
