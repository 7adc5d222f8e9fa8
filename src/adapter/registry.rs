//! Disk and host tiers together: finds an adapter's current version, reads and validates
//! a version once, and keeps validated versions in a byte-budget host cache (moka,
//! LRU-like TinyLFU) keyed by version id. Installs and deletes go through here so that a
//! retired version's host copy is dropped with it. Safe to use from loader threads; the
//! device tier lives with the scheduler.
//!
//! With an object-store registry ([`super::remote`]) the store is the authority and the
//! adapters directory its disk cache: installs and deletes go to the store first, then to
//! the cache, and [`AdapterRegistry::refresh`] (async, before a request resolves a name)
//! brings the cache in line with the store: pulls a content it lacks, drops what the store
//! deleted, and evicts the least recently used cached adapters beyond the disk budget.

use candle_core::DType;
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::format::{load_adapter, AdapterError, AdapterWeights, BaseModel, VersionId};
use super::remote::{Ref, Remote, RemoteError};
use super::stats::{AdapterStats, Tier};
use super::store::{AdapterKey, AdapterStore, Installed, Origin, Staging, Version, ORIGIN_FILE};

/// How a registry-backed cache behaves.
#[derive(Debug, Clone)]
pub struct CacheSettings {
    /// Bytes of the disk cache of registry adapters; 0: no limit.
    pub disk_bytes: u64,
    /// How long a lookup in the store counts as current (0: every request looks up).
    pub lookup_ttl: Duration,
    /// How long the store's answer that a name has no adapter, or only a private one, is
    /// trusted (0: not cached).
    pub miss_ttl: Duration,
}

impl Default for CacheSettings {
    fn default() -> Self {
        Self {
            disk_bytes: 0,
            lookup_ttl: Duration::ZERO,
            miss_ttl: Duration::ZERO,
        }
    }
}

/// What the store last said of a name that gave the asker nothing to pull.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Miss {
    /// No adapter (never one, or deleted).
    Absent,
    /// An adapter that is not public: only its owner (and the admin) may use it.
    Private,
}

/// The object-store side of a registry.
struct Shared {
    remote: Arc<Remote>,
    settings: CacheSettings,
    /// The negative cache: names the store had no usable adapter for, for
    /// `settings.miss_ttl` (bounded: any client may name anything).
    misses: Option<moka::sync::Cache<AdapterKey, Miss>>,
    /// When each name was last found current in the store.
    checked: Mutex<HashMap<AdapterKey, Instant>>,
    /// When each cached name was last asked for (the disk cache's recency).
    used: Mutex<HashMap<AdapterKey, Instant>>,
    /// One lookup or pull of a name at a time.
    gates: Mutex<HashMap<AdapterKey, Arc<tokio::sync::Mutex<()>>>>,
    /// Until when the store counts as down after it failed to answer: names with a cached
    /// version are served from it without asking the store meanwhile.
    down_until: Mutex<Option<Instant>>,
}

/// How long the store counts as down after it failed to answer.
const STORE_BACKOFF: Duration = Duration::from_secs(5);
/// Entries of the look-up times map beyond which the stale ones are dropped.
const CHECKED_PRUNE_AT: usize = 4096;
/// Names the negative cache holds at most.
const MISSES_CAPACITY: u64 = 65_536;

pub struct AdapterRegistry {
    pub store: AdapterStore,
    pub base: Arc<BaseModel>,
    host: moka::sync::Cache<VersionId, Arc<AdapterWeights>>,
    dtype: DType,
    pub stats: Arc<AdapterStats>,
    shared: Option<Shared>,
}

