//! Disk and host tiers together: finds an adapter's current version, reads and validates
//! a version once, and keeps validated versions in a byte-budget host cache (moka,
//! LRU-like TinyLFU) keyed by version id. Installs and deletes go through here so that a
//! retired version's host copy is dropped with it. Safe to use from loader threads; the
//! device tier lives with the scheduler.

use candle_core::DType;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use super::format::{load_adapter, AdapterError, AdapterWeights, BaseModel, VersionId};
use super::stats::{AdapterStats, Tier};
use super::store::{AdapterKey, AdapterStore, Installed, Staging, Version};

pub struct AdapterRegistry {
    pub store: AdapterStore,
    pub base: Arc<BaseModel>,
    host: moka::sync::Cache<VersionId, Arc<AdapterWeights>>,
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
            .weigher(|_: &VersionId, a: &Arc<AdapterWeights>| (a.bytes / 1024).max(1) as u32)
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

    /// The dtype adapters are held in.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The current version of the first of `keys` that has one (a disk-tier lookup).
    pub fn resolve(&self, keys: &[AdapterKey]) -> Option<Arc<Version>> {
        let v = self.store.resolve_first(keys);
        self.stats.lookup(Tier::Disk, v.is_some());
        v
    }

    /// The version in host memory, reading and validating it from disk on a miss.
    pub fn load(&self, v: &Version) -> Result<Arc<AdapterWeights>, AdapterError> {
        if let Some(a) = self.host.get(&v.id()) {
            self.stats.lookup(Tier::Host, true);
            return Ok(a);
        }
        self.stats.lookup(Tier::Host, false);
        let started = Instant::now();
        let loaded = v
            .read(|dir| load_adapter(dir, v.name(), &self.base, self.dtype))
            .and_then(|r| r);
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
        let mut w = loaded?;
        w.version = v.id();
        let a = Arc::new(w);
        // A version retired while it loaded is not cached: nobody new can ask for it.
        if !v.is_retired() {
            self.host.insert(v.id(), a.clone());
        }
        self.publish();
        Ok(a)
    }

    /// Everything serving an adapter would check, before it is installed: the adapter in
    /// `dir` is read and validated against the base as `name`, replaces no non-expert
    /// module (those cannot be applied per request) and fits `slot_budget` bytes of
    /// expert slots. The error says what is wrong in words a client may see.
    pub fn check_servable(
        &self,
        dir: &std::path::Path,
        name: &str,
        slot_budget: usize,
    ) -> Result<(), String> {
        let w = load_adapter(dir, name, &self.base, self.dtype).map_err(|e| e.to_string())?;
        if !w.others.is_empty() {
            return Err(format!(
                "adapter {name} replaces non-expert modules, which cannot be served per request; merge it with `esft-train merge`"
            ));
        }
        if w.slot_bytes() > slot_budget {
            return Err(format!(
                "adapter {name} needs {} bytes of expert slots; the server's budget is {slot_budget}",
                w.slot_bytes()
            ));
        }
        Ok(())
    }

    /// Installs a staged adapter as `key`'s current version (see [`AdapterStore::install`]).
    pub fn install(
        &self,
        key: &AdapterKey,
        staging: Staging,
        public: bool,
    ) -> Result<Installed, AdapterError> {
        let done = self.store.install(key, staging, public)?;
        if let Some(old) = &done.replaced {
            self.forget(old.id());
        }
        Ok(done)
    }

    /// Installs a staged adapter as `key`'s first version, refused when it has one (see
    /// [`AdapterStore::install_new`]).
    pub fn install_new(
        &self,
        key: &AdapterKey,
        staging: Staging,
        public: bool,
    ) -> Result<Installed, AdapterError> {
        self.store.install_new(key, staging, public)
    }

    /// Deletes `key`'s adapter (see [`AdapterStore::delete`]).
    pub fn delete(&self, key: &AdapterKey) -> Result<Arc<Version>, AdapterError> {
        let old = self.store.delete(key)?;
        self.forget(old.id());
        Ok(old)
    }

    /// Drops a version from host memory.
    pub fn forget(&self, id: VersionId) {
        self.host.invalidate(&id);
        self.publish();
    }

    pub fn in_host(&self, id: VersionId) -> bool {
        self.host.contains_key(&id)
    }

    fn publish(&self) {
        self.host.run_pending_tasks();
        let h = &self.stats.host;
        h.resident.store(self.host.entry_count(), Ordering::Relaxed);
        h.resident_bytes
            .store(self.host.weighted_size() * 1024, Ordering::Relaxed);
    }
}
