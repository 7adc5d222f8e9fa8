//! The disk tier, and the one authority on which version of an adapter a name means.
//!
//! Namespaces: `ROOT/NAME/` is adapter `NAME` of the shared namespace (admin-managed);
//! `ROOT/@TENANT/NAME/` is tenant `TENANT`'s adapter `NAME`. Two tenants may each have an
//! adapter `x`; an adapter is addressed as `x` or `TENANT/x` (see [`AdapterKey`]). A shared
//! directory whose name the configuration reserves for a tenant, or whose `access.json`
//! names an owner, belongs to that tenant's namespace (the layout before namespaces).
//!
//! Every adapter the store knows is a [`Version`]: one set of files with an id no other
//! version in this process has. Caches (host copies, device slots) are keyed by that id and
//! requests hold the `Arc<Version>` they were bound to when the server accepted them.
//! Install, replace and delete are serialised and are each one step as readers see it
//! (replacement swaps the directories with one `renameat2(RENAME_EXCHANGE)` where the
//! platform has it): once it returns, no lookup finds the old version. The old version's
//! files move into a `.retired-*` directory and are removed when its last holder lets go;
//! a loader reading them while they move retries at their new place ([`Version::read`]).
//! A directory replaced behind the store's back (by hand, or by `esft-train` writing into
//! the adapters directory) is noticed by its inode: the next scan makes it a new version and
//! a load of the old one fails instead of reading the new files under the old id.

use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use super::format::{
    next_version_id, validate_name, AdapterError, ExpertConfig, Manifest, VersionId, MANIFEST_FILE,
    REFERENCE_CONFIG_FILE,
};

/// Written into an adapter's directory by the server: who owns it and whether every tenant
/// may use it.
pub const ACCESS_FILE: &str = "access.json";
/// Staging directories of uploads (inside the adapters directory: same filesystem).
const STAGING_PREFIX: &str = ".upload-";
/// Retired versions' files, removed when the last request using them ends.
const RETIRED_PREFIX: &str = ".retired-";
/// Written into a staging directory just before its adapter is moved into place: a restart
/// finds the intended name there if the process died between the two renames.
const COMMIT_FILE: &str = "commit.json";
/// Namespace directories of tenants start with this character, which adapter names cannot.
const TENANT_DIR_PREFIX: char = '@';
/// Written into the directory of an adapter pulled from (or published to) the object-store
/// registry: which of its versions the files are (see [`Origin`]).
pub const ORIGIN_FILE: &str = "origin.json";

/// Where a cached adapter's files came from: the registry's content hash and ref sequence
/// number. A version with an origin is a cache entry of the registry; one without is
/// local to this machine.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Origin {
    /// SHA-256 over the adapter's files (see [`super::remote`]).
    pub hash: String,
    /// The registry ref that named this content.
    pub seq: u64,
}

/// An adapter's place in the namespaces: a tenant's, or the shared one (`tenant: None`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct AdapterKey {
    pub tenant: Option<String>,
    pub name: String,
}

impl AdapterKey {
    pub fn shared(name: &str) -> Self {
        Self {
            tenant: None,
            name: name.to_string(),
        }
    }

    pub fn of_tenant(tenant: &str, name: &str) -> Self {
        Self {
            tenant: Some(tenant.to_string()),
            name: name.to_string(),
        }
    }

    /// Parses `NAME` (shared) or `TENANT/NAME`; both parts must be valid names.
    pub fn parse(s: &str) -> Result<Self, AdapterError> {
        match s.split_once('/') {
            Some((t, n)) => {
                validate_name(t)?;
                validate_name(n)?;
                Ok(Self::of_tenant(t, n))
            }
            None => {
                validate_name(s)?;
                Ok(Self::shared(s))
            }
        }
    }

    /// `NAME` or `TENANT/NAME`.
    pub fn qualified(&self) -> String {
        match &self.tenant {
            Some(t) => format!("{t}/{}", self.name),
            None => self.name.clone(),
        }
    }
}

impl std::fmt::Display for AdapterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.qualified())
    }
}

/// `access.json`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Access {
    #[serde(default)]
    pub owner: Option<String>,
    #[serde(default)]
    pub public: bool,
}

/// What the store reads of an adapter's directory when it first sees it.
#[derive(Debug, Clone)]
pub struct Description {
    /// `esft` (ours) or `reference` (the ESFT release layout).
    pub layout: &'static str,
    /// `adapter.json` or `expert_cfg.json` as stored.
    pub manifest: serde_json::Value,
    pub expert_config: ExpertConfig,
}

struct Location {
    dir: PathBuf,
    /// The `.retired-*` directory to remove when the version is dropped.
    trash: Option<PathBuf>,
}

