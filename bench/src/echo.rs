//! The bare-metal reference: a tonic server with chargegate's message shapes that does nothing.
//! `Authorize` answers at once (no validation, no durability); `SubscribeDecisions` holds an idle
//! stream open. It runs as its own process (`chargegate-bench echo-server`) so its RSS and CPU are
//! measured exactly like chargegate's.
//!
//! With `--durable DIR` it is the durable-ack floor instead: each `Authorize` inserts one row
//! (a UUIDv7 request id, unique; the station; the time) into a SQLite file in WAL mode with
//! `synchronous=FULL`, committed by one writer thread for every call that arrived meanwhile (one
//! fsync per group commit), and answers after the commit. No validation, no decision, no audit:
//! the least a service that acknowledges durably must do.

use std::{path::Path, pin::Pin};

use chargegate::proto::{
    AcceptStatus, AuthorizeRequest, AuthorizeResponse, GetDecisionRequest, GetDecisionResponse,
    SubscribeDecisionsRequest, SubscribeDecisionsResponse,
    charging_authorization_server::{ChargingAuthorization, ChargingAuthorizationServer},
};
use tokio_stream::{Stream, wrappers::ReceiverStream};
use tonic::{Request, Response, Status, transport::server::TcpIncoming};

/// A row for the durable floor's writer (request id, station), and where its commit is answered.
type Row = (String, String, tokio::sync::oneshot::Sender<bool>);
type Durable = tokio::sync::mpsc::Sender<Row>;

struct Echo {
    durable: Option<Durable>,
}

#[tonic::async_trait]
impl ChargingAuthorization for Echo {
    async fn authorize(
        &self,
        request: Request<AuthorizeRequest>,
    ) -> Result<Response<AuthorizeResponse>, Status> {
        let mut request = request.into_inner();
        if let Some(writer) = &self.durable {
            request.request_id = uuid::Uuid::now_v7().to_string();
            let (tx, rx) = tokio::sync::oneshot::channel();
            let row = (request.request_id.clone(), request.station_id, tx);
            let committed = writer.send(row).await.is_ok() && rx.await == Ok(true);
            if !committed {
                return Err(Status::unavailable("the commit failed"));
            }
        }
        Ok(Response::new(AuthorizeResponse {
            request_id: request.request_id,
            status: AcceptStatus::Accepted as i32,
            message: chargegate::api::authorization::MESSAGE_SUBSCRIBERS.to_owned(),
            duplicate: false,
            accepted_at: Some(chargegate::decision::Micros::now().to_proto()),
        }))
    }

    type SubscribeDecisionsStream =
        Pin<Box<dyn Stream<Item = Result<SubscribeDecisionsResponse, Status>> + Send + 'static>>;

    async fn subscribe_decisions(
        &self,
        _: Request<SubscribeDecisionsRequest>,
    ) -> Result<Response<Self::SubscribeDecisionsStream>, Status> {
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        tokio::spawn(async move { tx.closed().await });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn get_decision(
        &self,
        _: Request<GetDecisionRequest>,
    ) -> Result<Response<GetDecisionResponse>, Status> {
        Err(Status::unimplemented("echo"))
    }
}

/// How the PostgreSQL floor commits a group of calls.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Shape {
    /// One `UNNEST` insert, autocommitted: the floor.
    Row,
    /// A transaction shaped like chargegate's writer: `BEGIN`, the insert, a one-row head
    /// locked and written back, a notification, `COMMIT` (for the driver comparison).
    Transaction,
}

/// The driver the PostgreSQL floor commits through.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Driver {
    /// tokio-postgres, as chargegate uses it: statements of one transaction pipelined.
    TokioPostgres,
    /// sqlx (the bench's `driver-comparison` feature): one statement at a time per connection.
    Sqlx,
}

