//! The schema on PostgreSQL: migrations embedded in the binary, applied in order under an
//! advisory lock (at start-up and by `chargegate migrate`), each in its own transaction, each
//! recorded in `chargegate_migrations`. Instances starting together apply each migration once;
//! an instance older than the schema refuses to start.

use tokio_postgres::Client;

use crate::store::StoreError;

/// The advisory lock key every instance takes to migrate ("chargegate" folded into 63 bits).
const MIGRATION_LOCK: i64 = 0x6368_6172_6765_6761;

/// Each migration, in order; the version of a migration is its place in this list, from 1.
/// Never edit one that has shipped: add another.
pub const MIGRATIONS: &[&str] = &[
    // 1: the whole schema of chargegate 0.3.
    "
CREATE TABLE chargegate_meta (
    key   text PRIMARY KEY,
    value text NOT NULL
);
-- Every request_id accepted, by either intake path: the one place idempotency is decided.
CREATE TABLE request_keys (
    request_id     text PRIMARY KEY,
    station_id     text NOT NULL,
    token_fp       text NOT NULL,
    accepted_at_us bigint NOT NULL
);
-- Requests waiting for the remote authorizer, with the plain token, deleted when decided.
CREATE TABLE queue (
    id               bigserial PRIMARY KEY,
    request_id       text NOT NULL UNIQUE,
    station_id       text NOT NULL,
    token_fp         text NOT NULL,
    callback_url     text,
    accepted_at_us   bigint NOT NULL,
    driver_token     text NOT NULL,
    claimed_until_us bigint,
    claimed_by       text,
    claims           integer NOT NULL DEFAULT 0
);
-- The newest position and chain link: locked last by every transaction that records decisions,
-- so positions are dense and in commit order.
CREATE TABLE log_head (
    one      boolean PRIMARY KEY DEFAULT true CHECK (one),
    position bigint NOT NULL,
    floor    bigint NOT NULL,
    chain    bytea NOT NULL,
    chain_floor bytea NOT NULL
);
INSERT INTO log_head (position, floor, chain, chain_floor)
    VALUES (0, 0, decode(repeat('00', 32), 'hex'), decode(repeat('00', 32), 'hex'));
CREATE TABLE decisions (
    position       bigint PRIMARY KEY,
    request_id     text NOT NULL UNIQUE,
    station_id     text NOT NULL,
    token_fp       text NOT NULL,
    status         text NOT NULL,
    reason         text NOT NULL,
    authorizer     text NOT NULL,
    accepted_at_us bigint NOT NULL,
    decided_at_us  bigint NOT NULL,
    processing_ms  bigint NOT NULL,
    chain          bytea NOT NULL
);
CREATE INDEX decisions_by_time ON decisions (decided_at_us, position);
CREATE INDEX decisions_by_status ON decisions (status, decided_at_us, position);
CREATE INDEX decisions_by_station ON decisions (station_id, decided_at_us, position);
CREATE TABLE deliveries (
    seq             bigserial PRIMARY KEY,
    request_id      text NOT NULL UNIQUE,
    station_id      text NOT NULL,
    callback_url    text NOT NULL,
    host            text NOT NULL,
    driver_token    text,
    status          text NOT NULL,
    reason          text NOT NULL,
    decided_at_us   bigint NOT NULL,
    state           text NOT NULL,
    attempts        integer NOT NULL,
    next_attempt_us bigint,
    age_from_us     bigint NOT NULL,
    finished_at_us  bigint,
    last_error      text NOT NULL DEFAULT '',
    history         text NOT NULL DEFAULT '',
    claimed_by      text
);
CREATE INDEX deliveries_due ON deliveries (next_attempt_us, seq) WHERE state = 'pending';
CREATE INDEX deliveries_dead ON deliveries (seq) WHERE state = 'dead';
CREATE TABLE calls (
    seq           bigserial PRIMARY KEY,
    at_us         bigint NOT NULL,
    method        text NOT NULL,
    peer          text NOT NULL,
    client        text NOT NULL,
    station_id    text NOT NULL,
    request_id    text NOT NULL,
    code          text NOT NULL,
    latency_us    bigint NOT NULL,
    stream_event  text NOT NULL,
    messages_sent bigint NOT NULL
);
CREATE INDEX calls_by_time ON calls (at_us, seq);
CREATE TABLE grants (
    station_id    text NOT NULL,
    token_fp      text NOT NULL,
    expires_at_us bigint,
    blocked       boolean NOT NULL,
    PRIMARY KEY (station_id, token_fp)
);
-- Bumped by every grant write, so other instances notice within a poll.
INSERT INTO chargegate_meta (key, value) VALUES ('grants_version', '0');
-- The plain tokens in these tables live in dead tuples until vacuum: vacuum them early.
ALTER TABLE queue SET (autovacuum_vacuum_scale_factor = 0, autovacuum_vacuum_threshold = 1000);
ALTER TABLE deliveries SET (autovacuum_vacuum_scale_factor = 0.01);
",
    // 2: revisions of UNKNOWN decisions (CONTRACT §2a): a request may have a decision and one
    // revision, each a log entry; deliveries are stored under their webhook id.
    "
ALTER TABLE decisions ADD COLUMN revision integer NOT NULL DEFAULT 0;
ALTER TABLE decisions DROP CONSTRAINT decisions_request_id_key;
ALTER TABLE decisions ADD CONSTRAINT decisions_request_revision UNIQUE (request_id, revision);
ALTER TABLE deliveries ADD COLUMN revision integer NOT NULL DEFAULT 0;
-- UNKNOWN decisions that may be revised, with the plain token to ask again: deleted when revised
-- or when revise_unknown_within_ms has passed. Claimed like the queue, with a lease.
CREATE TABLE revisable (
    request_id       text PRIMARY KEY,
    station_id       text NOT NULL,
    token_fp         text NOT NULL,
    driver_token     text NOT NULL,
    callback_url     text,
    accepted_at_us   bigint NOT NULL,
    decided_at_us    bigint NOT NULL,
    claimed_until_us bigint,
    claimed_by       text
);
CREATE INDEX revisable_by_time ON revisable (decided_at_us);
ALTER TABLE revisable SET (autovacuum_vacuum_scale_factor = 0, autovacuum_vacuum_threshold = 1000);
",
];