/// One version of an adapter: its files, wherever they are now.
pub struct Version {
    id: VersionId,
    key: AdapterKey,
    public: bool,
    installed_at: u64,
    size_bytes: u64,
    description: Result<Description, String>,
    location: Mutex<Location>,
    /// Odd while the files are being moved; bumped twice per move (a sequence lock).
    moves: AtomicU64,
    retired: AtomicBool,
    /// (device, inode) of the directory when the store first saw it.
    inode: Option<(u64, u64)>,
    /// The registry content this version is, fixed when the store first saw it.
    origin: Option<Origin>,
}

impl std::fmt::Debug for Version {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Version")
            .field("id", &self.id)
            .field("key", &self.key)
            .field("retired", &self.is_retired())
            .finish()
    }
}

impl Version {
    fn new(key: AdapterKey, dir: PathBuf, public: bool) -> Self {
        let description = describe_dir(&dir);
        Self {
            id: next_version_id(),
            public,
            installed_at: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            size_bytes: dir_bytes(&dir),
            description,
            inode: inode(&dir),
            origin: std::fs::read(dir.join(ORIGIN_FILE))
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok()),
            location: Mutex::new(Location { dir, trash: None }),
            moves: AtomicU64::new(0),
            retired: AtomicBool::new(false),
            key,
        }
    }

    pub fn id(&self) -> VersionId {
        self.id
    }

    pub fn key(&self) -> &AdapterKey {
        &self.key
    }

    /// The adapter's name within its namespace.
    pub fn name(&self) -> &str {
        &self.key.name
    }

    pub fn tenant(&self) -> Option<&str> {
        self.key.tenant.as_deref()
    }

    pub fn qualified(&self) -> String {
        self.key.qualified()
    }

    pub fn is_public(&self) -> bool {
        self.public
    }

    /// Replaced or deleted: no new request can reach it.
    pub fn is_retired(&self) -> bool {
        self.retired.load(Ordering::SeqCst)
    }

    /// Seconds since the epoch when the store installed or first saw it.
    pub fn installed_at(&self) -> u64 {
        self.installed_at
    }

    /// The registry content this version holds (`None`: an adapter local to this machine).
    /// Two versions with the same origin hash hold the same bytes.
    pub fn origin(&self) -> Option<&Origin> {
        self.origin.as_ref()
    }

    /// Bytes of its files.
    pub fn size_bytes(&self) -> u64 {
        self.size_bytes
    }

    /// Its manifest and expert config, or why they could not be read.
    pub fn description(&self) -> Result<&Description, &str> {
        self.description.as_ref().map_err(String::as_str)
    }

    /// Calls `f` with the directory holding this version's files, retrying when the store
    /// moved them meanwhile. Fails when the directory was replaced behind the store's back.
    pub fn read<T>(&self, f: impl Fn(&Path) -> T) -> Result<T, AdapterError> {
        let changed = || AdapterError::Invalid {
            name: self.key.name.clone(),
            message: "its files were replaced while it was being read; try again".into(),
        };
        for _ in 0..1000 {
            let before = self.moves.load(Ordering::SeqCst);
            if before % 2 == 1 {
                std::thread::sleep(std::time::Duration::from_millis(1));
                continue;
            }
            let dir = match self.location.lock() {
                Ok(l) => l.dir.clone(),
                Err(_) => return Err(changed()),
            };
            let out = (inode(&dir) == self.inode).then(|| f(&dir));
            let settled = self.moves.load(Ordering::SeqCst) == before;
            match out {
                Some(out) if settled && inode(&dir) == self.inode => return Ok(out),
                // Moved meanwhile: read again at the new place.
                _ if !settled => continue,
                _ => return Err(changed()),
            }
        }
        Err(changed())
    }

    /// Moves the files to `to` (a rename on the same filesystem).
    fn move_to(&self, to: &Path, trash: bool) -> std::io::Result<()> {
        let from = self
            .location
            .lock()
            .map_err(|_| std::io::Error::other("version lock poisoned"))?
            .dir
            .clone();
        self.relocate(to, trash, || std::fs::rename(&from, to))
    }

    /// Runs `op`, which moves the files to `to`, marked for [`Version::read`] as a move.
    fn relocate(
        &self,
        to: &Path,
        trash: bool,
        op: impl FnOnce() -> std::io::Result<()>,
    ) -> std::io::Result<()> {
        let mut loc = self
            .location
            .lock()
            .map_err(|_| std::io::Error::other("version lock poisoned"))?;
        self.moves.fetch_add(1, Ordering::SeqCst);
        let r = op();
        if r.is_ok() {
            loc.dir = to.to_path_buf();
            if trash {
                loc.trash = Some(to.to_path_buf());
            }
        }
        self.moves.fetch_add(1, Ordering::SeqCst);
        r
    }

    /// Records where the files of a version not yet visible to anyone are now.
    fn placed_at(&self, dir: &Path) {
        if let Ok(mut loc) = self.location.lock() {
            loc.dir = dir.to_path_buf();
        }
    }

    fn retire(&self) {
        self.retired.store(true, Ordering::SeqCst);
    }
}

