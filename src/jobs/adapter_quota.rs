//! Tenants' adapter quotas: how many adapters a tenant keeps and how many bytes they take,
//! held in the `adapter_usage` ledger of the records database so that every process
//! sharing the database (replicas, training workers) checks against the same numbers.
//!
//! Owns that table and nothing else: the adapters themselves live in the adapter store
//! (the adapters directory, or the object-store registry), which this module never reads;
//! its callers tell it what they install and delete, and what the store holds at start
//! ([`AdapterQuota::reconcile`]).
//!
//! One row per tenant adapter name: `bytes`, the installed adapter's size (NULL while only
//! a reservation exists), and at most one reservation in flight (`pending_bytes`,
//! `pending_token`, `pending_until`). An install goes:
//!
//! 1. [`AdapterQuota::reserve`]: in one transaction under the owner's lock
//!    ([`db::lock_owner`], shared with the file and job quotas), the owner's other names
//!    are counted and summed (the name being replaced is left out: a replacement replaces
//!    its usage), the new adapter is refused when it would pass either limit, else its
//!    reservation is written into the name's row. So installs racing through any number of
//!    processes never pass a limit together.
//! 2. the install itself (the caller's);
//! 3. [`AdapterReservation::settle`] (installed: `bytes` becomes the new size) or
//!    [`AdapterReservation::cancel`] (failed: the reservation goes, an adapter the name
//!    already had keeps its row untouched; dropping an unsettled reservation cancels it).
//!
//! A row counts while it has an installed adapter or a reservation that has not lapsed; a
//! reservation lapses [`RESERVATION_SECONDS`] after it was made, so a process killed
//! between reserve and settle holds nothing for long (a replaced adapter's old size still
//! counts meanwhile: `bytes` was never overwritten). What such a crash can leave wrong for
//! longer (an install done but never settled, a delete done but never released) is
//! corrected by [`AdapterQuota::reconcile`], which each server runs when it opens the
//! ledger, against what its adapter store holds; that also counts adapters installed
//! before the ledger existed. Adapters in the shared namespace (the admin's, shipped ones)
//! belong to no tenant and count against no quota.

use rand::distr::{Alphanumeric, SampleString};
use sqlx::Row;
use std::collections::{BTreeMap, HashMap};

use super::db::{self, now, now_ms, Pool};

/// How long a reservation holds when its process never settles or cancels it (it died).
pub const RESERVATION_SECONDS: i64 = 3600;

/// One tenant's limits; 0 is no limit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AdapterLimit {
    /// Adapters the tenant may keep.
    pub max_adapters: u64,
    /// Bytes of adapter files the tenant may keep.
    pub max_bytes: u64,
}

/// Every tenant's limits: a default and per-tenant overrides.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AdapterLimits {
    pub default: AdapterLimit,
    pub tenants: HashMap<String, AdapterLimit>,
}

impl AdapterLimits {
    /// The limits of `tenant`.
    pub fn of(&self, tenant: &str) -> AdapterLimit {
        self.tenants.get(tenant).copied().unwrap_or(self.default)
    }
}

/// Why an install was refused, or could not be checked.
#[derive(Debug, thiserror::Error)]
pub enum QuotaError {
    #[error(
        "tenant {tenant} keeps {used} adapters, the most max_adapters_per_tenant allows ({limit}): \
         delete one, or replace one under its name"
    )]
    Count {
        tenant: String,
        used: u64,
        limit: u64,
    },
    #[error(
        "an adapter of {size} bytes would take tenant {tenant} past max_adapter_bytes_per_tenant \
         ({limit} bytes; {used} in use by its other adapters)"
    )]
    Bytes {
        tenant: String,
        used: u64,
        size: u64,
        limit: u64,
    },
    #[error("{0}")]
    Db(#[from] sqlx::Error),
}

/// What an owner's adapters take, as the ledger counts them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub adapters: u64,
    pub bytes: u64,
}

/// The ledger of tenants' adapters in the records database. Cheap to clone.
#[derive(Clone)]
pub struct AdapterQuota {
    pool: Pool,
    limits: std::sync::Arc<AdapterLimits>,
}

