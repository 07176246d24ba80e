//! Grants on PostgreSQL. Every write bumps `grants_version` and notifies, so other instances
//! reload the list in force (see [`Postgres::grants_version`]).

use async_trait::async_trait;

use super::{Postgres, db, listen};
use crate::{
    decision::Micros,
    store::{GrantStore, StoreError, StoredGrant},
    token::Fingerprint,
};

impl Postgres {
    /// Changes with every grant write of any instance.
    pub async fn grants_version(&self) -> Result<i64, StoreError> {
        let client = self.client().await?;
        let v: String = client
            .query_one(
                "SELECT value FROM chargegate_meta WHERE key = 'grants_version'",
                &[],
            )
            .await
            .map_err(db)?
            .get(0);
        Ok(v.parse().unwrap_or(0))
    }

    /// Resolves when another instance may have written grants.
    pub async fn grants_written(&self) {
        self.wakes().grants.notified().await
    }

    /// Runs one grant write, bumping the version in the same transaction.
    async fn write_grants(
        &self,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<u64, StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(db)?;
        let n = tx.execute(sql, params).await.map_err(db)?;
        tx.execute(
            "UPDATE chargegate_meta SET value = (value::bigint + 1)::text
             WHERE key = 'grants_version'",
            &[],
        )
        .await
        .map_err(db)?;
        tx.execute("SELECT pg_notify($1, '')", &[&listen::GRANTS])
            .await
            .map_err(db)?;
        tx.commit().await.map_err(db)?;
        Ok(n)
    }
}

#[async_trait]
impl GrantStore for Postgres {
    async fn put_grant(&self, grant: StoredGrant) -> Result<(), StoreError> {
        self.write_grants(
            "INSERT INTO grants (station_id, token_fp, expires_at_us, blocked)
             VALUES ($1, $2, $3, $4)
             ON CONFLICT (station_id, token_fp)
             DO UPDATE SET expires_at_us = $3, blocked = $4",
            &[
                &grant.station_id,
                &grant.fingerprint.as_str(),
                &grant.expires_at.map(|m| m.0),
                &grant.blocked,
            ],
        )
        .await?;
        Ok(())
    }

    async fn delete_grant(
        &self,
        station_id: &str,
        fingerprint: &Fingerprint,
    ) -> Result<bool, StoreError> {
        let n = self
            .write_grants(
                "DELETE FROM grants WHERE station_id = $1 AND token_fp = $2",
                &[&station_id, &fingerprint.as_str()],
            )
            .await?;
        Ok(n > 0)
    }

    async fn list_grants(&self) -> Result<Vec<StoredGrant>, StoreError> {
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT station_id, token_fp, expires_at_us, blocked FROM grants
                 ORDER BY station_id, token_fp",
                &[],
            )
            .await
            .map_err(db)?;
        Ok(rows
            .into_iter()
            .map(|r| StoredGrant {
                station_id: r.get(0),
                fingerprint: Fingerprint::from_stored(r.get(1)),
                expires_at: r.get::<_, Option<i64>>(2).map(Micros),
                blocked: r.get(3),
            })
            .collect())
    }
}