/// The newest schema version this build knows.
pub const VERSION: i64 = MIGRATIONS.len() as i64;

/// Applies the migrations `client`'s database lacks, under the advisory lock. Returns the
/// versions applied (empty when it was current) and the log id.
pub async fn migrate(client: &mut Client) -> Result<(Vec<i64>, u32), StoreError> {
    client
        .execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK])
        .await
        .map_err(StoreError::backend)?;
    let result = apply(client).await;
    let unlocked = client
        .execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK])
        .await;
    let applied = result?;
    unlocked.map_err(StoreError::backend)?;
    Ok(applied)
}

async fn apply(client: &mut Client) -> Result<(Vec<i64>, u32), StoreError> {
    let db = StoreError::backend;
    client
        .batch_execute(
            "CREATE TABLE IF NOT EXISTS chargegate_migrations (
                 version    bigint PRIMARY KEY,
                 applied_at timestamptz NOT NULL DEFAULT now()
             )",
        )
        .await
        .map_err(db)?;
    let current: i64 = client
        .query_one(
            "SELECT coalesce(max(version), 0) FROM chargegate_migrations",
            &[],
        )
        .await
        .map_err(db)?
        .get(0);
    if current > VERSION {
        return Err(StoreError::backend(std::io::Error::other(format!(
            "the database schema is version {current}; this chargegate knows up to {VERSION}"
        ))));
    }
    let mut applied = Vec::new();
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(current as usize) {
        let version = i as i64 + 1;
        let tx = client.transaction().await.map_err(db)?;
        tx.batch_execute(sql).await.map_err(db)?;
        tx.execute(
            "INSERT INTO chargegate_migrations (version) VALUES ($1)",
            &[&version],
        )
        .await
        .map_err(db)?;
        if version == 1 {
            let log_id = rand::random::<u32>().to_string();
            tx.execute(
                "INSERT INTO chargegate_meta (key, value) VALUES ('log_id', $1)",
                &[&log_id],
            )
            .await
            .map_err(db)?;
        }
        tx.commit().await.map_err(db)?;
        applied.push(version);
    }
    let log_id: String = client
        .query_one(
            "SELECT value FROM chargegate_meta WHERE key = 'log_id'",
            &[],
        )
        .await
        .map_err(db)?
        .get(0);
    let log_id = log_id
        .parse()
        .map_err(|_| StoreError::backend(std::io::Error::other("the log id is not a number")))?;
    Ok((applied, log_id))
}
