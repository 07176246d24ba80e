//! The backends a server runs on, chosen in one place from the configuration's `queue_url` and
//! `store_url`. The server wires the [`Backends`] value and knows no backend by name.

use std::{path::Path, sync::Arc, time::Duration};

use tokio::sync::Notify;

use crate::{
    audit::{AuditTrail, chain},
    config::{Config, QueueBackend, StoreBackend},
    fanout::Hub,
    health::Probe,
    queue::{Queue, postgres::PostgresQueue, redis::RedisQueue, sqlite::SqliteQueue},
    revise::RevisionStore,
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
    /// Where the requests of UNKNOWN decisions are kept to be revised.
    pub revisions: Arc<dyn RevisionStore>,
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
    /// With the queue dispatched through Redis when it is, and the lock that keeps the data dir
    /// (and its claimant name) to this process.
    Postgres(
        Postgres,
        Option<Arc<RedisQueue>>,
        #[allow(dead_code)] std::fs::File,
    ),
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
                    revisions: Arc::new(db.clone()),
                    outbox_wake: db.outbox_wake(),
                    probes: vec![("sqlite", Arc::new(db.clone()))],
                    location: path.display().to_string(),
                    kind: Kind::Sqlite(db),
                })
            }
            (StoreBackend::Postgres { url }, queue) => {
                let redis_url = match queue {
                    QueueBackend::Redis { url } => Some(url.as_str()),
                    _ => None,
                };
                let (claimant, lock) = claimant(&config.data_dir)?;
                let pg = Postgres::open(
                    url,
                    config.queue_max,
                    hub,
                    fingerprinter.derive_key(chain::KEY_PURPOSE),
                    claimant,
                    redis_url.map(|_| RedisQueue::dispatch_lease(lease)),
                    redis_url,
                )
                .await?;
                let mut probes: Vec<(&'static str, Arc<dyn Probe>)> =
                    vec![("postgres", Arc::new(pg.clone()))];
                let (queue, redis, location): (Arc<dyn Queue>, _, _) = match redis_url {
                    None => (
                        Arc::new(PostgresQueue::new(pg.clone(), lease)),
                        None,
                        redacted(url),
                    ),
                    Some(redis_url) => {
                        let previous = consumer(&config.data_dir, &config.instance_id)?;
                        let queue = Arc::new(
                            RedisQueue::open(
                                redis_url,
                                pg.clone(),
                                config.instance_id.clone(),
                                previous,
                                lease,
                            )
                            .await?,
                        );
                        probes.push(("redis", queue.clone()));
                        let location = format!(
                            "{} with the queue on {}",
                            redacted(url),
                            redacted(redis_url)
                        );
                        (queue.clone(), Some(queue), location)
                    }
                };
                Ok(Self {
                    log: Arc::new(pg.clone()),
                    queue,
                    audit: Arc::new(pg.clone()),
                    grants: Arc::new(pg.clone()),
                    outbox: Arc::new(pg.clone()),
                    revisions: Arc::new(pg.clone()),
                    outbox_wake: pg.wakes().outbox.clone(),
                    probes,
                    location,
                    kind: Kind::Postgres(pg, redis, lock),
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
            Kind::Postgres(pg, redis, _) => {
                if let Some(queue) = redis {
                    queue.close();
                }
                pg.close().await
            }
        }
    }

    /// The PostgreSQL store, when that is the backend (its grants change under other instances).
    pub fn postgres(&self) -> Option<&Postgres> {
        match &self.kind {
            Kind::Postgres(pg, ..) => Some(pg),
            Kind::Sqlite(_) => None,
        }
    }
}

/// The name this instance puts on its claims in a shared store, kept in `<data_dir>/claimant`
/// so that a restart in place takes back at once what the process before it held (instances
/// that do not come back lose their claims when the leases end), and the lock that keeps the
/// data dir to this process: two instances never share a name.
fn claimant(data_dir: &Path) -> Result<(String, std::fs::File), StoreError> {
    std::fs::create_dir_all(data_dir).map_err(StoreError::backend)?;
    let lock = std::fs::File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(data_dir.join("claimant.lock"))
        .map_err(StoreError::backend)?;
    lock.try_lock().map_err(|_| {
        StoreError::backend(std::io::Error::other(format!(
            "{} is in use by another chargegate process",
            data_dir.display()
        )))
    })?;
    let path = data_dir.join("claimant");
    let name = match std::fs::read_to_string(&path) {
        Ok(name) if !name.trim().is_empty() => name.trim().to_owned(),
        _ => {
            let name = uuid::Uuid::now_v7().to_string();
            std::fs::write(&path, &name).map_err(StoreError::backend)?;
            name
        }
    };
    Ok((name, lock))
}

/// A URL without its password, for logs.
/// The Redis consumer name this data dir's instance had before (kept in
/// `<data_dir>/redis_consumer`), replaced by `now`.
fn consumer(data_dir: &Path, now: &str) -> Result<Option<String>, StoreError> {
    let path = data_dir.join("redis_consumer");
    let previous = std::fs::read_to_string(&path)
        .ok()
        .map(|p| p.trim().to_owned())
        .filter(|p| !p.is_empty());
    std::fs::write(&path, format!("{now}\n")).map_err(StoreError::backend)?;
    Ok(previous)
}

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
