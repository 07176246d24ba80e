//! The backends a server runs on, chosen in one place from the configuration's `queue_url` and
//! `store_url`. The server wires the [`Backends`] value and knows no backend by name.

use std::{sync::Arc, time::Duration};

use tokio::sync::Notify;

use crate::{
    audit::{AuditTrail, chain},
    config::{Config, QueueBackend, StoreBackend},
    fanout::Hub,
    health::Probe,
    queue::{Queue, postgres::PostgresQueue, sqlite::SqliteQueue},
    store::{DecisionLog, GrantStore, StoreError, postgres::Postgres, sqlite::Database},
    token::Fingerprinter,
    webhook::WebhookOutbox,
};

/// Every port the server needs, and what health probes.
pub struct Backends {
    pub log: Arc<dyn DecisionLog>,
    pub queue: Arc<dyn Queue>,
    pub audit: Arc<dyn AuditTrail>,
    pub grants: Arc<dyn GrantStore>,
    pub outbox: Arc<dyn WebhookOutbox>,
    /// Notified when webhook deliveries were added or redriven.
    pub outbox_wake: Arc<Notify>,
    /// Each system the ports live on, probed by health: one entry per system, so a port that
    /// shares a system with another is probed with it.
    pub probes: Vec<(&'static str, Arc<dyn Probe>)>,
    /// Where the store lives, for the start-up log (never a credential).
    pub location: String,
    kind: Kind,
}

enum Kind {
    Sqlite(Database),
    Postgres(Postgres),
}

impl Backends {
    /// Opens the backends `config` names. `hub` receives the decisions they record; `lease` is
    /// how long a claimed queue entry stays with its worker.
    pub async fn open(
        config: &Config,
        hub: Arc<Hub>,
        fingerprinter: &Fingerprinter,
        lease: Duration,
    ) -> Result<Self, StoreError> {
        match (&config.store, &config.queue) {
            (StoreBackend::Sqlite { path }, QueueBackend::Sqlite { .. }) => {
                let db = Database::open(
                    path,
                    config.queue_max,
                    hub,
                    fingerprinter.derive_key(chain::KEY_PURPOSE),
                )?;
                Ok(Self {
                    log: Arc::new(db.clone()),
                    queue: Arc::new(SqliteQueue::new(db.clone(), lease)),
                    audit: Arc::new(db.clone()),
                    grants: Arc::new(db.clone()),
                    outbox: Arc::new(db.clone()),
                    outbox_wake: db.outbox_wake(),
                    probes: vec![("sqlite", Arc::new(db.clone()))],
                    location: path.display().to_string(),
                    kind: Kind::Sqlite(db),
                })
            }
            (StoreBackend::Postgres { url }, QueueBackend::Postgres) => {
                let pg = Postgres::open(
                    url,
                    config.queue_max,
                    hub,
                    fingerprinter.derive_key(chain::KEY_PURPOSE),
                )
                .await?;
                Ok(Self {
                    log: Arc::new(pg.clone()),
                    queue: Arc::new(PostgresQueue::new(pg.clone(), lease)),
                    audit: Arc::new(pg.clone()),
                    grants: Arc::new(pg.clone()),
                    outbox: Arc::new(pg.clone()),
                    outbox_wake: pg.wakes().outbox.clone(),
                    probes: vec![("postgres", Arc::new(pg.clone()))],
                    location: redacted(url),
                    kind: Kind::Postgres(pg),
                })
            }
            _ => Err(StoreError::backend(std::io::Error::other(
                "this combination of queue_url and store_url is refused by the configuration check",
            ))),
        }
    }

    /// Commits what is buffered and closes the backends.
    pub async fn close(&self) {
        match &self.kind {
            Kind::Sqlite(db) => db.close().await,
            Kind::Postgres(pg) => pg.close().await,
        }
    }

    /// The PostgreSQL store, when that is the backend (its grants change under other instances).
    pub fn postgres(&self) -> Option<&Postgres> {
        match &self.kind {
            Kind::Postgres(pg) => Some(pg),
            Kind::Sqlite(_) => None,
        }
    }
}

/// A URL without its password, for logs.
fn redacted(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) => {
            if u.password().is_some() {
                let _ = u.set_password(Some("***"));
            }
            u.to_string()
        }
        Err(_) => "(unparsable URL)".into(),
    }
}
