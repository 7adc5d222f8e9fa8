//! The adapter registry in an object store: the authority on which adapters exist when
//! several replicas and training workers share them. The adapters directory of each
//! process is then its local disk cache of the registry (see
//! [`super::registry::AdapterRegistry::refresh`]).
//!
//! Layout, below the store's `adapters/` prefix (`NS` is `shared/NAME` for a shared
//! adapter, `tenant/TENANT/NAME` for a tenant's):
//!
//! - `objects/NS/HASH/FILE`: the adapter's files, immutable. `HASH` is the content hash:
//!   the SHA-256 of the lines `FILE SIZE SHA256\n` of its files in name order.
//! - `refs/NS/SEQ.json` (`SEQ` zero-padded to 16 digits): a [`Ref`], immutable, created
//!   with create-if-absent. The highest `SEQ` is the name's current state: a content hash
//!   with its file list (name, size, SHA-256), owner and public flag, or a tombstone
//!   (`deleted: true`).
//!
//! Publishing uploads the objects first, then creates ref `SEQ + 1` over the highest seen:
//! a reader that finds a ref finds all of its objects, and of two concurrent publishers of
//! one name exactly one gets each sequence number (the other reads the new head and tries
//! the next, or, for a first install, learns that the name exists). Deleting creates a
//! tombstone the same way. Afterwards the publisher collects garbage: refs below the
//! previous one and objects of other contents. A reader that loses a race with that
//! collection (its objects vanish mid-download) looks the name up again.
//!
//! Network operations run on the registry's own small runtime: callers on any runtime
//! await them ([`Remote::run`]), threads outside async code block on them
//! ([`Remote::block`]). This module knows object keys and refs; the disk cache, the host
//! and device tiers are [`super::registry`]'s.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use super::format::AdapterError;
use super::store::{AdapterKey, ACCESS_FILE, ORIGIN_FILE};
use crate::store::{Store, StoreError};

/// The registry's prefix in the shared store.
pub const PREFIX: &str = "adapters";
/// How many times a publisher tries the next sequence number when others keep winning.
const PUBLISH_ATTEMPTS: usize = 16;

/// One file of an adapter.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    pub name: String,
    pub size: u64,
    /// Lowercase hex.
    pub sha256: String,
}

/// One state of a name: a content, or a tombstone.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ref {
    pub key: AdapterKey,
    pub seq: u64,
    #[serde(default)]
    pub deleted: bool,
    /// The content hash (empty for a tombstone).
    #[serde(default)]
    pub hash: String,
    #[serde(default)]
    pub files: Vec<FileEntry>,
    /// Every tenant may use it.
    #[serde(default)]
    pub public: bool,
    /// Seconds since the epoch when it was published.
    pub created: u64,
}

