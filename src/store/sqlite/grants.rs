//! The grants of the embedded authorizer.

use async_trait::async_trait;
use rusqlite::params;

use super::Database;
use crate::{
    decision::Micros,
    store::{GrantStore, StoreError, StoredGrant},
    token::Fingerprint,
};

#[async_trait]
impl GrantStore for Database {
    async fn put_grant(&self, grant: StoredGrant) -> Result<(), StoreError> {
        self.write_with(move |tx| {
            tx.prepare_cached(
                "INSERT INTO grants (station_id, token_fp, expires_at_us, blocked) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (station_id, token_fp) DO UPDATE SET expires_at_us = ?3, blocked = ?4",
            )?
            .execute(params![grant.station_id, grant.fingerprint.as_str(), grant.expires_at.map(|m| m.0), grant.blocked])?;
            Ok(())
        })
        .await
    }

    async fn delete_grant(
        &self,
        station_id: &str,
        fingerprint: &Fingerprint,
    ) -> Result<bool, StoreError> {
        let (station_id, fingerprint) = (station_id.to_owned(), fingerprint.clone());
        self.write_with(move |tx| {
            let n = tx
                .prepare_cached("DELETE FROM grants WHERE station_id = ?1 AND token_fp = ?2")?
                .execute(params![station_id, fingerprint.as_str()])?;
            Ok(n > 0)
        })
        .await
    }

    async fn list_grants(&self) -> Result<Vec<StoredGrant>, StoreError> {
        self.read(|conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT station_id, token_fp, expires_at_us, blocked FROM grants ORDER BY station_id, token_fp",
            )?;
            let rows = stmt.query_map([], |r| {
                Ok(StoredGrant {
                    station_id: r.get(0)?,
                    fingerprint: Fingerprint::from_stored(r.get(1)?),
                    expires_at: r.get::<_, Option<i64>>(2)?.map(Micros),
                    blocked: r.get(3)?,
                })
            })?;
            rows.collect()
        })
        .await
    }
}