/// Runs blocking work (the adapters directory) off the async workers.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, AdapterError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| AdapterError::Io("registry".into(), std::io::Error::other(e.to_string())))
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
            shared: None,
        }
    }

    /// Makes the object-store registry `remote` the authority and the adapters directory
    /// its cache. Usable without an engine: a training worker opens the registry with
    /// [`AdapterStore::open`], [`BaseModel::open`] and this, then publishes with
    /// [`AdapterRegistry::install`] / [`AdapterRegistry::install_new`].
    pub fn with_remote(mut self, remote: Arc<Remote>, settings: CacheSettings) -> Self {
        let misses = (!settings.miss_ttl.is_zero()).then(|| {
            moka::sync::Cache::builder()
                .max_capacity(MISSES_CAPACITY)
                .time_to_live(settings.miss_ttl)
                .build()
        });
        self.shared = Some(Shared {
            remote,
            misses,
            settings,
            checked: Mutex::new(HashMap::new()),
            used: Mutex::new(HashMap::new()),
            gates: Mutex::new(HashMap::new()),
            down_until: Mutex::new(None),
        });
        self
    }

    /// The registry of a process without an engine (a training worker) that publishes to
    /// the object-store registry under `adapters/` of `shared`: `adapters` is its local
    /// cache and staging area, `model_dir` the base model adapters are checked against
    /// ([`AdapterRegistry::check_servable`], in f32). Publish with
    /// [`AdapterRegistry::install`] (replacing) or [`AdapterRegistry::install_new`] on a
    /// [`AdapterStore::staging`] directory of `self.store`, from a thread outside async
    /// code: they block until the store has the adapter.
    pub fn open_publisher(
        adapters: &std::path::Path,
        model_dir: &std::path::Path,
        shared: &crate::store::Store,
    ) -> Result<Self, AdapterError> {
        let store = AdapterStore::open(adapters)
            .map_err(|e| AdapterError::Io(adapters.display().to_string(), e))?;
        let base = Arc::new(BaseModel::open(model_dir).map_err(AdapterError::Base)?);
        let remote = Remote::open(shared)?;
        Ok(Self::new(
            store,
            base,
            DType::F32,
            0,
            Arc::new(AdapterStats::default()),
        )
        .with_remote(remote, CacheSettings::default()))
    }

    /// Forgets what the store said of `key` (it was just installed or deleted here).
    fn unmiss(&self, key: &AdapterKey) {
        if let Some(m) = self.shared.as_ref().and_then(|sh| sh.misses.as_ref()) {
            m.invalidate(key);
        }
    }

    /// Requests this registry has sent to the object store (0 without one).
    pub fn store_requests(&self) -> u64 {
        self.remote().map_or(0, |r| r.requests())
    }

    /// The object-store registry, if there is one.
    pub fn remote(&self) -> Option<&Arc<Remote>> {
        self.shared.as_ref().map(|s| &s.remote)
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
        if let Some(sh) = &self.shared {
            self.store.check_reserved(key)?;
            let r = sh
                .remote
                .publish_blocking(key, &staging.dir(), public, true)?;
            self.unmiss(key);
            return self.install_published(key, staging, &r);
        }
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
        if let Some(sh) = &self.shared {
            self.store.check_reserved(key)?;
            let r = sh
                .remote
                .publish_blocking(key, &staging.dir(), public, false)?;
            self.unmiss(key);
            return self.install_published(key, staging, &r);
        }
        self.store.install_new(key, staging, public)
    }

    /// Deletes `key`'s adapter (see [`AdapterStore::delete`]): from the object-store
    /// registry first where there is one (every replica drops it at its next lookup), then
    /// from this machine. The local version it retired; `None` when only the store had it.
    pub fn delete(&self, key: &AdapterKey) -> Result<Option<Arc<Version>>, AdapterError> {
        let in_store = match &self.shared {
            Some(sh) => match sh.remote.delete_blocking(key) {
                Ok(_) => true,
                Err(RemoteError::NotFound(_)) => false,
                Err(e) => return Err(e.into()),
            },
            None => false,
        };
        if let Some(sh) = &self.shared {
            if let Ok(mut c) = sh.checked.lock() {
                c.remove(key);
            }
        }
        self.unmiss(key);
        match self.store.delete(key) {
            Ok(old) => {
                self.forget(old.id());
                Ok(Some(old))
            }
            Err(AdapterError::NotFound(_)) if in_store => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Installs in the disk cache the content `r` the store has for `key`, unless the cache
    /// already holds that ref or a newer one (then that version is the answer).
    fn install_published(
        &self,
        key: &AdapterKey,
        staging: Staging,
        r: &Ref,
    ) -> Result<Installed, AdapterError> {
        let io = |e: std::io::Error| AdapterError::Io(key.name.clone(), e);
        let origin = Origin {
            hash: r.hash.clone(),
            seq: r.seq,
        };
        let json = serde_json::to_vec(&origin).map_err(|e| io(std::io::Error::other(e)))?;
        crate::util::write_atomic(&staging.dir().join(ORIGIN_FILE), &json).map_err(io)?;
        let newer = |old: Option<&Arc<Version>>| match old.and_then(|v| v.origin()) {
            Some(o) if o.seq >= r.seq => Err(AdapterError::Exists(key.qualified())),
            _ => Ok(()),
        };
        let public = r.public || self.store.policy_public(key);
        match self.store.install_if(key, staging, public, &newer) {
            Ok(done) => {
                if let Some(old) = &done.replaced {
                    self.forget(old.id());
                }
                self.touch(key);
                self.evict_over_budget(key);
                Ok(done)
            }
            Err(AdapterError::Exists(_)) => match self.store.resolve(key) {
                Some(version) => Ok(Installed {
                    version,
                    replaced: None,
                }),
                None => Err(AdapterError::NotFound(key.qualified())),
            },
            Err(e) => Err(e),
        }
    }

    /// Whether the store failed to answer within the last [`STORE_BACKOFF`].
    fn store_down(&self) -> bool {
        self.shared
            .as_ref()
            .and_then(|sh| sh.down_until.lock().ok().and_then(|d| *d))
            .is_some_and(|t| Instant::now() < t)
    }

    fn touch(&self, key: &AdapterKey) {
        if let Some(sh) = &self.shared {
            if let Ok(mut u) = sh.used.lock() {
                u.insert(key.clone(), Instant::now());
            }
        }
    }

    /// Brings the disk cache in line with the object-store registry for `keys` (nothing
    /// without one): pulls a content the cache lacks (a new version), drops a cached
    /// adapter the store deleted. Where the store does not answer, a cached version stays
    /// servable (logged) and a name with none is [`AdapterError::StoreUnavailable`].
    ///
    /// `allow(owner, public)` says whether the asker may use an adapter of tenant `owner`
    /// (`None`: shared) that is `public`; what it may not use is not pulled.
    pub async fn refresh(
        self: &Arc<Self>,
        keys: &[AdapterKey],
        allow: &(dyn Fn(Option<&str>, bool) -> bool + Sync),
    ) -> Result<(), AdapterError> {
        if self.shared.is_none() {
            return Ok(());
        }
        for key in keys {
            self.refresh_one(key, allow).await?;
        }
        Ok(())
    }

    /// Names this registry keeps per-name look-up state for: those being looked up now.
    pub fn names_in_lookup(&self) -> usize {
        self.shared
            .as_ref()
            .and_then(|sh| sh.gates.lock().ok().map(|g| g.len()))
            .unwrap_or(0)
    }

    fn gate(&self, key: &AdapterKey) -> Option<Arc<tokio::sync::Mutex<()>>> {
        let sh = self.shared.as_ref()?;
        let mut g = sh.gates.lock().ok()?;
        Some(g.entry(key.clone()).or_default().clone())
    }

    async fn refresh_one(
        self: &Arc<Self>,
        key: &AdapterKey,
        allow: &(dyn Fn(Option<&str>, bool) -> bool + Sync),
    ) -> Result<(), AdapterError> {
        let Some(sh) = &self.shared else {
            return Ok(());
        };
        let Some(gate) = self.gate(key) else {
            return self.refresh_gated(sh, key, allow).await;
        };
        let turn = gate.lock().await;
        let done = self.refresh_gated(sh, key, allow).await;
        drop(turn);
        // The gate goes with its last user: names asked for once (any client may name
        // anything) leave nothing behind.
        if let Ok(mut g) = sh.gates.lock() {
            if Arc::strong_count(&gate) == 2 {
                g.remove(key);
            }
        }
        done
    }

    /// Notes that `key` was looked up now; entries older than the look-up TTL go when the
    /// map grows, so names asked for once do not accumulate.
    fn mark_checked(sh: &Shared, key: &AdapterKey) {
        let ttl = sh.settings.lookup_ttl;
        if ttl.is_zero() {
            return;
        }
        if let Ok(mut c) = sh.checked.lock() {
            if c.len() >= CHECKED_PRUNE_AT {
                c.retain(|_, t| t.elapsed() < ttl);
            }
            c.insert(key.clone(), Instant::now());
        }
    }

    /// [`Self::refresh_one`] holding the name's gate.
    async fn refresh_gated(
        self: &Arc<Self>,
        sh: &Shared,
        key: &AdapterKey,
        allow: &(dyn Fn(Option<&str>, bool) -> bool + Sync),
    ) -> Result<(), AdapterError> {
        // What the store said of this name moments ago, when that gave nothing to pull: no
        // adapter, or a private one that this asker may not use (decided here, before any
        // request to the store).
        let cached_miss = sh.misses.as_ref().and_then(|m| m.get(key));
        match cached_miss {
            Some(Miss::Absent) => return Ok(()),
            Some(Miss::Private) if !allow(key.tenant.as_deref(), false) => return Ok(()),
            _ => {}
        }
        let ttl = sh.settings.lookup_ttl;
        if !ttl.is_zero()
            && sh
                .checked
                .lock()
                .ok()
                .and_then(|c| c.get(key).copied())
                .is_some_and(|t| t.elapsed() < ttl)
        {
            self.touch(key);
            return Ok(());
        }
        let me = self.clone();
        let k = key.clone();
        let local = blocking(move || me.store.resolve(&k)).await?;
        if self.store_down() && local.is_some() {
            self.touch(key);
            return Ok(());
        }
        let mut attempts = 0;
        loop {
            attempts += 1;
            let k = key.clone();
            let head = sh.remote.run(|r| async move { r.head(&k).await }).await;
            let miss = head
                .as_ref()
                .ok()
                .map(|h| match h.as_ref().filter(|r| !r.deleted) {
                    None => Some(Miss::Absent),
                    Some(r) if !(r.public || self.store.policy_public(key)) => Some(Miss::Private),
                    Some(_) => None,
                });
            let outcome = match head {
                Ok(head) => self.follow(key, local.as_ref(), head, allow).await,
                Err(e) => Err(e),
            };
            if let (Ok(()), Some(miss), Some(misses)) = (&outcome, miss, sh.misses.as_ref()) {
                match miss {
                    Some(m) => misses.insert(key.clone(), m),
                    None => misses.invalidate(key),
                }
            }
            let unavailable = outcome.as_ref().err().is_some_and(|e| e.is_unavailable());
            if let Ok(mut d) = sh.down_until.lock() {
                *d = unavailable.then(|| Instant::now() + STORE_BACKOFF);
            }
            match outcome {
                Ok(()) => {
                    Self::mark_checked(sh, key);
                    return Ok(());
                }
                Err(RemoteError::Vanished(_)) if attempts < 3 => continue,
                Err(e) if e.is_unavailable() && local.is_some() => {
                    tracing::warn!(adapter = %key, "the adapter registry is unavailable; serving the cached version: {e}");
                    return Ok(());
                }
                Err(e) => {
                    if local.is_some() {
                        tracing::warn!(adapter = %key, "refreshing from the adapter registry: {e}; serving the cached version");
                        return Ok(());
                    }
                    return Err(e.into());
                }
            }
        }
    }

    /// Makes the cache of `key` (now `local`) follow the store's `head`.
    async fn follow(
        self: &Arc<Self>,
        key: &AdapterKey,
        local: Option<&Arc<Version>>,
        head: Option<Arc<Ref>>,
        allow: &(dyn Fn(Option<&str>, bool) -> bool + Sync),
    ) -> Result<(), RemoteError> {
        let Some(sh) = &self.shared else {
            return Ok(());
        };
        // The store's last word on the name (none at all: older than anything cached).
        let last = head.as_ref().map_or(u64::MAX, |h| h.seq);
        let live = head.filter(|h| !h.deleted);
        let Some(r) = live else {
            // Gone from the store: drop a cached copy older than the store's last word.
            if let Some(v) = local.filter(|v| v.origin().is_some_and(|o| o.seq < last)) {
                let me = self.clone();
                let (k, id) = (key.clone(), v.id());
                blocking(move || {
                    if let Ok(gone) = me.store.delete_if(&k, &|c| c.id() == id) {
                        me.forget(gone.id());
                        tracing::info!(adapter = %k, version = gone.id(), "deleted in the adapter registry: dropped from this replica");
                    }
                })
                .await
                .map_err(|e| RemoteError::Io(std::io::Error::other(e.to_string())))?;
            }
            return Ok(());
        };
        let public = r.public || self.store.policy_public(key);
        if !allow(key.tenant.as_deref(), public) {
            return Ok(());
        }
        if let Some(v) = local {
            if v.origin().is_some_and(|o| o.hash == r.hash) && v.is_public() == public {
                self.touch(key);
                return Ok(());
            }
        }
        let me = self.clone();
        let staging = blocking(move || me.store.staging())
            .await
            .map_err(|e| RemoteError::Io(std::io::Error::other(e.to_string())))??;
        let started = Instant::now();
        let (rr, dir) = (r.clone(), staging.dir());
        sh.remote
            .run(|rm| async move { rm.fetch(&rr, &dir).await })
            .await?;
        let me = self.clone();
        let (k, rr) = (key.clone(), r.clone());
        let done = blocking(move || {
            me.install_published(&k, staging, &rr)
                .map(|d| d.version.id())
        })
        .await
        .map_err(|e| RemoteError::Io(std::io::Error::other(e.to_string())))?;
        match done {
            Ok(id) => {
                tracing::info!(adapter = %key, version = id, hash = %r.hash, seq = r.seq, bytes = r.size_bytes(), seconds = started.elapsed().as_secs_f64(), "pulled from the adapter registry");
                Ok(())
            }
            Err(e) => Err(RemoteError::Io(std::io::Error::other(e.to_string()))),
        }
    }

    /// Removes the least recently used cached registry adapters that no request holds
    /// until the cache fits its budget (`keep` stays).
    fn evict_over_budget(&self, keep: &AdapterKey) {
        let Some(sh) = &self.shared else { return };
        let budget = sh.settings.disk_bytes;
        if budget == 0 {
            return;
        }
        let mut cached: Vec<Arc<Version>> = self
            .store
            .list()
            .into_iter()
            .filter(|v| v.origin().is_some())
            .collect();
        let mut total: u64 = cached.iter().map(|v| v.size_bytes()).sum();
        if total <= budget {
            return;
        }
        let used = sh.used.lock().map(|u| u.clone()).unwrap_or_default();
        cached.sort_by_key(|v| used.get(v.key()).copied());
        for v in cached {
            if total <= budget {
                break;
            }
            // Held by the index and this list only: no request or device slot uses it.
            if v.key() == keep || Arc::strong_count(&v) > 2 {
                continue;
            }
            let id = v.id();
            if let Ok(gone) = self.store.delete_if(v.key(), &|c| c.id() == id) {
                self.forget(gone.id());
                total = total.saturating_sub(gone.size_bytes());
                if let Ok(mut c) = sh.checked.lock() {
                    c.remove(v.key());
                }
                tracing::info!(adapter = %v.key(), version = id, bytes = gone.size_bytes(), "evicted from the disk cache");
            }
        }
    }

    /// The store's current refs (tombstones included), after dropping from the cache what
    /// the store deleted. `Ok(None)` without a registry.
    pub async fn registry_heads(self: &Arc<Self>) -> Result<Option<Vec<Arc<Ref>>>, AdapterError> {
        let Some(sh) = &self.shared else {
            return Ok(None);
        };
        if self.store_down() {
            return Err(AdapterError::StoreUnavailable(format!(
                "{} did not answer moments ago",
                sh.remote.url()
            )));
        }
        let heads = sh.remote.run(|r| async move { r.heads().await }).await;
        if let Ok(mut d) = sh.down_until.lock() {
            let unavailable = heads.as_ref().err().is_some_and(|e| e.is_unavailable());
            *d = unavailable.then(|| Instant::now() + STORE_BACKOFF);
        }
        let heads = heads?;
        let me = self.clone();
        let tombs: Vec<(AdapterKey, u64)> = heads
            .iter()
            .filter(|h| h.deleted)
            .map(|h| (h.key.clone(), h.seq))
            .collect();
        if !tombs.is_empty() {
            blocking(move || {
                for (k, seq) in tombs {
                    let stale = |v: &Arc<Version>| v.origin().is_some_and(|o| o.seq < seq);
                    if let Ok(gone) = me.store.delete_if(&k, &stale) {
                        me.forget(gone.id());
                        tracing::info!(adapter = %k, version = gone.id(), "deleted in the adapter registry: dropped from this replica");
                    }
                }
            })
            .await?;
        }
        Ok(Some(heads))
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
