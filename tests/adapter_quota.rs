//! Tenants' adapter quotas in the records database (`esft::jobs::adapter_quota`), each
//! test body run on SQLite and on a throwaway PostgreSQL: installs racing through two
//! processes (two pools of their own) never pass a limit together; a replacement replaces
//! its name's usage; a reservation counts while its install is in flight and is given back
//! when the install fails, when it is dropped, or when its process died (it lapses); a
//! delete releases its name; and the ledger is reconciled with what the store holds.

#[path = "common/postgres.rs"]
mod postgres;

use esft::jobs::adapter_quota::{
    AdapterLimit, AdapterLimits, AdapterQuota, AdapterReservation, QuotaError, Usage,
};
use esft::jobs::db;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

struct Backend {
    name: &'static str,
    database: String,
    data_dir: tempfile::TempDir,
    _db: postgres::TestDatabase,
}

fn backends() -> Vec<Backend> {
    postgres::databases()
        .into_iter()
        .map(|db| Backend {
            name: db.name,
            database: db.url.clone(),
            data_dir: tempfile::tempdir().unwrap(),
            _db: db,
        })
        .collect()
}

fn limits() -> AdapterLimits {
    AdapterLimits {
        // acme: 10 adapters, any size; globex: 1000 bytes, any number.
        default: AdapterLimit {
            max_adapters: 10,
            max_bytes: 0,
        },
        tenants: HashMap::from([(
            "globex".to_string(),
            AdapterLimit {
                max_adapters: 0,
                max_bytes: 1000,
            },
        )]),
    }
}

impl Backend {
    /// The ledger through a pool of its own, as another process would have it.
    async fn quota(&self) -> AdapterQuota {
        let pool = db::open(self.data_dir.path(), &self.database)
            .await
            .unwrap_or_else(|e| panic!("{}: {e}", self.name));
        AdapterQuota::new(pool, limits())
    }
}