/// Serves the echo service on an ephemeral port; prints `listen=<addr>` for the parent. With
/// `durable`, the durable-ack floor with its SQLite file in that directory; with `postgres`, the
/// PostgreSQL durable-ack floor in that database, through `driver`, committed as `shape`.
pub fn serve(
    durable: Option<&Path>,
    postgres: Option<&str>,
    driver: Driver,
    shape: Shape,
) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Runtime::new()?;
    let durable = match (durable, postgres) {
        (Some(dir), _) => Some(start_writer(dir)?),
        (None, Some(url)) => Some(runtime.block_on(start_postgres_writer(url, driver, shape))?),
        (None, None) => None,
    };
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        println!("listen={}", listener.local_addr()?);
        tonic::transport::Server::builder()
            .add_service(ChargingAuthorizationServer::new(Echo { durable }))
            .serve_with_incoming(TcpIncoming::from(listener).with_nodelay(Some(true)))
            .await?;
        Ok(())
    })
}

/// Opens the floor's SQLite file and starts its writer thread: group commit, as chargegate's.
fn start_writer(dir: &Path) -> anyhow::Result<Durable> {
    std::fs::create_dir_all(dir)?;
    let mut conn = rusqlite::Connection::open(dir.join("durable-echo.db"))?;
    conn.execute_batch(
        "PRAGMA journal_mode = WAL;
         PRAGMA synchronous = FULL;
         CREATE TABLE IF NOT EXISTS requests (
             seq            INTEGER PRIMARY KEY,
             request_id     TEXT NOT NULL UNIQUE,
             station_id     TEXT NOT NULL,
             accepted_at_us INTEGER NOT NULL
         );",
    )?;
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Row>(16 * 1024);
    std::thread::Builder::new()
        .name("durable-echo-writer".into())
        .spawn(move || {
            let mut batch = Vec::with_capacity(2048);
            while let Some(first) = rx.blocking_recv() {
                batch.push(first);
                while batch.len() < 2048 {
                    match rx.try_recv() {
                        Ok(row) => batch.push(row),
                        Err(_) => break,
                    }
                }
                let committed = commit(&mut conn, &batch).is_ok();
                for (_, _, reply) in batch.drain(..) {
                    let _ = reply.send(committed);
                }
            }
        })?;
    Ok(tx)
}

fn commit(conn: &mut rusqlite::Connection, rows: &[Row]) -> rusqlite::Result<()> {
    let tx = conn.transaction()?;
    {
        let mut insert = tx.prepare_cached(
            "INSERT INTO requests (request_id, station_id, accepted_at_us) VALUES (?1, ?2, ?3)",
        )?;
        let now = chargegate::decision::Micros::now().0;
        for (request_id, station_id, _) in rows {
            insert.execute(rusqlite::params![request_id, station_id, now])?;
        }
    }
    tx.commit()
}

const FLOOR_TABLES: &str = "CREATE TABLE IF NOT EXISTS durable_echo (
         request_id     text PRIMARY KEY,
         station_id     text NOT NULL,
         accepted_at_us bigint NOT NULL
     );
     CREATE TABLE IF NOT EXISTS durable_echo_head (n bigint NOT NULL);
     INSERT INTO durable_echo_head SELECT 0 WHERE NOT EXISTS (SELECT 1 FROM durable_echo_head);";
const FLOOR_INSERT: &str = "INSERT INTO durable_echo (request_id, station_id, accepted_at_us)
     SELECT * FROM UNNEST($1::text[], $2::text[], $3::bigint[])";
const FLOOR_LOCK: &str = "SELECT n FROM durable_echo_head FOR UPDATE";
const FLOOR_HEAD: &str = "UPDATE durable_echo_head SET n = n + $1";
const FLOOR_NOTIFY: &str = "SELECT pg_notify('durable_echo', $1)";

/// The PostgreSQL durable-ack floor: one row per call, committed by one task for every call that
/// arrived meanwhile (one multi-row `UNNEST` insert per commit, as chargegate's writer batches),
/// through the driver chargegate uses, answered after the commit.
async fn start_postgres_writer(url: &str, driver: Driver, shape: Shape) -> anyhow::Result<Durable> {
    let (tx, rx) = tokio::sync::mpsc::channel::<Row>(16 * 1024);
    match driver {
        Driver::TokioPostgres => tokio_postgres_floor(url, shape, rx).await?,
        Driver::Sqlx => sqlx_floor(url, shape, rx).await?,
    }
    Ok(tx)
}