fn int(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

fn uint(n: i64) -> u64 {
    u64::try_from(n).unwrap_or(0)
}

impl AdapterQuota {
    /// The ledger in `pool` (its table is made by [`db::open`]), checking `limits`.
    pub fn new(pool: Pool, limits: AdapterLimits) -> Self {
        Self {
            pool,
            limits: std::sync::Arc::new(limits),
        }
    }

    pub fn limits(&self) -> &AdapterLimits {
        &self.limits
    }

    /// What `tenant`'s adapters take, leaving out `except` (a name about to be replaced).
    async fn usage_in(
        tx: &mut sqlx::Transaction<'_, db::Db>,
        tenant: &str,
        except: Option<&str>,
    ) -> Result<Usage, sqlx::Error> {
        let row = sqlx::query(
            "SELECT CAST(COUNT(*) AS BIGINT) AS n, CAST(COALESCE(SUM(CASE \
             WHEN pending_until > $2 AND pending_bytes > COALESCE(bytes, 0) THEN pending_bytes \
             ELSE COALESCE(bytes, 0) END), 0) AS BIGINT) AS b \
             FROM adapter_usage WHERE owner = $1 AND name <> $3 \
             AND (bytes IS NOT NULL OR pending_until > $2)",
        )
        .bind(tenant)
        .bind(now())
        .bind(except.unwrap_or(""))
        .fetch_one(&mut **tx)
        .await?;
        Ok(Usage {
            adapters: uint(row.try_get("n")?),
            bytes: uint(row.try_get("b")?),
        })
    }

    /// What `tenant`'s adapters (installed, and reserved by installs in flight) take.
    pub async fn usage(&self, tenant: &str) -> Result<Usage, sqlx::Error> {
        let mut tx = self.pool.begin().await?;
        let u = Self::usage_in(&mut tx, tenant, None).await?;
        tx.commit().await?;
        Ok(u)
    }

    /// Reserves room for the adapter `name` of `owner` (`None`: a shared adapter, which
    /// counts against no quota and reserves nothing), `bytes` large, replacing the one of
    /// that name if there is one: refused when the owner's other adapters and this one
    /// would pass `max_adapters` or `max_bytes`. Checked and written in one transaction
    /// under the owner's lock. Settle the reservation once installed; a failed install
    /// cancels it (or drops it).
    pub async fn reserve(
        &self,
        owner: Option<&str>,
        name: &str,
        bytes: u64,
    ) -> Result<AdapterReservation, QuotaError> {
        let Some(tenant) = owner else {
            return Ok(AdapterReservation::none());
        };
        let limit = self.limits.of(tenant);
        let mut tx = self.pool.begin().await?;
        db::lock_owner(&mut tx, Some(tenant)).await?;
        // Reservations of dead processes that never installed anything go.
        sqlx::query(
            "DELETE FROM adapter_usage WHERE owner = $1 AND bytes IS NULL AND pending_until <= $2",
        )
        .bind(tenant)
        .bind(now())
        .execute(&mut *tx)
        .await?;
        let used = Self::usage_in(&mut tx, tenant, Some(name)).await?;
        if limit.max_adapters > 0 && used.adapters >= limit.max_adapters {
            return Err(QuotaError::Count {
                tenant: tenant.to_string(),
                used: used.adapters,
                limit: limit.max_adapters,
            });
        }
        if limit.max_bytes > 0 && used.bytes.saturating_add(bytes) > limit.max_bytes {
            return Err(QuotaError::Bytes {
                tenant: tenant.to_string(),
                used: used.bytes,
                size: bytes,
                limit: limit.max_bytes,
            });
        }
        let token = Alphanumeric.sample_string(&mut rand::rng(), 24);
        sqlx::query(
            "INSERT INTO adapter_usage \
             (owner, name, bytes, pending_bytes, pending_token, pending_until, updated_at) \
             VALUES ($1, $2, NULL, $3, $4, $5, $6) \
             ON CONFLICT (owner, name) DO UPDATE SET pending_bytes = $3, pending_token = $4, \
             pending_until = $5, updated_at = $6",
        )
        .bind(tenant)
        .bind(name)
        .bind(int(bytes))
        .bind(&token)
        .bind(now() + RESERVATION_SECONDS)
        .bind(now_ms())
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(AdapterReservation {
            held: Some(Held {
                pool: self.pool.clone(),
                owner: tenant.to_string(),
                name: name.to_string(),
                token,
                bytes,
            }),
        })
    }

    /// The adapter `name` of `owner` was deleted: it counts no more (a reservation of an
    /// install of that name in flight still does). Nothing for a shared adapter.
    pub async fn release(&self, owner: Option<&str>, name: &str) -> Result<(), sqlx::Error> {
        let Some(tenant) = owner else {
            return Ok(());
        };
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "UPDATE adapter_usage SET bytes = NULL, updated_at = $3 WHERE owner = $1 AND name = $2",
        )
        .bind(tenant)
        .bind(name)
        .bind(now_ms())
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "DELETE FROM adapter_usage WHERE owner = $1 AND name = $2 \
             AND (pending_until IS NULL OR pending_until <= $3)",
        )
        .bind(tenant)
        .bind(name)
        .bind(now())
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Brings the ledger in line with what the adapter store holds: `present` is every
    /// tenant adapter there, `(tenant, name, bytes)`, as listed from the store starting at
    /// `listed_at` (Unix milliseconds, taken before the listing began). Rows written since
    /// then (installs and deletes that raced the listing) are left as they are; older
    /// ones take the listed size, or lose their installed size when the name is not
    /// listed; names listed without a row gain one. Adapters installed before the ledger
    /// existed are counted from then on. Each owner's rows change under its lock.
    pub async fn reconcile(
        &self,
        present: &[(String, String, u64)],
        listed_at: i64,
    ) -> Result<(), sqlx::Error> {
        let mut by_owner: BTreeMap<String, BTreeMap<String, u64>> = BTreeMap::new();
        for (t, n, b) in present {
            by_owner.entry(t.clone()).or_default().insert(n.clone(), *b);
        }
        for row in sqlx::query("SELECT DISTINCT owner FROM adapter_usage")
            .fetch_all(&self.pool)
            .await?
        {
            by_owner.entry(row.try_get("owner")?).or_default();
        }
        for (owner, names) in by_owner {
            let mut tx = self.pool.begin().await?;
            db::lock_owner(&mut tx, Some(&owner)).await?;
            let rows =
                sqlx::query("SELECT name FROM adapter_usage WHERE owner = $1 AND updated_at < $2")
                    .bind(&owner)
                    .bind(listed_at)
                    .fetch_all(&mut *tx)
                    .await?;
            for row in rows {
                let name: String = row.try_get("name")?;
                sqlx::query("UPDATE adapter_usage SET bytes = $3 WHERE owner = $1 AND name = $2")
                    .bind(&owner)
                    .bind(&name)
                    .bind(names.get(&name).map(|b| int(*b)))
                    .execute(&mut *tx)
                    .await?;
            }
            for (name, bytes) in &names {
                sqlx::query(
                    "INSERT INTO adapter_usage (owner, name, bytes, updated_at) \
                     VALUES ($1, $2, $3, $4) ON CONFLICT (owner, name) DO NOTHING",
                )
                .bind(&owner)
                .bind(name)
                .bind(int(*bytes))
                .bind(now_ms())
                .execute(&mut *tx)
                .await?;
            }
            sqlx::query(
                "DELETE FROM adapter_usage WHERE owner = $1 AND bytes IS NULL \
                 AND (pending_until IS NULL OR pending_until <= $2)",
            )
            .bind(&owner)
            .bind(now())
            .execute(&mut *tx)
            .await?;
            tx.commit().await?;
        }
        Ok(())
    }
}

