//! Which backend the suite runs against. `CHARGEGATE_TEST_BACKEND=postgres` (with
//! `CHARGEGATE_TEST_POSTGRES_URL`, a server URL whose user may create databases) runs every test
//! on PostgreSQL, each in a fresh database cloned from a migrated template;
//! `CHARGEGATE_TEST_BACKEND=redis` does the same with the queue on Redis Streams at
//! `CHARGEGATE_TEST_REDIS_URL` (each test's keys are its fresh database's log id); the default is
//! the embedded SQLite store.

use std::sync::OnceLock;

/// The server URL tests create their databases on, when set.
pub fn postgres_url() -> Option<String> {
    std::env::var("CHARGEGATE_TEST_POSTGRES_URL")
        .ok()
        .filter(|u| !u.is_empty())
}

/// True when the suite runs on PostgreSQL (with or without Redis).
pub fn on_postgres() -> bool {
    matches!(
        std::env::var("CHARGEGATE_TEST_BACKEND").as_deref(),
        Ok("postgres" | "redis")
    )
}

/// The Redis server the queue runs on, when the suite runs with Redis Streams.
pub fn redis_url() -> Option<String> {
    (std::env::var("CHARGEGATE_TEST_BACKEND").as_deref() == Ok("redis")).then(|| {
        std::env::var("CHARGEGATE_TEST_REDIS_URL")
            .ok()
            .filter(|u| !u.is_empty())
            .expect("CHARGEGATE_TEST_BACKEND=redis needs CHARGEGATE_TEST_REDIS_URL")
    })
}

/// True (and says why) when this test only makes sense on the embedded store and the suite runs
/// on another backend: the caller returns.
pub fn sqlite_only(why: &str) -> bool {
    if on_postgres() {
        eprintln!("not run on PostgreSQL: {why}");
        return true;
    }
    false
}

/// `url` with its database replaced by `name`.
pub fn with_database(url: &str, name: &str) -> String {
    let mut u = url::Url::parse(url).expect("CHARGEGATE_TEST_POSTGRES_URL is a URL");
    u.set_path(&format!("/{name}"));
    u.to_string()
}

/// Runs `f` on a runtime of its own, on a thread of its own (callers may be inside a runtime).
fn blocking<T: Send + 'static>(
    f: impl FnOnce(tokio_postgres::Client) -> std::pin::Pin<Box<dyn Future<Output = T> + Send>>
    + Send
    + 'static,
    url: String,
) -> T {
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime");
        rt.block_on(async move {
            let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
                .await
                .expect("PostgreSQL at CHARGEGATE_TEST_POSTGRES_URL answers");
            tokio::spawn(connection);
            f(client).await
        })
    })
    .join()
    .expect("the database thread")
}

/// The template every test database is cloned from, named after the migrations it holds:
/// made once (under an advisory lock, so concurrent test processes make it once) and kept.
fn template(url: &str) -> &'static str {
    static TEMPLATE: OnceLock<String> = OnceLock::new();
    TEMPLATE.get_or_init(|| {
        use sha2::Digest;
        let digest = sha2::Sha256::digest(
            chargegate::store::postgres::schema::MIGRATIONS
                .concat()
                .as_bytes(),
        );
        let name = format!("chargegate_test_template_{}", &hex::encode(digest)[..12]);
        let (admin, building) = (url.to_owned(), format!("{name}_building"));
        let target = with_database(url, &building);
        let made = name.clone();
        blocking(
            move |c| {
                Box::pin(async move {
                    c.execute("SELECT pg_advisory_lock(7436)", &[])
                        .await
                        .expect("lock");
                    let exists = c
                        .query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&made])
                        .await
                        .expect("look for the template")
                        .is_some();
                    if !exists {
                        c.batch_execute(&format!("DROP DATABASE IF EXISTS {building}"))
                            .await
                            .expect("drop a half-built template");
                        c.batch_execute(&format!("CREATE DATABASE {building}"))
                            .await
                            .expect("create the template");
                        let (mut t, connection) =
                            tokio_postgres::connect(&target, tokio_postgres::NoTls)
                                .await
                                .expect("connect to the template");
                        let driven = tokio::spawn(connection);
                        chargegate::store::postgres::schema::migrate(&mut t)
                            .await
                            .expect("migrate the template");
                        drop(t);
                        let _ = driven.await;
                        c.batch_execute(&format!("ALTER DATABASE {building} RENAME TO {made}"))
                            .await
                            .expect("publish the template");
                    }
                    c.execute("SELECT pg_advisory_unlock(7436)", &[])
                        .await
                        .expect("unlock");
                })
            },
            admin,
        );
        name
    })
}