impl Ref {
    pub fn size_bytes(&self) -> u64 {
        self.files.iter().map(|f| f.size).sum()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("adapter {0} already exists in the registry")]
    Exists(String),
    #[error("adapter {0} is not in the registry")]
    NotFound(String),
    /// The objects of a ref were collected while being read: look the name up again.
    #[error("adapter {0}: its files were replaced while being downloaded")]
    Vanished(String),
    #[error("adapter {key}: {message}")]
    Corrupt { key: String, message: String },
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

impl RemoteError {
    /// The store did not answer (a 503 for clients).
    pub fn is_unavailable(&self) -> bool {
        matches!(self, RemoteError::Store(e) if e.is_unavailable())
    }
}

impl From<RemoteError> for AdapterError {
    fn from(e: RemoteError) -> Self {
        match e {
            RemoteError::Exists(k) => AdapterError::Exists(k),
            RemoteError::NotFound(k) => AdapterError::NotFound(k),
            e if e.is_unavailable() => AdapterError::StoreUnavailable(e.to_string()),
            RemoteError::Io(e) => AdapterError::Io("registry".into(), e),
            e => AdapterError::Io("registry".into(), std::io::Error::other(e.to_string())),
        }
    }
}

/// `shared/NAME` or `tenant/TENANT/NAME`.
fn namespace(key: &AdapterKey) -> String {
    match &key.tenant {
        Some(t) => format!("tenant/{t}/{}", key.name),
        None => format!("shared/{}", key.name),
    }
}

fn ref_path(key: &AdapterKey, seq: u64) -> String {
    format!("refs/{}/{seq:016}.json", namespace(key))
}

fn object_path(key: &AdapterKey, hash: &str, file: &str) -> String {
    format!("objects/{}/{hash}/{file}", namespace(key))
}

/// The key and sequence number of a ref's object key.
fn parse_ref_path(path: &str) -> Option<(AdapterKey, u64)> {
    let parts: Vec<&str> = path.split('/').collect();
    let (key, file) = match parts.as_slice() {
        ["refs", "shared", name, file] => (AdapterKey::parse(name).ok()?, *file),
        ["refs", "tenant", t, name, file] => {
            (AdapterKey::parse(&format!("{t}/{name}")).ok()?, *file)
        }
        _ => return None,
    };
    let seq = file.strip_suffix(".json")?.parse().ok()?;
    Some((key, seq))
}

/// SHA-256 of a file, in hex (blocking).
fn sha256_file(path: &Path) -> std::io::Result<String> {
    let mut f = std::fs::File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

/// The adapter files of `dir` (its top-level regular files but the server's own
/// `access.json` and `origin.json`), in name order, with sizes and hashes (blocking).
pub fn describe_files(dir: &Path) -> std::io::Result<Vec<FileEntry>> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        let name = e.file_name().to_string_lossy().into_owned();
        if !e.file_type()?.is_file() || name == ACCESS_FILE || name == ORIGIN_FILE {
            continue;
        }
        out.push(FileEntry {
            size: e.metadata()?.len(),
            sha256: sha256_file(&e.path())?,
            name,
        });
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

/// The content hash of a file list (in name order).
pub fn content_hash(files: &[FileEntry]) -> String {
    let mut h = Sha256::new();
    for f in files {
        h.update(format!("{} {} {}\n", f.name, f.size, f.sha256).as_bytes());
    }
    hex::encode(h.finalize())
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A runtime shut down without waiting when dropped (it may be dropped on an async thread).
struct Background(Option<tokio::runtime::Runtime>);

impl Drop for Background {
    fn drop(&mut self) {
        if let Some(rt) = self.0.take() {
            rt.shutdown_background();
        }
    }
}

/// The object-store registry of adapters.
pub struct Remote {
    store: Store,
    rt: Background,
    /// Refs read so far, by object key (refs never change once created).
    refs: Mutex<HashMap<String, Arc<Ref>>>,
}

impl std::fmt::Debug for Remote {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Remote")
            .field("url", &self.store.url())
            .finish()
    }
}

impl Remote {
    /// The registry under `adapters/` of the shared store.
    pub fn open(shared: &Store) -> Result<Arc<Self>, RemoteError> {
        Self::at(shared.scoped(PREFIX)?)
    }

    /// The registry at exactly `store` (its prefix is the registry's root).
    pub fn at(store: Store) -> Result<Arc<Self>, RemoteError> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("esft-registry")
            .enable_all()
            .build()?;
        Ok(Arc::new(Self {
            store,
            rt: Background(Some(rt)),
            refs: Mutex::new(HashMap::new()),
        }))
    }

    /// Requests sent to the store so far (see [`Store::requests`]).
    pub fn requests(&self) -> u64 {
        self.store.requests()
    }

    /// The registry's address (for messages and logs).
    pub fn url(&self) -> &str {
        self.store.url()
    }

    fn handle(&self) -> Result<tokio::runtime::Handle, RemoteError> {
        self.rt
            .0
            .as_ref()
            .map(|r| r.handle().clone())
            .ok_or_else(|| RemoteError::Io(std::io::Error::other("the registry is closed")))
    }

    /// Runs `f` on the registry's runtime and awaits it (from any runtime).
    pub async fn run<T, F>(
        self: &Arc<Self>,
        f: impl FnOnce(Arc<Self>) -> F,
    ) -> Result<T, RemoteError>
    where
        F: Future<Output = Result<T, RemoteError>> + Send + 'static,
        T: Send + 'static,
    {
        let task = self.handle()?.spawn(f(self.clone()));
        task.await
            .map_err(|e| RemoteError::Io(std::io::Error::other(format!("registry task: {e}"))))?
    }

    /// Runs `f` on the registry's runtime and waits for it, blocking this thread: for
    /// threads outside async code (loader threads, `spawn_blocking`, training workers).
    pub fn block<T, F>(self: &Arc<Self>, f: impl FnOnce(Arc<Self>) -> F) -> Result<T, RemoteError>
    where
        F: Future<Output = Result<T, RemoteError>> + Send + 'static,
        T: Send + 'static,
    {
        let (tx, rx) = std::sync::mpsc::channel();
        let fut = f(self.clone());
        self.handle()?.spawn(async move {
            let _ = tx.send(fut.await);
        });
        rx.recv().map_err(|_| {
            RemoteError::Io(std::io::Error::other(
                "the registry task ended without an answer",
            ))
        })?
    }

    /// Publishes the adapter in `dir` as `key` and waits (blocking). `replace`: a live
    /// adapter of that name is replaced; else that is [`RemoteError::Exists`].
    pub fn publish_blocking(
        self: &Arc<Self>,
        key: &AdapterKey,
        dir: &Path,
        public: bool,
        replace: bool,
    ) -> Result<Arc<Ref>, RemoteError> {
        let (key, dir) = (key.clone(), dir.to_path_buf());
        self.block(move |r| async move { r.publish(&key, &dir, public, replace).await })
    }

    /// Deletes `key` (a tombstone) and waits (blocking); the ref it ended.
    pub fn delete_blocking(self: &Arc<Self>, key: &AdapterKey) -> Result<Arc<Ref>, RemoteError> {
        let key = key.clone();
        self.block(move |r| async move { r.delete(&key).await })
    }

    async fn read_ref(&self, path: &str) -> Result<Option<Arc<Ref>>, RemoteError> {
        if let Some(r) = self.refs.lock().ok().and_then(|m| m.get(path).cloned()) {
            return Ok(Some(r));
        }
        let Some(bytes) = self.store.get(path).await? else {
            return Ok(None);
        };
        let r: Ref = serde_json::from_slice(&bytes).map_err(|e| RemoteError::Corrupt {
            key: path.to_string(),
            message: format!("unreadable ref: {e}"),
        })?;
        let r = Arc::new(r);
        if let Ok(mut m) = self.refs.lock() {
            m.insert(path.to_string(), r.clone());
        }
        Ok(Some(r))
    }

    /// The sequence numbers of `key`'s refs, highest first.
    async fn seqs(&self, key: &AdapterKey) -> Result<Vec<u64>, RemoteError> {
        let dir = format!("refs/{}", namespace(key));
        let mut seqs: Vec<u64> = self
            .store
            .list(&dir)
            .await?
            .into_iter()
            .filter_map(|e| parse_ref_path(&e.key))
            .filter(|(k, _)| k == key)
            .map(|(_, s)| s)
            .collect();
        seqs.sort_unstable_by(|a, b| b.cmp(a));
        Ok(seqs)
    }

    /// `key`'s current ref (a content or a tombstone), `None` when it never had one.
    pub async fn head(&self, key: &AdapterKey) -> Result<Option<Arc<Ref>>, RemoteError> {
        for seq in self.seqs(key).await? {
            if let Some(r) = self.read_ref(&ref_path(key, seq)).await? {
                return Ok(Some(r));
            }
        }
        Ok(None)
    }

    /// Every name's current ref, tombstones included, in key order.
    pub async fn heads(&self) -> Result<Vec<Arc<Ref>>, RemoteError> {
        let mut newest: BTreeMap<AdapterKey, u64> = BTreeMap::new();
        for e in self.store.list("refs").await? {
            if let Some((k, s)) = parse_ref_path(&e.key) {
                let n = newest.entry(k).or_insert(s);
                *n = (*n).max(s);
            }
        }
        let mut out = Vec::with_capacity(newest.len());
        for (k, s) in newest {
            // A ref collected since the listing: the name has a newer one; read it then.
            match self.read_ref(&ref_path(&k, s)).await? {
                Some(r) => out.push(r),
                None => {
                    if let Some(r) = self.head(&k).await? {
                        out.push(r);
                    }
                }
            }
        }
        Ok(out)
    }

    /// Publishes the adapter files of `dir` as `key`: objects first, then the ref.
    pub async fn publish(
        &self,
        key: &AdapterKey,
        dir: &Path,
        public: bool,
        replace: bool,
    ) -> Result<Arc<Ref>, RemoteError> {
        let d = dir.to_path_buf();
        let files = tokio::task::spawn_blocking(move || describe_files(&d))
            .await
            .map_err(|e| RemoteError::Io(std::io::Error::other(e.to_string())))??;
        if files.is_empty() {
            return Err(RemoteError::Corrupt {
                key: key.qualified(),
                message: "no files to publish".into(),
            });
        }
        let hash = content_hash(&files);
        let refused = |h: &Option<Arc<Ref>>| !replace && h.as_ref().is_some_and(|h| !h.deleted);
        if refused(&self.head(key).await?) {
            return Err(RemoteError::Exists(key.qualified()));
        }
        for f in &files {
            self.store
                .upload_file(&object_path(key, &hash, &f.name), &dir.join(&f.name))
                .await?;
        }
        let mut published = None;
        for _ in 0..PUBLISH_ATTEMPTS {
            let head = self.head(key).await?;
            if refused(&head) {
                // Another first install won meanwhile: take back objects no ref names.
                if head.as_ref().is_some_and(|h| h.hash != hash) {
                    for f in &files {
                        let _ = self.store.delete(&object_path(key, &hash, &f.name)).await;
                    }
                }
                return Err(RemoteError::Exists(key.qualified()));
            }
            let r = Ref {
                key: key.clone(),
                seq: head.map_or(1, |h| h.seq + 1),
                deleted: false,
                hash: hash.clone(),
                files: files.clone(),
                public,
                created: now(),
            };
            let json = serde_json::to_vec_pretty(&r).map_err(std::io::Error::other)?;
            match self.store.create(&ref_path(key, r.seq), json).await {
                Ok(()) => {
                    published = Some(Arc::new(r));
                    break;
                }
                Err(StoreError::Exists { .. }) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        let r = published.ok_or_else(|| {
            RemoteError::Io(std::io::Error::other(format!(
                "adapter {key}: other publishers kept winning; try again"
            )))
        })?;
        // A concurrent publisher's collection may have taken objects of equal content.
        for f in &r.files {
            let path = object_path(key, &hash, &f.name);
            if self.store.size(&path).await? != Some(f.size) {
                self.store.upload_file(&path, &dir.join(&f.name)).await?;
            }
        }
        self.collect(&r).await;
        Ok(r)
    }

    /// Deletes `key` with a tombstone; the ref it ended.
    pub async fn delete(&self, key: &AdapterKey) -> Result<Arc<Ref>, RemoteError> {
        for _ in 0..PUBLISH_ATTEMPTS {
            let head = match self.head(key).await? {
                Some(h) if !h.deleted => h,
                _ => return Err(RemoteError::NotFound(key.qualified())),
            };
            let tomb = Ref {
                key: key.clone(),
                seq: head.seq + 1,
                deleted: true,
                hash: String::new(),
                files: Vec::new(),
                public: false,
                created: now(),
            };
            let json = serde_json::to_vec_pretty(&tomb).map_err(std::io::Error::other)?;
            match self.store.create(&ref_path(key, tomb.seq), json).await {
                Ok(()) => {
                    self.collect(&tomb).await;
                    return Ok(head);
                }
                Err(StoreError::Exists { .. }) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(RemoteError::Io(std::io::Error::other(format!(
            "adapter {key}: other publishers kept winning; try again"
        ))))
    }

    /// Removes what `newest` superseded: refs below the one before it (below it, for a
    /// tombstone) and objects of any other content. Failures are logged, not returned.
    async fn collect(&self, newest: &Ref) {
        let key = &newest.key;
        let keep_from = if newest.deleted {
            newest.seq
        } else {
            newest.seq.saturating_sub(1)
        };
        let result: Result<(), RemoteError> = async {
            for seq in self.seqs(key).await? {
                if seq < keep_from {
                    let path = ref_path(key, seq);
                    self.store.delete(&path).await?;
                    if let Ok(mut m) = self.refs.lock() {
                        m.remove(&path);
                    }
                }
            }
            let dir = format!("objects/{}", namespace(key));
            let depth = dir.split('/').count();
            for e in self.store.list(&dir).await? {
                let hash = e.key.split('/').nth(depth);
                if hash != Some(newest.hash.as_str()) {
                    self.store.delete(&e.key).await?;
                }
            }
            Ok(())
        }
        .await;
        if let Err(e) = result {
            tracing::warn!(adapter = %key, "collecting superseded registry objects: {e}");
        }
    }

    /// Downloads `r`'s files into the directory `dest`, checking each file's size and
    /// SHA-256.
    pub async fn fetch(&self, r: &Ref, dest: &Path) -> Result<(), RemoteError> {
        let key = r.key.qualified();
        for f in &r.files {
            let to: PathBuf = dest.join(&f.name);
            let mut h = Sha256::new();
            let got = self
                .store
                .download_file_with(&object_path(&r.key, &r.hash, &f.name), &to, |b| h.update(b))
                .await?;
            if got.is_none() {
                return Err(RemoteError::Vanished(key));
            }
            if got != Some(f.size) || hex::encode(h.finalize()) != f.sha256 {
                return Err(RemoteError::Corrupt {
                    key,
                    message: format!("{} does not match its recorded size and SHA-256", f.name),
                });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, tag: &str) {
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(
            dir.join("expert_cfg.json"),
            format!("{{\"tag\":\"{tag}\"}}"),
        )
        .unwrap();
        std::fs::write(dir.join("w.safetensors"), tag.repeat(10)).unwrap();
        std::fs::write(dir.join(ACCESS_FILE), "{}").unwrap();
    }

    fn keys(store: &Store, dir: &str) -> Vec<String> {
        let remote = Remote::at(store.clone()).unwrap();
        let dir = dir.to_string();
        let mut k: Vec<String> = remote
            .block(move |r| async move { Ok(r.store.list(&dir).await?) })
            .unwrap()
            .into_iter()
            .map(|e| e.key)
            .collect();
        k.sort();
        k
    }

    #[test]
    fn ref_paths_round_trip() {
        for key in [AdapterKey::shared("x"), AdapterKey::of_tenant("acme", "x")] {
            assert_eq!(parse_ref_path(&ref_path(&key, 42)), Some((key, 42)));
        }
        assert_eq!(parse_ref_path("refs/shared/x/y/1.json"), None);
        assert_eq!(parse_ref_path("objects/shared/x/1.json"), None);
    }

    #[test]
    fn publish_replace_delete_and_collect() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::open("memory://").unwrap();
        let remote = Remote::at(store.clone()).unwrap();
        let key = AdapterKey::of_tenant("acme", "x");
        let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
        write(&a, "one");
        write(&b, "two");

        let r1 = remote.publish_blocking(&key, &a, false, false).unwrap();
        assert_eq!((r1.seq, r1.deleted), (1, false));
        // The server's own files are not part of the content.
        let names: Vec<&str> = r1.files.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(names, ["expert_cfg.json", "w.safetensors"]);
        assert!(matches!(
            remote.publish_blocking(&key, &b, false, false),
            Err(RemoteError::Exists(_))
        ));
        // Same content, same hash; different content, different hash.
        let again = remote.publish_blocking(&key, &a, true, true).unwrap();
        assert_eq!((again.seq, &again.hash, again.public), (2, &r1.hash, true));
        let r3 = remote.publish_blocking(&key, &b, false, true).unwrap();
        assert_eq!(r3.seq, 3);
        assert_ne!(r3.hash, r1.hash);
        let k = key.clone();
        let head = remote
            .block(move |r| async move { r.head(&k).await })
            .unwrap();
        assert_eq!(head.as_deref(), Some(&*r3));
        // Refs below the previous one and the other content's objects are collected.
        assert_eq!(keys(&store, "refs"), [ref_path(&key, 2), ref_path(&key, 3)]);
        let objects = keys(&store, "objects");
        assert_eq!(objects.len(), 2);
        assert!(objects.iter().all(|o| o.contains(&r3.hash)), "{objects:?}");

        let dest = tmp.path().join("dest");
        std::fs::create_dir_all(&dest).unwrap();
        let r = r3.clone();
        let d = dest.clone();
        remote
            .block(move |rm| async move { rm.fetch(&r, &d).await })
            .unwrap();
        assert_eq!(
            std::fs::read(dest.join("w.safetensors")).unwrap(),
            "two".repeat(10).as_bytes()
        );
        // An older ref's objects are gone: a reader holding it learns so.
        let old = again.clone();
        let d = tmp.path().join("dest2");
        std::fs::create_dir_all(&d).unwrap();
        assert!(matches!(
            remote.block(move |rm| async move { rm.fetch(&old, &d).await }),
            Err(RemoteError::Vanished(_))
        ));

        let other = AdapterKey::shared("x");
        remote.publish_blocking(&other, &a, true, false).unwrap();
        let gone = remote.delete_blocking(&key).unwrap();
        assert_eq!(gone.seq, 3);
        assert!(matches!(
            remote.delete_blocking(&key),
            Err(RemoteError::NotFound(_))
        ));
        let heads = remote.block(|r| async move { r.heads().await }).unwrap();
        let summary: Vec<(String, u64, bool)> = heads
            .iter()
            .map(|h| (h.key.qualified(), h.seq, h.deleted))
            .collect();
        assert_eq!(
            summary,
            [("x".to_string(), 1, false), ("acme/x".to_string(), 4, true)]
        );
        // Nothing of the deleted adapter's content is left; the shared one's is.
        let objects = keys(&store, "objects");
        assert!(objects.iter().all(|o| o.starts_with("objects/shared/x/")));
        // A first install after a delete is allowed again.
        let r5 = remote.publish_blocking(&key, &a, false, false).unwrap();
        assert_eq!(r5.seq, 5);
    }

    #[test]
    fn concurrent_publishers_get_distinct_sequence_numbers() {
        let tmp = tempfile::tempdir().unwrap();
        let remote = Remote::at(Store::open("memory://").unwrap()).unwrap();
        let key = AdapterKey::shared("race");
        let firsts: Vec<_> = (0..6)
            .map(|i| {
                let dir = tmp.path().join(format!("d{i}"));
                write(&dir, &format!("v{i}"));
                let (remote, key) = (remote.clone(), key.clone());
                std::thread::spawn(move || remote.publish_blocking(&key, &dir, false, false))
            })
            .map(|t| t.join().unwrap())
            .collect();
        let won = firsts.iter().filter(|r| r.is_ok()).count();
        assert_eq!(won, 1, "{firsts:?}");
        let replaced: Vec<u64> = (0..6)
            .map(|i| {
                let dir = tmp.path().join(format!("d{i}"));
                let (remote, key) = (remote.clone(), key.clone());
                std::thread::spawn(move || remote.publish_blocking(&key, &dir, false, true))
            })
            .map(|t| t.join().unwrap().unwrap().seq)
            .collect();
        let mut sorted = replaced.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), 6, "{replaced:?}");
    }
}