struct Held {
    pool: Pool,
    owner: String,
    name: String,
    token: String,
    bytes: u64,
}

/// Room held in a tenant's adapter quota for an install in flight
/// ([`AdapterQuota::reserve`]). Settle it once the adapter is installed; dropped (or
/// cancelled) unsettled, it is given back and the name's earlier adapter, if any, counts as
/// before.
#[must_use = "settle the reservation once the adapter is installed"]
pub struct AdapterReservation {
    held: Option<Held>,
}

impl AdapterReservation {
    /// A reservation of nothing (a shared adapter).
    pub fn none() -> Self {
        Self { held: None }
    }

    /// The adapter is installed: it counts with its size from now on.
    pub async fn settle(mut self) -> Result<(), sqlx::Error> {
        let Some(h) = self.held.take() else {
            return Ok(());
        };
        sqlx::query(
            "UPDATE adapter_usage SET bytes = $3, updated_at = $5, \
             pending_bytes = CASE WHEN pending_token = $4 THEN NULL ELSE pending_bytes END, \
             pending_until = CASE WHEN pending_token = $4 THEN NULL ELSE pending_until END, \
             pending_token = CASE WHEN pending_token = $4 THEN NULL ELSE pending_token END \
             WHERE owner = $1 AND name = $2",
        )
        .bind(&h.owner)
        .bind(&h.name)
        .bind(int(h.bytes))
        .bind(&h.token)
        .bind(now_ms())
        .execute(&h.pool)
        .await?;
        Ok(())
    }

    /// The install failed: the reservation goes (an adapter the name had counts as before).
    pub async fn cancel(mut self) -> Result<(), sqlx::Error> {
        match self.held.take() {
            Some(h) => cancel(&h).await,
            None => Ok(()),
        }
    }

    /// [`Self::settle`] from a thread outside async code (blocking it), on `rt`.
    pub fn settle_blocking(self, rt: &tokio::runtime::Handle) -> Result<(), sqlx::Error> {
        rt.block_on(self.settle())
    }
}

async fn cancel(h: &Held) -> Result<(), sqlx::Error> {
    let mut tx = h.pool.begin().await?;
    sqlx::query(
        "UPDATE adapter_usage SET pending_bytes = NULL, pending_token = NULL, \
         pending_until = NULL, updated_at = $4 \
         WHERE owner = $1 AND name = $2 AND pending_token = $3",
    )
    .bind(&h.owner)
    .bind(&h.name)
    .bind(&h.token)
    .bind(now_ms())
    .execute(&mut *tx)
    .await?;
    sqlx::query(
        "DELETE FROM adapter_usage WHERE owner = $1 AND name = $2 AND bytes IS NULL \
         AND pending_token IS NULL",
    )
    .bind(&h.owner)
    .bind(&h.name)
    .execute(&mut *tx)
    .await?;
    tx.commit().await
}

impl Drop for AdapterReservation {
    fn drop(&mut self) {
        let Some(h) = self.held.take() else {
            return;
        };
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                if let Err(e) = cancel(&h).await {
                    tracing::warn!(
                        "giving back an adapter install's quota reservation: {e}; it lapses in an hour"
                    );
                }
            });
        }
    }
}