async fn tokio_postgres_floor(
    url: &str,
    shape: Shape,
    mut rx: tokio::sync::mpsc::Receiver<Row>,
) -> anyhow::Result<()> {
    let (mut client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
    tokio::spawn(connection);
    client.batch_execute(FLOOR_TABLES).await?;
    let insert = client.prepare(FLOOR_INSERT).await?;
    let (lock, head, notify) = (
        client.prepare(FLOOR_LOCK).await?,
        client.prepare(FLOOR_HEAD).await?,
        client.prepare(FLOOR_NOTIFY).await?,
    );
    tokio::spawn(async move {
        let mut batch = Vec::with_capacity(1024);
        while rx.recv_many(&mut batch, 1024).await > 0 {
            let now = chargegate::decision::Micros::now().0;
            let ids: Vec<&str> = batch.iter().map(|r| r.0.as_str()).collect();
            let stations: Vec<&str> = batch.iter().map(|r| r.1.as_str()).collect();
            let at = vec![now; batch.len()];
            let committed = match shape {
                Shape::Row => client
                    .execute(&insert, &[&ids, &stations, &at])
                    .await
                    .is_ok(),
                Shape::Transaction => {
                    let n = batch.len() as i64;
                    let text = n.to_string();
                    async {
                        let tx = client.transaction().await?;
                        let rows: [&(dyn tokio_postgres::types::ToSql + Sync); 3] =
                            [&ids, &stations, &at];
                        let (by, payload): ([&(dyn tokio_postgres::types::ToSql + Sync); 1], _) =
                            ([&n], [&text as &(dyn tokio_postgres::types::ToSql + Sync)]);
                        tokio::try_join!(
                            biased;
                            tx.execute(&insert, &rows),
                            tx.query_one(&lock, &[]),
                            tx.execute(&head, &by),
                            tx.execute(&notify, &payload),
                        )?;
                        tx.commit().await
                    }
                    .await
                    .is_ok()
                }
            };
            for (_, _, reply) in batch.drain(..) {
                let _ = reply.send(committed);
            }
        }
    });
    Ok(())
}

#[cfg(feature = "driver-comparison")]
async fn sqlx_floor(
    url: &str,
    shape: Shape,
    mut rx: tokio::sync::mpsc::Receiver<Row>,
) -> anyhow::Result<()> {
    use sqlx::{Connection, Executor};
    let mut conn = sqlx::PgConnection::connect(url).await?;
    conn.execute(FLOOR_TABLES).await?;
    tokio::spawn(async move {
        let mut batch = Vec::with_capacity(1024);
        while rx.recv_many(&mut batch, 1024).await > 0 {
            let now = chargegate::decision::Micros::now().0;
            let ids: Vec<String> = batch.iter().map(|r| r.0.clone()).collect();
            let stations: Vec<String> = batch.iter().map(|r| r.1.clone()).collect();
            let at = vec![now; batch.len()];
            let insert = sqlx::query(FLOOR_INSERT)
                .bind(&ids)
                .bind(&stations)
                .bind(&at);
            let committed = match shape {
                Shape::Row => insert.execute(&mut conn).await.is_ok(),
                Shape::Transaction => {
                    let n = batch.len() as i64;
                    async {
                        let mut tx = conn.begin().await?;
                        insert.execute(&mut *tx).await?;
                        sqlx::query(FLOOR_LOCK).fetch_one(&mut *tx).await?;
                        sqlx::query(FLOOR_HEAD).bind(n).execute(&mut *tx).await?;
                        sqlx::query(FLOOR_NOTIFY)
                            .bind(n.to_string())
                            .execute(&mut *tx)
                            .await?;
                        tx.commit().await
                    }
                    .await
                    .is_ok()
                }
            };
            for (_, _, reply) in batch.drain(..) {
                let _ = reply.send(committed);
            }
        }
    });
    Ok(())
}

#[cfg(not(feature = "driver-comparison"))]
async fn sqlx_floor(_: &str, _: Shape, _: tokio::sync::mpsc::Receiver<Row>) -> anyhow::Result<()> {
    anyhow::bail!("built without the driver-comparison feature")
}