/// Races `n` installs of distinct names of `tenant`, `bytes` each, through the ledgers in
/// turn (each settling at once): how many got through.
async fn race(quotas: &[Arc<AdapterQuota>], tenant: &str, n: usize, bytes: u64) -> usize {
    let tasks: Vec<_> = (0..n)
        .map(|i| {
            let q = quotas[i % quotas.len()].clone();
            let tenant = tenant.to_string();
            tokio::spawn(async move {
                let held = q.reserve(Some(&tenant), &format!("a{i}"), bytes).await?;
                held.settle().await?;
                Ok::<(), QuotaError>(())
            })
        })
        .collect();
    let mut kept = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(()) => kept += 1,
            Err(QuotaError::Count { .. } | QuotaError::Bytes { .. }) => {}
            Err(e) => panic!("{e}"),
        }
    }
    kept
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn adapter_quotas_hold_when_processes_race() {
    for b in backends() {
        let quotas = [Arc::new(b.quota().await), Arc::new(b.quota().await)];
        // By count.
        assert_eq!(
            race(&quotas, "acme", 24, 7).await,
            10,
            "{}: acme's adapters past the limit",
            b.name
        );
        assert_eq!(
            quotas[0].usage("acme").await.unwrap(),
            Usage {
                adapters: 10,
                bytes: 70
            }
        );
        // By bytes (an override of the default).
        assert_eq!(
            race(&quotas, "globex", 24, 100).await,
            10,
            "{}: globex's bytes past the limit",
            b.name
        );
        assert_eq!(quotas[1].usage("globex").await.unwrap().bytes, 1000);
        // Another tenant is not held back by them, and shared adapters count nowhere.
        let other = quotas[0].reserve(Some("initech"), "x", 5).await.unwrap();
        other.settle().await.unwrap();
        quotas[0]
            .reserve(None, "shared", u64::MAX)
            .await
            .unwrap()
            .settle()
            .await
            .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replacements_reservations_deletes_and_reconciliation() {
    for b in backends() {
        let name = b.name;
        let q = b.quota().await;
        let q2 = b.quota().await;
        for i in 0..10 {
            q.reserve(Some("acme"), &format!("a{i}"), 10)
                .await
                .unwrap()
                .settle()
                .await
                .unwrap();
        }
        // Full: a new name is refused, naming the limit; replacing one goes through and
        // replaces its usage.
        let refused = q.reserve(Some("acme"), "new", 1).await.err();
        assert!(
            matches!(
                &refused,
                Some(QuotaError::Count {
                    used: 10,
                    limit: 10,
                    ..
                })
            ),
            "{name}: {refused:?}"
        );
        assert!(refused
            .map(|e| e.to_string())
            .unwrap_or_default()
            .contains("max_adapters_per_tenant"));
        q2.reserve(Some("acme"), "a3", 50)
            .await
            .unwrap()
            .settle()
            .await
            .unwrap();
        assert_eq!(
            q.usage("acme").await.unwrap(),
            Usage {
                adapters: 10,
                bytes: 140
            },
            "{name}"
        );

        // globex (1000 bytes): a reservation in flight holds its bytes; cancelled, they are
        // free again, and a replaced adapter's old size counted all along.
        let held = q.reserve(Some("globex"), "big", 900).await.unwrap();
        assert!(matches!(
            q2.reserve(Some("globex"), "other", 200).await,
            Err(QuotaError::Bytes { used: 900, .. })
        ));
        held.cancel().await.unwrap();
        q2.reserve(Some("globex"), "other", 200)
            .await
            .unwrap()
            .settle()
            .await
            .unwrap();
        // Replacing `other` by something larger: while in flight the larger counts.
        let growing = q.reserve(Some("globex"), "other", 700).await.unwrap();
        assert_eq!(q.usage("globex").await.unwrap().bytes, 700, "{name}");
        // The install fails (dropped unsettled): `other` counts its old size again.
        drop(growing);
        let mut back = false;
        for _ in 0..100 {
            if q.usage("globex").await.unwrap().bytes == 200 {
                back = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(back, "{name}: a dropped reservation was not given back");

        // A process killed between reserve and settle: its reservation lapses.
        let orphan = q.reserve(Some("globex"), "orphan", 800).await.unwrap();
        assert!(q2.reserve(Some("globex"), "x", 100).await.is_err());
        std::mem::forget(orphan);
        sqlx::query("UPDATE adapter_usage SET pending_until = $1 WHERE name = 'orphan'")
            .bind(db::now() - 1)
            .execute(&db::open(b.data_dir.path(), &b.database).await.unwrap())
            .await
            .unwrap();
        q2.reserve(Some("globex"), "x", 100)
            .await
            .unwrap()
            .settle()
            .await
            .unwrap();
        assert_eq!(
            q.usage("globex").await.unwrap(),
            Usage {
                adapters: 2,
                bytes: 300
            },
            "{name}"
        );

        // A delete releases the name.
        q.release(Some("acme"), "a3").await.unwrap();
        q.reserve(Some("acme"), "new", 1)
            .await
            .unwrap()
            .settle()
            .await
            .unwrap();
        assert!(q.reserve(Some("acme"), "newer", 1).await.is_err());

        // Reconciled with what the store holds: a name it lacks goes, sizes follow the
        // store, adapters the ledger never saw count, rows written after the listing began
        // stay as they are, and an install in flight keeps its reservation.
        let in_flight = q.reserve(Some("globex"), "coming", 100).await.unwrap();
        let listed_at = db::now_ms();
        tokio::time::sleep(Duration::from_millis(5)).await;
        let late: AdapterReservation = q.reserve(Some("initech"), "late", 5).await.unwrap();
        late.settle().await.unwrap();
        let present = vec![
            ("acme".to_string(), "a0".to_string(), 10),
            ("acme".to_string(), "a1".to_string(), 30),
            ("globex".to_string(), "other".to_string(), 200),
            ("hooli".to_string(), "shipped".to_string(), 4096),
        ];
        q.reconcile(&present, listed_at).await.unwrap();
        assert_eq!(
            q.usage("acme").await.unwrap(),
            Usage {
                adapters: 2,
                bytes: 40
            },
            "{name}"
        );
        assert_eq!(
            q.usage("globex").await.unwrap(),
            Usage {
                adapters: 2,
                bytes: 300
            },
            "{name}: the install in flight counts"
        );
        assert_eq!(q.usage("hooli").await.unwrap().bytes, 4096);
        assert_eq!(q.usage("initech").await.unwrap().adapters, 1);
        in_flight.settle().await.unwrap();
        assert_eq!(q.usage("globex").await.unwrap().bytes, 300);
    }
}
