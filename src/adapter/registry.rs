//! Disk and host tiers together: finds an adapter by name, reads and validates it once, and
//! keeps validated adapters in a byte-budget host cache (moka, LRU-like TinyLFU).
//! Safe to use from loader threads; the device tier lives with the scheduler.

use candle_core::DType;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use super::format::{load_adapter, AdapterError, AdapterWeights, BaseModel};
use super::stats::{AdapterStats, Tier};
use super::store::AdapterStore;

pub struct AdapterRegistry {
    pub store: AdapterStore,
    pub base: Arc<BaseModel>,
    host: moka::sync::Cache<String, Arc<AdapterWeights>>,
    dtype: DType,
    pub stats: Arc<AdapterStats>,
}

impl AdapterRegistry {
    pub fn new(
        store: AdapterStore,
        base: Arc<BaseModel>,
        dtype: DType,
        host_budget_bytes: u64,
        stats: Arc<AdapterStats>,
    ) -> Self {
        let evict_stats = stats.clone();
        let host = moka::sync::Cache::builder()
            // Weigh in KiB so adapters above 4 GiB still fit the u32 weigher.
            .weigher(|_: &String, a: &Arc<AdapterWeights>| (a.bytes / 1024).max(1) as u32)
            .max_capacity((host_budget_bytes / 1024).max(1))
            .eviction_listener(move |_, _, cause| {
                if cause.was_evicted() {
                    evict_stats.host.evictions.fetch_add(1, Ordering::Relaxed);
                }
            })
            .build();
        Self {
            store,
            base,
            host,
            dtype,
            stats,
        }
    }

    /// The adapter in host memory, reading and validating it from disk on a miss.
    pub fn load(&self, name: &str) -> Result<Arc<AdapterWeights>, AdapterError> {
        if let Some(a) = self.host.get(name) {
            self.stats.lookup(Tier::Host, true);
            return Ok(a);
        }
        self.stats.lookup(Tier::Host, false);
        let path = self.store.path(name);
        self.stats.lookup(Tier::Disk, path.is_ok());
        let path = path?;
        let started = Instant::now();
        let loaded = load_adapter(&path, name, &self.base, self.dtype);
        match &loaded {
            Ok(_) => {
                self.stats.disk.loads.fetch_add(1, Ordering::Relaxed);
                self.stats.host.loads.fetch_add(1, Ordering::Relaxed);
                self.stats.record_load(started.elapsed().as_secs_f64());
            }
            Err(_) => {
                self.stats
                    .disk
                    .load_failures
                    .fetch_add(1, Ordering::Relaxed);
            }
        }
        let a = Arc::new(loaded?);
        self.host.insert(name.to_string(), a.clone());
        self.publish();
        Ok(a)
    }

    /// Drops an adapter from host memory (after a delete or re-upload).
    pub fn forget(&self, name: &str) {
        self.host.invalidate(name);
        self.publish();
    }

    pub fn in_host(&self, name: &str) -> bool {
        self.host.contains_key(name)
    }

    fn publish(&self) {
        self.host.run_pending_tasks();
        let h = &self.stats.host;
        h.resident.store(self.host.entry_count(), Ordering::Relaxed);
        h.resident_bytes
            .store(self.host.weighted_size() * 1024, Ordering::Relaxed);
    }
}