impl Drop for Version {
    fn drop(&mut self) {
        if let Ok(loc) = self.location.get_mut() {
            if let Some(trash) = &loc.trash {
                let _ = std::fs::remove_dir_all(trash.parent().unwrap_or(trash));
            }
        }
    }
}

fn inode(dir: &Path) -> Option<(u64, u64)> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(dir).ok().map(|m| (m.dev(), m.ino()))
    }
    #[cfg(not(unix))]
    {
        std::fs::metadata(dir).ok().map(|_| (0, 0))
    }
}

fn dir_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|it| {
            it.flatten()
                .filter_map(|e| e.metadata().ok())
                .filter(|m| m.is_file())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

/// Bytes of an adapter's own files in `dir` (its top-level regular files but the server's
/// `access.json` and `origin.json`): what the registry's refs count, and the adapter quotas
/// (blocking).
pub fn adapter_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|it| {
            it.flatten()
                .filter(|e| e.file_name() != ACCESS_FILE && e.file_name() != ORIGIN_FILE)
                .filter_map(|e| e.metadata().ok())
                .filter(|m| m.is_file())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

fn is_adapter_dir(dir: &Path) -> bool {
    dir.join(MANIFEST_FILE).is_file() || dir.join(REFERENCE_CONFIG_FILE).is_file()
}

/// The manifest as stored, and its expert config.
fn describe_dir(dir: &Path) -> Result<Description, String> {
    if let Ok(text) = std::fs::read_to_string(dir.join(MANIFEST_FILE)) {
        let m: Manifest =
            serde_json::from_str(&text).map_err(|e| format!("{MANIFEST_FILE}: {e}"))?;
        let v = serde_json::from_str(&text).map_err(|e| format!("{MANIFEST_FILE}: {e}"))?;
        return Ok(Description {
            layout: "esft",
            manifest: v,
            expert_config: m.expert_config,
        });
    }
    let text = std::fs::read_to_string(dir.join(REFERENCE_CONFIG_FILE))
        .map_err(|_| format!("neither {MANIFEST_FILE} nor {REFERENCE_CONFIG_FILE} is readable"))?;
    let c: ExpertConfig =
        serde_json::from_str(&text).map_err(|e| format!("{REFERENCE_CONFIG_FILE}: {e}"))?;
    let v = serde_json::from_str(&text).map_err(|e| format!("{REFERENCE_CONFIG_FILE}: {e}"))?;
    Ok(Description {
        layout: "reference",
        manifest: v,
        expert_config: c,
    })
}

fn read_access(dir: &Path) -> Access {
    std::fs::read(dir.join(ACCESS_FILE))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default()
}

/// Ownership the configuration declares.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    /// Shared-directory names that belong to a tenant: name -> tenant.
    pub reserved: HashMap<String, String>,
    /// Adapters (qualified names) every tenant may use.
    pub public: HashSet<String>,
}

/// A staging directory for a new adapter, inside the adapters directory. Put the adapter's
/// files in [`Staging::dir`]; dropping it removes whatever is left.
pub struct Staging {
    tmp: tempfile::TempDir,
}

impl Staging {
    /// Where the adapter's files go (created empty).
    pub fn dir(&self) -> PathBuf {
        self.tmp.path().join("adapter")
    }

    /// Scratch space beside the adapter (e.g. the received package).
    pub fn scratch(&self) -> &Path {
        self.tmp.path()
    }
}

/// Decides, under the store lock, whether an install may replace the current version.
pub type InstallCheck<'a> = dyn Fn(Option<&Arc<Version>>) -> Result<(), AdapterError> + 'a;

/// What an install did.
pub struct Installed {
    pub version: Arc<Version>,
    /// The version it replaced, now retired.
    pub replaced: Option<Arc<Version>>,
}

pub struct AdapterStore {
    root: PathBuf,
    policy: Policy,
    index: RwLock<BTreeMap<AdapterKey, Arc<Version>>>,
    /// Serialises installs, deletes and scans.
    mutate: Mutex<()>,
    /// When a look-up that found nothing last rescanned the directory, and the tenant
    /// directories and stamp ([`AdapterStore::stamp`]) of the last walk.
    miss_rescan: Mutex<Option<std::time::Instant>>,
    walked: Mutex<Walked>,
    walks: std::sync::atomic::AtomicU64,
}

/// What the last walk saw, to tell cheaply whether the directory changed since.
#[derive(Default)]
struct Walked {
    tenants: Vec<PathBuf>,
    stamp: Vec<Option<std::time::SystemTime>>,
}

/// A look-up that finds nothing rescans the adapters directory (to notice adapters put
/// there by hand) when the directory changed since the last walk (its own and its tenant
/// directories' modification times), else at most once per this long, whoever asks and
/// for whatever name: names no adapter has cost a look-up in memory and a few `stat`s,
/// not a walk of the directory under its lock. Installs, deletes and uploads through the
/// server update the index at once.
pub const MISS_RESCAN_INTERVAL: std::time::Duration = std::time::Duration::from_millis(200);

impl AdapterStore {
    /// Opens (and creates if missing) the adapters directory with no ownership policy.
    pub fn open(root: &Path) -> std::io::Result<Self> {
        Self::open_with(root, Policy::default())
    }

    /// Opens the adapters directory: finishes an install a crash interrupted, removes
    /// what interrupted uploads and retired versions left, and scans.
    pub fn open_with(root: &Path, policy: Policy) -> std::io::Result<Self> {
        std::fs::create_dir_all(root)?;
        let store = Self {
            root: root.to_path_buf(),
            policy,
            index: RwLock::new(BTreeMap::new()),
            mutate: Mutex::new(()),
            miss_rescan: Mutex::new(None),
            walked: Mutex::new(Walked::default()),
            walks: std::sync::atomic::AtomicU64::new(0),
        };
        store.recover();
        store.rescan();
        Ok(store)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The directory a key's adapter is installed at.
    fn path_of(&self, key: &AdapterKey) -> PathBuf {
        match &key.tenant {
            Some(t) => self
                .root
                .join(format!("{TENANT_DIR_PREFIX}{t}"))
                .join(&key.name),
            None => self.root.join(&key.name),
        }
    }

    fn recover(&self) {
        let Ok(entries) = std::fs::read_dir(&self.root) else {
            return;
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let path = e.path();
            // What another live process sharing the directory is installing, or still
            // serves from a retired version, is left alone.
            let dead = |prefix| crate::util::left_by_the_dead(&name, prefix);
            if name.starts_with(STAGING_PREFIX) && dead(STAGING_PREFIX) {
                let commit: Option<AdapterKey> = std::fs::read(path.join(COMMIT_FILE))
                    .ok()
                    .and_then(|b| serde_json::from_slice(&b).ok());
                if let Some(key) = commit {
                    let dest = self.path_of(&key);
                    let staged = path.join("adapter");
                    if !dest.exists() && is_adapter_dir(&staged) {
                        if let Some(parent) = dest.parent() {
                            let _ = std::fs::create_dir_all(parent);
                        }
                        match std::fs::rename(&staged, &dest) {
                            Ok(()) => {
                                tracing::warn!(adapter = %key, "finished an install a restart interrupted")
                            }
                            Err(e) => {
                                tracing::error!(adapter = %key, "could not finish an interrupted install: {e}")
                            }
                        }
                    }
                }
                let _ = std::fs::remove_dir_all(&path);
            } else if name.starts_with(RETIRED_PREFIX) && dead(RETIRED_PREFIX) {
                let _ = std::fs::remove_dir_all(&path);
            }
        }
    }

    /// Who a directory of the shared namespace belongs to: the configuration's reservation,
    /// else its `access.json`.
    fn legacy_owner(&self, name: &str, dir: &Path) -> Option<String> {
        self.policy
            .reserved
            .get(name)
            .cloned()
            .or_else(|| read_access(dir).owner)
    }

    fn is_public(&self, key: &AdapterKey, dir: &Path) -> bool {
        self.policy.public.contains(&key.qualified()) || read_access(dir).public
    }

    /// Every adapter directory on disk, by key.
    fn walk(&self) -> BTreeMap<AdapterKey, PathBuf> {
        let mut tenants = BTreeMap::new();
        let mut legacy = BTreeMap::new();
        let Ok(entries) = std::fs::read_dir(&self.root) else {
            return tenants;
        };
        for e in entries.flatten() {
            let path = e.path();
            let Some(name) = path
                .file_name()
                .and_then(|n| n.to_str())
                .map(str::to_string)
            else {
                continue;
            };
            if let Some(tenant) = name.strip_prefix(TENANT_DIR_PREFIX) {
                if validate_name(tenant).is_err() {
                    continue;
                }
                let Ok(inner) = std::fs::read_dir(&path) else {
                    continue;
                };
                for a in inner.flatten() {
                    let p = a.path();
                    let Some(n) = p.file_name().and_then(|n| n.to_str()) else {
                        continue;
                    };
                    if validate_name(n).is_ok() && is_adapter_dir(&p) {
                        tenants.insert(AdapterKey::of_tenant(tenant, n), p.clone());
                    }
                }
            } else if validate_name(&name).is_ok() && is_adapter_dir(&path) {
                let key = match self.legacy_owner(&name, &path) {
                    Some(t) if validate_name(&t).is_ok() => AdapterKey::of_tenant(&t, &name),
                    _ => AdapterKey::shared(&name),
                };
                legacy.insert(key, path);
            }
        }
        for (key, path) in legacy {
            match tenants.entry(key) {
                std::collections::btree_map::Entry::Occupied(e) => {
                    tracing::warn!(adapter = %e.key(), "both {} and its namespaced directory exist: the namespaced one is served", path.display());
                }
                std::collections::btree_map::Entry::Vacant(e) => {
                    e.insert(path);
                }
            }
        }
        tenants
    }

    /// Re-reads the directories: new ones become versions, vanished or replaced ones are
    /// retired. Returns every key known afterwards.
    pub fn rescan(&self) -> Vec<AdapterKey> {
        let Ok(_guard) = self.mutate.lock() else {
            return Vec::new();
        };
        self.rescan_locked()
    }

    /// The modification times of the adapters directory and of the tenant directories
    /// `tenants`: a directory added, removed or renamed at either level changes them (a
    /// new tenant directory changes the adapters directory's). A few `stat`s.
    fn stamp(&self, tenants: &[PathBuf]) -> Vec<Option<std::time::SystemTime>> {
        let mtime = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
        std::iter::once(mtime(&self.root))
            .chain(tenants.iter().map(|t| mtime(t)))
            .collect()
    }

    fn rescan_locked(&self) -> Vec<AdapterKey> {
        self.walks
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tenants: Vec<PathBuf> = std::fs::read_dir(&self.root)
            .map(|entries| {
                entries
                    .flatten()
                    .filter(|e| {
                        e.file_name()
                            .to_string_lossy()
                            .starts_with(TENANT_DIR_PREFIX)
                    })
                    .map(|e| e.path())
                    .collect()
            })
            .unwrap_or_default();
        let stamp = self.stamp(&tenants);
        if let Ok(mut w) = self.walked.lock() {
            *w = Walked { tenants, stamp };
        }
        let found = self.walk();
        let Ok(mut index) = self.index.write() else {
            return Vec::new();
        };
        let mut next = BTreeMap::new();
        for (key, dir) in found {
            let keep = index.get(&key).filter(|v| {
                v.location.lock().is_ok_and(|l| l.dir == dir) && inode(&dir) == v.inode
            });
            let v = match keep {
                Some(v) => v.clone(),
                None => {
                    let public = self.is_public(&key, &dir);
                    Arc::new(Version::new(key.clone(), dir, public))
                }
            };
            next.insert(key, v);
        }
        for (key, old) in index.iter() {
            if next.get(key).is_none_or(|v| v.id != old.id) {
                old.retire();
            }
        }
        *index = next;
        index.keys().cloned().collect()
    }

    /// The current version of `key`, rescanning once if it is not known.
    pub fn resolve(&self, key: &AdapterKey) -> Option<Arc<Version>> {
        self.resolve_first(std::slice::from_ref(key))
    }

    /// The current version of the first of `keys` that has one, rescanning once if none
    /// is known (unless a miss rescanned less than [`MISS_RESCAN_INTERVAL`] ago).
    pub fn resolve_first(&self, keys: &[AdapterKey]) -> Option<Arc<Version>> {
        let known = || {
            let index = self.index.read().ok()?;
            keys.iter().find_map(|k| index.get(k).cloned())
        };
        if let Some(v) = known() {
            return Some(v);
        }
        {
            let Ok(mut last) = self.miss_rescan.lock() else {
                return None;
            };
            let unchanged = self
                .walked
                .lock()
                .is_ok_and(|w| !w.stamp.is_empty() && w.stamp == self.stamp(&w.tenants));
            if unchanged && last.is_some_and(|t| t.elapsed() < MISS_RESCAN_INTERVAL) {
                return None;
            }
            *last = Some(std::time::Instant::now());
        }
        self.rescan();
        known()
    }

    /// Walks of the directory so far (scans of every kind).
    pub fn walks(&self) -> u64 {
        self.walks.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Every current version, after a rescan, in key order.
    pub fn list(&self) -> Vec<Arc<Version>> {
        self.rescan();
        self.index
            .read()
            .map(|i| i.values().cloned().collect())
            .unwrap_or_default()
    }

    /// A new staging directory for an upload.
    pub fn staging(&self) -> std::io::Result<Staging> {
        let tmp = tempfile::Builder::new()
            .prefix(&crate::util::tagged(STAGING_PREFIX))
            .tempdir_in(&self.root)?;
        std::fs::create_dir(tmp.path().join("adapter"))?;
        Ok(Staging { tmp })
    }

    fn trash_dir(&self) -> std::io::Result<PathBuf> {
        Ok(tempfile::Builder::new()
            .prefix(&crate::util::tagged(RETIRED_PREFIX))
            .tempdir_in(&self.root)?
            .keep())
    }

    /// Makes the complete, validated adapter in `staging` the current version of `key`,
    /// replacing the one there (which is retired). `public`: every tenant may use it.
    pub fn install(
        &self,
        key: &AdapterKey,
        staging: Staging,
        public: bool,
    ) -> Result<Installed, AdapterError> {
        self.install_as(key, staging, public, &|_| Ok(()))
    }

    /// [`AdapterStore::install`], refused with [`AdapterError::Exists`] when `key` already
    /// has a version: the check and the install under the one store lock, so of two
    /// concurrent first installs one wins and the other is told.
    pub fn install_new(
        &self,
        key: &AdapterKey,
        staging: Staging,
        public: bool,
    ) -> Result<Installed, AdapterError> {
        self.install_as(key, staging, public, &|old| match old {
            Some(_) => Err(AdapterError::Exists(key.qualified())),
            None => Ok(()),
        })
    }

    /// [`AdapterStore::install`] if `check`, given the current version under the store
    /// lock, agrees; its error otherwise.
    pub fn install_if(
        &self,
        key: &AdapterKey,
        staging: Staging,
        public: bool,
        check: &InstallCheck<'_>,
    ) -> Result<Installed, AdapterError> {
        self.install_as(key, staging, public, check)
    }

    /// Refuses a shared name the configuration reserves for a tenant.
    pub fn check_reserved(&self, key: &AdapterKey) -> Result<(), AdapterError> {
        if key.tenant.is_none() {
            if let Some(t) = self.policy.reserved.get(&key.name) {
                return Err(AdapterError::Reserved {
                    name: key.name.clone(),
                    tenant: t.clone(),
                });
            }
        }
        Ok(())
    }

    /// Whether the configuration makes `key` public.
    pub fn policy_public(&self, key: &AdapterKey) -> bool {
        self.policy.public.contains(&key.qualified())
    }

    fn install_as(
        &self,
        key: &AdapterKey,
        staging: Staging,
        public: bool,
        check: &InstallCheck<'_>,
    ) -> Result<Installed, AdapterError> {
        validate_name(&key.name)?;
        if let Some(t) = &key.tenant {
            validate_name(t)?;
        }
        let io = |e: std::io::Error| AdapterError::Io(key.name.clone(), e);
        let _guard = self
            .mutate
            .lock()
            .map_err(|_| io(std::io::Error::other("store lock poisoned")))?;
        self.check_reserved(key)?;
        // Make the index match the disk first: the replaced version is the one on disk.
        self.rescan_locked();
        check(
            self.index
                .read()
                .ok()
                .and_then(|i| i.get(key).cloned())
                .as_ref(),
        )?;
        let staged = staging.dir();
        let access = Access {
            owner: key.tenant.clone(),
            public,
        };
        let json = serde_json::to_vec_pretty(&access).map_err(|e| io(std::io::Error::other(e)))?;
        crate::util::write_atomic(&staged.join(ACCESS_FILE), &json).map_err(io)?;
        crate::util::write_atomic(
            &staging.scratch().join(COMMIT_FILE),
            &serde_json::to_vec(key).map_err(|e| io(std::io::Error::other(e)))?,
        )
        .map_err(io)?;

        let dest = self.path_of(key);
        if let Some(parent) = dest.parent() {
            std::fs::create_dir_all(parent).map_err(io)?;
        }
        let old = self.index.read().ok().and_then(|i| i.get(key).cloned());
        // An old version elsewhere (the layout before namespaces) moves out of the way.
        if let Some(o) = old
            .as_ref()
            .filter(|o| !o.location.lock().is_ok_and(|l| l.dir == dest))
        {
            let trash = self.trash_dir().map_err(io)?;
            o.move_to(&trash.join("adapter"), true).map_err(io)?;
        }
        let version = Arc::new(Version::new(key.clone(), staged.clone(), public));
        if dest.exists() {
            let trash = self.trash_dir().map_err(io)?;
            let aside = trash.join("adapter");
            // Swap in one step where possible; else move the old one aside first (a crash
            // in between is finished by `recover` from the commit record).
            let swap = || match exchange(&staged, &dest) {
                Ok(()) => std::fs::rename(&staged, &aside),
                Err(_) => {
                    std::fs::rename(&dest, &aside)?;
                    std::fs::rename(&staged, &dest)
                }
            };
            match &old {
                Some(o) => o.relocate(&aside, true, swap).map_err(io)?,
                None => {
                    swap().map_err(io)?;
                    let _ = std::fs::remove_dir_all(&trash);
                }
            }
        } else {
            std::fs::rename(&staged, &dest).map_err(io)?;
        }
        version.placed_at(&dest);
        if let Some(o) = &old {
            o.retire();
        }
        if let Ok(mut index) = self.index.write() {
            index.insert(key.clone(), version.clone());
        }
        drop(staging);
        Ok(Installed {
            version,
            replaced: old,
        })
    }

    /// Removes `key`'s adapter: it is retired at once, its files go when its last request
    /// ends. `NotFound` if there is none.
    pub fn delete(&self, key: &AdapterKey) -> Result<Arc<Version>, AdapterError> {
        self.delete_if(key, &|_| true)
    }

    /// [`AdapterStore::delete`] if `check`, given the current version under the store lock,
    /// agrees (`NotFound` otherwise).
    pub fn delete_if(
        &self,
        key: &AdapterKey,
        check: &dyn Fn(&Arc<Version>) -> bool,
    ) -> Result<Arc<Version>, AdapterError> {
        let io = |e: std::io::Error| AdapterError::Io(key.name.clone(), e);
        let _guard = self
            .mutate
            .lock()
            .map_err(|_| io(std::io::Error::other("store lock poisoned")))?;
        self.rescan_locked();
        let old = self
            .index
            .read()
            .ok()
            .and_then(|i| i.get(key).cloned())
            .filter(|v| check(v))
            .ok_or_else(|| AdapterError::NotFound(key.qualified()))?;
        let trash = self.trash_dir().map_err(io)?;
        old.move_to(&trash.join("adapter"), true).map_err(io)?;
        old.retire();
        if let Ok(mut index) = self.index.write() {
            index.remove(key);
        }
        Ok(old)
    }
}

/// Swaps two directories in one step (Linux `renameat2(RENAME_EXCHANGE)`); an error where
/// the platform or filesystem cannot.
fn exchange(a: &Path, b: &Path) -> std::io::Result<()> {
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::ffi::OsStrExt;
        let a = std::ffi::CString::new(a.as_os_str().as_bytes())?;
        let b = std::ffi::CString::new(b.as_os_str().as_bytes())?;
        // SAFETY: both are valid NUL-terminated paths; AT_FDCWD resolves them as given.
        let r = unsafe {
            libc::renameat2(
                libc::AT_FDCWD,
                a.as_ptr(),
                libc::AT_FDCWD,
                b.as_ptr(),
                libc::RENAME_EXCHANGE,
            )
        };
        if r == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = (a, b);
        Err(std::io::Error::from(std::io::ErrorKind::Unsupported))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake_adapter(dir: &Path, tag: &str) {
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(
            dir.join(REFERENCE_CONFIG_FILE),
            r#"{"experts": {"1": [0]}, "shared_experts": false, "non_expert_modules": false}"#,
        )
        .unwrap();
        std::fs::write(dir.join("w.safetensors"), tag).unwrap();
    }

    fn staged(store: &AdapterStore, tag: &str) -> Staging {
        let s = store.staging().unwrap();
        fake_adapter(&s.dir(), tag);
        s
    }

    fn content(v: &Version) -> String {
        v.read(|d| std::fs::read_to_string(d.join("w.safetensors")).unwrap())
            .unwrap()
    }

    fn hidden(root: &Path) -> Vec<String> {
        std::fs::read_dir(root)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with('.'))
            .collect()
    }

    #[test]
    fn keys_parse_and_print() {
        assert_eq!(AdapterKey::parse("x").unwrap(), AdapterKey::shared("x"));
        assert_eq!(
            AdapterKey::parse("acme/x").unwrap(),
            AdapterKey::of_tenant("acme", "x")
        );
        assert_eq!(AdapterKey::of_tenant("acme", "x").qualified(), "acme/x");
        for bad in ["", "a/b/c", "/x", "x/", "../x", "a/.x"] {
            assert!(AdapterKey::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn replace_retires_the_old_version_which_keeps_its_files_until_dropped() {
        let root = tempfile::tempdir().unwrap();
        let store = AdapterStore::open(root.path()).unwrap();
        let key = AdapterKey::of_tenant("acme", "x");
        let v1 = store.install(&key, staged(&store, "one"), false).unwrap();
        assert!(v1.replaced.is_none());
        let v1 = v1.version;
        assert!(root.path().join("@acme/x").is_dir());
        let v2 = store.install(&key, staged(&store, "two"), false).unwrap();
        assert_eq!(v2.replaced.as_ref().map(|v| v.id()), Some(v1.id()));
        drop(v2.replaced);
        let v2 = v2.version;
        assert!(v1.is_retired() && !v2.is_retired());
        assert_ne!(v1.id(), v2.id());
        // Each version reads its own files, wherever they are now.
        assert_eq!(content(&v1), "one");
        assert_eq!(content(&v2), "two");
        assert_eq!(store.resolve(&key).unwrap().id(), v2.id());
        assert_eq!(
            hidden(root.path()).len(),
            1,
            "the old files wait in .retired-*"
        );
        drop(v1);
        assert_eq!(hidden(root.path()), Vec::<String>::new());
        // Delete: retired at once, gone from lookups, files kept while held.
        let gone = store.delete(&key).unwrap();
        assert!(gone.is_retired() && store.resolve(&key).is_none());
        assert_eq!(content(&gone), "two");
        assert!(matches!(store.delete(&key), Err(AdapterError::NotFound(_))));
        drop((gone, v2));
        assert_eq!(hidden(root.path()), Vec::<String>::new());
    }

    #[test]
    fn namespaces_are_separate_and_reserved_names_belong_to_their_tenant() {
        let root = tempfile::tempdir().unwrap();
        fake_adapter(&root.path().join("mine"), "legacy");
        fake_adapter(&root.path().join("common"), "common");
        let policy = Policy {
            reserved: HashMap::from([("mine".to_string(), "acme".to_string())]),
            public: HashSet::from(["common".to_string()]),
        };
        let store = AdapterStore::open_with(root.path(), policy).unwrap();
        let keys = store.rescan();
        assert_eq!(
            keys,
            [
                AdapterKey::shared("common"),
                AdapterKey::of_tenant("acme", "mine")
            ]
        );
        assert!(store
            .resolve(&AdapterKey::shared("common"))
            .unwrap()
            .is_public());
        // The admin cannot put a shared adapter under a tenant's reserved name.
        assert!(matches!(
            store.install(&AdapterKey::shared("mine"), staged(&store, "x"), false),
            Err(AdapterError::Reserved { .. })
        ));
        // Another tenant's `mine` is its own; acme's legacy one is untouched.
        let g = AdapterKey::of_tenant("globex", "mine");
        store.install(&g, staged(&store, "globex"), false).unwrap();
        let acme = AdapterKey::of_tenant("acme", "mine");
        assert_eq!(content(&store.resolve(&acme).unwrap()), "legacy");
        assert_eq!(content(&store.resolve(&g).unwrap()), "globex");
        // acme replacing its legacy adapter moves it into its namespace directory.
        let r = store.install(&acme, staged(&store, "new"), false).unwrap();
        assert_eq!(content(r.replaced.as_ref().unwrap()), "legacy");
        assert!(!root.path().join("mine").exists());
        assert!(root.path().join("@acme/mine").is_dir());
        drop(r);
        assert_eq!(hidden(root.path()), Vec::<String>::new());
    }

    #[test]
    fn unknown_names_walk_the_directory_at_most_once_per_interval() {
        let root = tempfile::tempdir().unwrap();
        let store = AdapterStore::open(root.path()).unwrap();
        let started = std::time::Instant::now();
        let before = store.walks();
        for i in 0..2000 {
            assert!(store
                .resolve(&AdapterKey::shared(&format!("nobody-{i}")))
                .is_none());
        }
        let walks = store.walks() - before;
        let most = started.elapsed().as_millis() / MISS_RESCAN_INTERVAL.as_millis() + 1;
        assert!(
            walks as u128 <= most,
            "{walks} walks for 2000 unknown names"
        );
        // An adapter put there by hand is found at once (the directory changed).
        fake_adapter(&root.path().join("later"), "one");
        assert!(store.resolve(&AdapterKey::shared("later")).is_some());
        // One whose directory was made before a walk and filled after it is found once
        // the interval has passed.
        std::fs::create_dir(root.path().join("slow")).unwrap();
        assert!(store.resolve(&AdapterKey::shared("nobody")).is_none());
        fake_adapter(&root.path().join("slow"), "two");
        std::thread::sleep(MISS_RESCAN_INTERVAL);
        assert!(store.resolve(&AdapterKey::shared("slow")).is_some());
    }

    #[test]
    fn a_directory_replaced_behind_the_store_is_a_new_version() {
        let root = tempfile::tempdir().unwrap();
        fake_adapter(&root.path().join("x"), "one");
        let store = AdapterStore::open(root.path()).unwrap();
        let key = AdapterKey::shared("x");
        let v1 = store.resolve(&key).unwrap();
        let side = root.path().join("side");
        fake_adapter(&side, "two");
        std::fs::rename(root.path().join("x"), root.path().join("gone")).unwrap();
        std::fs::rename(&side, root.path().join("x")).unwrap();
        // The old version refuses to read the new files under its id.
        assert!(v1.read(|_| ()).is_err());
        store.rescan();
        assert!(v1.is_retired());
        let v2 = store.resolve(&key).unwrap();
        assert_ne!(v1.id(), v2.id());
        assert_eq!(content(&v2), "two");
        // Dropping a version the store did not move removes nothing.
        drop(v1);
        assert!(root.path().join("gone").is_dir());
    }

    #[test]
    fn an_install_interrupted_between_its_renames_is_finished_on_open() {
        let root = tempfile::tempdir().unwrap();
        let store = AdapterStore::open(root.path()).unwrap();
        let key = AdapterKey::of_tenant("acme", "x");
        let s = staged(&store, "new");
        std::fs::write(
            s.scratch().join(COMMIT_FILE),
            serde_json::to_vec(&key).unwrap(),
        )
        .unwrap();
        // The process dies here: the staging directory is left behind (named as a
        // process that is gone names it: no process has that pid).
        let dead = |p: PathBuf| {
            let host = crate::util::hostname();
            let name = format!(
                "{STAGING_PREFIX}{host}@2147483646@gone0000-{}",
                rand::random::<u32>()
            );
            let to = root.path().join(name);
            std::fs::rename(&p, &to).unwrap();
            to
        };
        let kept = dead(s.tmp.keep());
        let abandoned = dead(store.staging().unwrap().tmp.keep());
        // A live process's upload (this one's) is left alone.
        let live = store.staging().unwrap().tmp.keep();
        drop(store);
        let store = AdapterStore::open(root.path()).unwrap();
        assert_eq!(content(&store.resolve(&key).unwrap()), "new");
        assert!(!kept.exists() && !abandoned.exists());
        assert!(live.exists());
        std::fs::remove_dir_all(&live).unwrap();
        assert_eq!(hidden(root.path()), Vec::<String>::new());
    }
}