/// A fresh, migrated database for one test; dropped with the handle.
pub struct TestDatabase {
    pub url: String,
    name: String,
    admin: String,
}

impl TestDatabase {
    pub fn create(admin: &str) -> Self {
        let template = template(admin);
        let name = format!("chargegate_test_{}", uuid::Uuid::now_v7().simple());
        let create = format!("CREATE DATABASE {name} TEMPLATE {template}");
        blocking(
            move |c| {
                Box::pin(async move {
                    // Another clone may be starting from the template at this moment.
                    for attempt in 0.. {
                        match c.batch_execute(&create).await {
                            Ok(()) => return,
                            Err(e) if attempt < 50 => {
                                let _ = e;
                                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                            }
                            Err(e) => panic!("create a test database: {e}"),
                        }
                    }
                })
            },
            admin.to_owned(),
        );
        let url = with_database(admin, &name);
        // Each clone is a log of its own: cursors of one are refused by another.
        blocking(
            |c| {
                Box::pin(async move {
                    c.execute(
                        "UPDATE chargegate_meta SET value = (floor(random() * 4294967295))::bigint::text
                         WHERE key = 'log_id'",
                        &[],
                    )
                    .await
                    .expect("a log id of its own");
                })
            },
            url.clone(),
        );
        Self {
            url,
            name,
            admin: admin.to_owned(),
        }
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        let drop = format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name);
        blocking(
            move |c| {
                Box::pin(async move {
                    let _ = c.batch_execute(&drop).await;
                })
            },
            self.admin.clone(),
        );
    }
}

/// A value bound to a statement run on either backend (`$1`, `$2`… work on both).
#[derive(Clone, Debug)]
pub enum Value {
    Int(i64),
    Text(String),
}

impl super::TestDir {
    /// Runs `sql` on the test's store, from outside the server (as an operator's shell would).
    pub fn sql_execute(&self, sql: &str, params: &[Value]) {
        self.sql_query(sql, params, false);
    }

    /// The first column of the first row of `sql`, as a boolean.
    pub fn sql_bool(&self, sql: &str, params: &[Value]) -> bool {
        self.sql_query(sql, params, true).unwrap_or(false)
    }

    fn sql_query(&self, sql: &str, params: &[Value], read: bool) -> Option<bool> {
        match self.store_url() {
            Some(url) => {
                let (sql, params) = (sql.to_owned(), params.to_vec());
                blocking(
                    move |c| {
                        Box::pin(async move {
                            let bound: Vec<Box<dyn tokio_postgres::types::ToSql + Sync + Send>> =
                                params
                                    .into_iter()
                                    .map(|p| match p {
                                        Value::Int(i) => Box::new(i) as Box<_>,
                                        Value::Text(s) => Box::new(s) as Box<_>,
                                    })
                                    .collect();
                            let refs: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = bound
                                .iter()
                                .map(|b| b.as_ref() as &(dyn tokio_postgres::types::ToSql + Sync))
                                .collect();
                            if read {
                                let row = c.query_one(&sql, &refs).await.expect("query");
                                Some(row.get::<_, bool>(0))
                            } else {
                                c.execute(&sql, &refs).await.expect("statement");
                                None
                            }
                        })
                    },
                    url,
                )
            }
            None => {
                let conn = rusqlite::Connection::open(self.data_dir().join("chargegate.db"))
                    .expect("open the store");
                let bound: Vec<Box<dyn rusqlite::ToSql>> = params
                    .iter()
                    .map(|p| match p {
                        Value::Int(i) => Box::new(*i) as Box<dyn rusqlite::ToSql>,
                        Value::Text(s) => Box::new(s.clone()),
                    })
                    .collect();
                let refs: Vec<&dyn rusqlite::ToSql> = bound.iter().map(|b| b.as_ref()).collect();
                if read {
                    Some(
                        conn.query_row(sql, refs.as_slice(), |r| r.get::<_, bool>(0))
                            .expect("query"),
                    )
                } else {
                    conn.execute(sql, refs.as_slice()).expect("statement");
                    None
                }
            }
        }
    }

    /// The flags that point a chargegate binary at this test's store.
    pub fn store_flags(&self) -> Vec<String> {
        let mut flags = vec![
            "--data-dir".to_owned(),
            self.data_dir().display().to_string(),
        ];
        if let Some(url) = self.store_url() {
            flags.extend([
                "--store-url".to_owned(),
                url,
                "--token-hash-key".to_owned(),
                "test-token-hash-key".to_owned(),
            ]);
            if let Some(redis) = self.redis_url() {
                flags.extend(["--queue-url".to_owned(), redis]);
            }
        }
        flags
    }
}
