//! Where bytes live when more than one machine needs them: an object store (S3 and
//! S3-compatible servers, Google Cloud Storage, Azure Blob Storage), a local directory, or
//! memory (tests), through the `object_store` crate.
//!
//! It owns addressing (one URL: the bucket or directory and a key prefix), credentials and
//! endpoints (from the provider's usual environment variables: `AWS_ACCESS_KEY_ID`,
//! `AWS_ENDPOINT_URL`, `AWS_ALLOW_HTTP`, `GOOGLE_SERVICE_ACCOUNT`, `AZURE_STORAGE_ACCOUNT_NAME`,
//! ...), bounded retries so an unreachable store fails in seconds rather than minutes, and
//! the few operations the layers above build on:
//!
//! - whole-object [`Store::get`] / [`Store::put`], and streamed file transfers
//!   ([`Store::upload_file`], [`Store::download_file`]: a download lands under a temporary
//!   name and is renamed into place, so a reader never sees part of an object);
//! - [`Store::create`]: put only if no object has the key (`If-None-Match: *` on S3), the
//!   one atomic primitive publishing and claiming build on: of two writers, one wins and
//!   the other learns [`StoreError::Exists`];
//! - [`Store::list`] and [`Store::delete`].
//!
//! Keys are `/`-separated relative paths below the prefix. This module knows nothing of
//! adapters, jobs or tenants.

use bytes::Bytes;
use futures_util::StreamExt;
use object_store::path::Path as ObjectPath;
use object_store::{
    ObjectStore, ObjectStoreExt, ObjectStoreScheme, PutMode, PutOptions, PutPayload, RetryConfig,
    WriteMultipart,
};
use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

/// Files above this size go up in parts (S3 takes at most 5 GiB in one put).
const MULTIPART_THRESHOLD: u64 = 64 << 20;
/// The part size of multipart uploads.
const PART_BYTES: usize = 16 << 20;
/// Parts in flight at once during a multipart upload.
const PARTS_IN_FLIGHT: usize = 4;

/// How long the store may take before an operation counts as failed.
#[derive(Debug, Clone)]
pub struct Timeouts {
    /// Establishing a connection.
    pub connect: Duration,
    /// One request, from sending it to the end of its response body.
    pub request: Duration,
    /// All retries of one operation together.
    pub retries: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            connect: Duration::from_secs(3),
            request: Duration::from_secs(300),
            retries: Duration::from_secs(10),
        }
    }
}

/// What went wrong with the store, by what the caller can do about it.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("invalid store address {url:?}: {reason}")]
    Address { url: String, reason: String },
    #[error("invalid store key {key:?}: {reason}")]
    Key { key: String, reason: String },
    /// [`Store::create`] found the key taken.
    #[error("object {key} already exists in {url}")]
    Exists { url: String, key: String },
    /// The store did not answer, refused, or failed: worth retrying later.
    #[error("object store {url} unavailable: {source}")]
    Unavailable {
        url: String,
        #[source]
        source: object_store::Error,
    },
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

impl StoreError {
    /// Whether the failure is the store's (unreachable, refusing, failing) rather than the
    /// caller's; servers answer these with 503.
    pub fn is_unavailable(&self) -> bool {
        matches!(self, StoreError::Unavailable { .. })
    }
}

/// One object's listing entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The key below the store's prefix.
    pub key: String,
    pub size: u64,
    /// Seconds since the Unix epoch.
    pub modified: i64,
}

/// An object store with a key prefix. Cheap to clone.
#[derive(Clone)]
pub struct Store {
    inner: Arc<dyn ObjectStore>,
    prefix: ObjectPath,
    url: String,
    /// Requests sent so far through this store and every view of it.
    requests: Arc<std::sync::atomic::AtomicU64>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("url", &self.url).finish()
    }
}

/// Applies `options` to a provider's builder, each key parsed as that provider's
/// configuration key.
fn configure<B, K: std::str::FromStr>(
    mut builder: B,
    options: &[(String, String)],
    bad: &dyn Fn(String) -> StoreError,
    set: impl Fn(B, K, &str) -> B,
) -> Result<B, StoreError> {
    for (k, v) in options {
        let key = k
            .parse::<K>()
            .map_err(|_| bad(format!("unknown store option {k:?}")))?;
        builder = set(builder, key, v);
    }
    Ok(builder)
}

impl Store {
    /// Opens `s3://bucket/prefix`, `gs://bucket/prefix`, `az://container/prefix` (or the
    /// other Azure spellings `object_store` knows), `file:///abs/dir`, `memory://`, or a
    /// plain local path (created if missing). Credentials, region and endpoint come from the
    /// environment; nothing is contacted until the first operation.
    pub fn open(address: &str) -> Result<Self, StoreError> {
        Self::open_with(address, &Timeouts::default(), &[])
    }

    /// [`open`](Self::open) with explicit timeouts and provider settings: `object_store`'s
    /// configuration keys (`aws_endpoint`, `aws_allow_http`, `google_service_account`,
    /// `azure_storage_account_name`, ...), which take precedence over the environment.
    pub fn open_with(
        address: &str,
        timeouts: &Timeouts,
        options: &[(String, String)],
    ) -> Result<Self, StoreError> {
        let bad = |reason: String| StoreError::Address {
            url: address.to_string(),
            reason,
        };
        if !address.contains("://") {
            return Self::local(Path::new(address), address);
        }
        let url = url::Url::parse(address).map_err(|e| bad(e.to_string()))?;
        let (scheme, path) = ObjectStoreScheme::parse(&url).map_err(|e| bad(e.to_string()))?;
        // Timeouts as configuration keys (replacing the builder's client options would drop
        // those the environment set, such as `AWS_ALLOW_HTTP`); the caller's options last.
        let options: Vec<(String, String)> = [
            ("connect_timeout", timeouts.connect),
            ("timeout", timeouts.request),
        ]
        .into_iter()
        .map(|(k, d)| (k.to_string(), format!("{}ms", d.as_millis())))
        .chain(options.iter().cloned())
        .collect();
        let options = options.as_slice();
        let retry = RetryConfig {
            retry_timeout: timeouts.retries,
            max_retries: 4,
            ..RetryConfig::default()
        };
        let inner: Arc<dyn ObjectStore> = match scheme {
            ObjectStoreScheme::Local => {
                return Self::local(Path::new(url.path()), address);
            }
            ObjectStoreScheme::Memory => Arc::new(object_store::memory::InMemory::new()),
            ObjectStoreScheme::AmazonS3 => Arc::new(
                configure(
                    object_store::aws::AmazonS3Builder::from_env().with_url(address),
                    options,
                    &bad,
                    |b, k: object_store::aws::AmazonS3ConfigKey, v| b.with_config(k, v),
                )?
                .with_retry(retry)
                .build()
                .map_err(|e| bad(e.to_string()))?,
            ),
            ObjectStoreScheme::GoogleCloudStorage => Arc::new(
                configure(
                    object_store::gcp::GoogleCloudStorageBuilder::from_env().with_url(address),
                    options,
                    &bad,
                    |b, k: object_store::gcp::GoogleConfigKey, v| b.with_config(k, v),
                )?
                .with_retry(retry)
                .build()
                .map_err(|e| bad(e.to_string()))?,
            ),
            ObjectStoreScheme::MicrosoftAzure => Arc::new(
                configure(
                    object_store::azure::MicrosoftAzureBuilder::from_env().with_url(address),
                    options,
                    &bad,
                    |b, k: object_store::azure::AzureConfigKey, v| b.with_config(k, v),
                )?
                .with_retry(retry)
                .build()
                .map_err(|e| bad(e.to_string()))?,
            ),
            other => return Err(bad(format!("unsupported scheme {other:?}"))),
        };
        Ok(Self {
            inner,
            prefix: path,
            url: address.trim_end_matches('/').to_string(),
            requests: Arc::default(),
        })
    }

    fn local(dir: &Path, address: &str) -> Result<Self, StoreError> {
        std::fs::create_dir_all(dir)?;
        let fs = object_store::local::LocalFileSystem::new_with_prefix(dir).map_err(|e| {
            StoreError::Address {
                url: address.to_string(),
                reason: e.to_string(),
            }
        })?;
        Ok(Self {
            inner: Arc::new(fs),
            prefix: ObjectPath::default(),
            url: address.trim_end_matches('/').to_string(),
            requests: Arc::default(),
        })
    }

    /// How many requests (gets, heads, puts, deletes, listings, uploads) were sent to the
    /// store through this handle, its clones and scoped views: for tests and diagnostics.
    pub fn requests(&self) -> u64 {
        self.requests.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn count(&self) {
        self.requests
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// The address this store was opened with (for messages and logs).
    pub fn url(&self) -> &str {
        &self.url
    }

    /// This store's view of `sub/`: keys given to the result are below `sub`.
    pub fn scoped(&self, sub: &str) -> Result<Self, StoreError> {
        let prefix = self.path(sub)?;
        Ok(Self {
            inner: self.inner.clone(),
            requests: self.requests.clone(),
            prefix,
            url: format!("{}/{}", self.url, sub.trim_matches('/')),
        })
    }

    fn path(&self, key: &str) -> Result<ObjectPath, StoreError> {
        let rel = ObjectPath::parse(key).map_err(|e| StoreError::Key {
            key: key.to_string(),
            reason: e.to_string(),
        })?;
        if rel.as_ref().is_empty() {
            return Err(StoreError::Key {
                key: key.to_string(),
                reason: "empty key".into(),
            });
        }
        Ok(self.prefix.parts().chain(rel.parts()).collect())
    }

    fn relative(&self, path: &ObjectPath) -> String {
        match path.prefix_match(&self.prefix) {
            Some(parts) => parts
                .map(|p| p.as_ref().to_string())
                .collect::<Vec<_>>()
                .join("/"),
            None => path.to_string(),
        }
    }

    fn unavailable(&self, source: object_store::Error) -> StoreError {
        StoreError::Unavailable {
            url: self.url.clone(),
            source,
        }
    }

    /// The object's bytes, or `None` if there is none.
    pub async fn get(&self, key: &str) -> Result<Option<Bytes>, StoreError> {
        let path = self.path(key)?;
        self.count();
        let got = match self.inner.get(&path).await {
            Ok(g) => g,
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(self.unavailable(e)),
        };
        match got.bytes().await {
            Ok(b) => Ok(Some(b)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(self.unavailable(e)),
        }
    }

    /// The object's size, or `None` if there is none.
    pub async fn size(&self, key: &str) -> Result<Option<u64>, StoreError> {
        let path = self.path(key)?;
        self.count();
        match self.inner.head(&path).await {
            Ok(meta) => Ok(Some(meta.size)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(self.unavailable(e)),
        }
    }

    /// Writes the object whole, replacing any object at the key. Readers see the old bytes
    /// or the new, never a mix.
    pub async fn put(&self, key: &str, bytes: impl Into<Bytes>) -> Result<(), StoreError> {
        let path = self.path(key)?;
        self.count();
        self.inner
            .put(&path, PutPayload::from_bytes(bytes.into()))
            .await
            .map(|_| ())
            .map_err(|e| self.unavailable(e))
    }

    /// Writes the object only if the key is free: [`StoreError::Exists`] otherwise. Of two
    /// concurrent creators of one key, exactly one succeeds.
    pub async fn create(&self, key: &str, bytes: impl Into<Bytes>) -> Result<(), StoreError> {
        let path = self.path(key)?;
        self.count();
        let opts = PutOptions {
            mode: PutMode::Create,
            ..PutOptions::default()
        };
        match self
            .inner
            .put_opts(&path, PutPayload::from_bytes(bytes.into()), opts)
            .await
        {
            Ok(_) => Ok(()),
            Err(object_store::Error::AlreadyExists { .. })
            | Err(object_store::Error::Precondition { .. }) => Err(StoreError::Exists {
                url: self.url.clone(),
                key: key.to_string(),
            }),
            Err(e) => Err(self.unavailable(e)),
        }
    }

    /// Removes the object; a missing object is not an error.
    pub async fn delete(&self, key: &str) -> Result<(), StoreError> {
        let path = self.path(key)?;
        self.count();
        match self.inner.delete(&path).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.unavailable(e)),
        }
    }

    /// Every object whose key starts with the directory `dir` (`""`: everything), at any
    /// depth, in no particular order.
    pub async fn list(&self, dir: &str) -> Result<Vec<Entry>, StoreError> {
        let prefix = if dir.trim_matches('/').is_empty() {
            self.prefix.clone()
        } else {
            self.path(dir)?
        };
        let prefix = (!prefix.as_ref().is_empty()).then_some(prefix);
        self.count();
        let mut stream = self.inner.list(prefix.as_ref());
        let mut out = Vec::new();
        while let Some(meta) = stream.next().await {
            match meta {
                Ok(m) => out.push(Entry {
                    key: self.relative(&m.location),
                    size: m.size,
                    modified: m.last_modified.timestamp(),
                }),
                Err(object_store::Error::NotFound { .. }) => break,
                Err(e) => return Err(self.unavailable(e)),
            }
        }
        Ok(out)
    }

    /// Uploads a local file to `key`, in parts when it is large. The object appears whole
    /// when the upload completes; an interrupted upload leaves no object.
    pub async fn upload_file(&self, key: &str, file: &Path) -> Result<(), StoreError> {
        let len = tokio::fs::metadata(file).await?.len();
        if len <= MULTIPART_THRESHOLD {
            let bytes = tokio::fs::read(file).await?;
            return self.put(key, bytes).await;
        }
        let path = self.path(key)?;
        self.count();
        let upload = self
            .inner
            .put_multipart(&path)
            .await
            .map_err(|e| self.unavailable(e))?;
        let mut writer = WriteMultipart::new_with_chunk_size(upload, PART_BYTES);
        let mut f = tokio::fs::File::open(file).await?;
        let mut buf = vec![0u8; PART_BYTES];
        loop {
            let n = tokio::io::AsyncReadExt::read(&mut f, &mut buf).await?;
            if n == 0 {
                break;
            }
            if let Err(e) = writer.wait_for_capacity(PARTS_IN_FLIGHT).await {
                return Err(self.unavailable(e));
            }
            writer.write(&buf[..n]);
        }
        writer
            .finish()
            .await
            .map(|_| ())
            .map_err(|e| self.unavailable(e))
    }

    /// Downloads `key` to `dest` (through a temporary file beside it, synced, then renamed
    /// into place). Returns the byte count, or `None` (and writes nothing) if there is no
    /// such object.
    pub async fn download_file(&self, key: &str, dest: &Path) -> Result<Option<u64>, StoreError> {
        self.download_file_with(key, dest, |_| {}).await
    }

    /// [`download_file`](Self::download_file), showing `inspect` every chunk as it arrives
    /// (to hash the bytes while they stream, say).
    pub async fn download_file_with(
        &self,
        key: &str,
        dest: &Path,
        mut inspect: impl FnMut(&[u8]),
    ) -> Result<Option<u64>, StoreError> {
        let path = self.path(key)?;
        self.count();
        let got = match self.inner.get(&path).await {
            Ok(g) => g,
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(self.unavailable(e)),
        };
        let dir = dest.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir)?;
        let mut tmp = tempfile::Builder::new()
            .prefix(".download-")
            .tempfile_in(dir)?;
        let mut stream = got.into_stream();
        let mut n = 0u64;
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| self.unavailable(e))?;
            n += chunk.len() as u64;
            inspect(&chunk);
            tmp.write_all(&chunk)?;
        }
        tmp.as_file().sync_all()?;
        tmp.persist(dest).map_err(|e| e.error)?;
        Ok(Some(n))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    /// The operations' contract, on one store.
    async fn contract(store: &Store) {
        assert_eq!(store.get("a/b.json").await.unwrap(), None);
        store.put("a/b.json", b"one".to_vec()).await.unwrap();
        assert_eq!(
            store.get("a/b.json").await.unwrap().unwrap().as_ref(),
            b"one"
        );
        assert_eq!(store.size("a/b.json").await.unwrap(), Some(3));
        store.put("a/b.json", b"two!".to_vec()).await.unwrap();
        assert_eq!(store.size("a/b.json").await.unwrap(), Some(4));

        store.create("a/c", b"first".to_vec()).await.unwrap();
        let again = store.create("a/c", b"second".to_vec()).await;
        assert!(matches!(again, Err(StoreError::Exists { .. })), "{again:?}");
        assert_eq!(store.get("a/c").await.unwrap().unwrap().as_ref(), b"first");

        store.put("z/deep/er", b"x".to_vec()).await.unwrap();
        let mut keys: Vec<String> = store
            .list("a")
            .await
            .unwrap()
            .into_iter()
            .map(|e| e.key)
            .collect();
        keys.sort();
        assert_eq!(keys, ["a/b.json", "a/c"]);
        assert_eq!(store.list("").await.unwrap().len(), 3);
        assert!(store.list("nothing").await.unwrap().is_empty());

        let scoped = store.scoped("z").unwrap();
        assert_eq!(scoped.get("deep/er").await.unwrap().unwrap().as_ref(), b"x");
        let listed: Vec<String> = scoped
            .list("")
            .await
            .unwrap()
            .into_iter()
            .map(|e| e.key)
            .collect();
        assert_eq!(listed, ["deep/er"]);

        store.delete("a/c").await.unwrap();
        store.delete("a/c").await.unwrap();
        assert_eq!(store.get("a/c").await.unwrap(), None);

        assert!(matches!(store.get("").await, Err(StoreError::Key { .. })));
        assert!(matches!(
            store.get("a/../b").await,
            Err(StoreError::Key { .. })
        ));
    }

    #[test]
    fn memory_store_keeps_the_contract() {
        rt().block_on(async { contract(&Store::open("memory://").unwrap()).await });
    }

    #[test]
    fn directory_store_keeps_the_contract() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("objects");
        rt().block_on(async {
            contract(&Store::open(path.to_str().unwrap()).unwrap()).await;
            let url = format!("file://{}", dir.path().join("other").display());
            contract(&Store::open(&url).unwrap()).await;
        });
    }

    #[test]
    fn files_go_up_and_come_down_whole() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open("memory://").unwrap();
        let src = dir.path().join("src.bin");
        // Above the multipart threshold, with a tail that is not a whole part.
        let len = MULTIPART_THRESHOLD as usize + PART_BYTES / 3 + 7;
        let data: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
        std::fs::write(&src, &data).unwrap();
        rt().block_on(async {
            store.upload_file("big", &src).await.unwrap();
            assert_eq!(store.size("big").await.unwrap(), Some(len as u64));
            let dest = dir.path().join("out/dest.bin");
            assert_eq!(
                store.download_file("big", &dest).await.unwrap(),
                Some(len as u64)
            );
            assert!(std::fs::read(&dest).unwrap() == data);
            let missing = dir.path().join("missing.bin");
            assert_eq!(store.download_file("none", &missing).await.unwrap(), None);
            assert!(!missing.exists());
        });
    }

    #[test]
    fn addresses_are_checked() {
        assert!(matches!(
            Store::open("ftp://host/x"),
            Err(StoreError::Address { .. })
        ));
        assert!(matches!(
            Store::open("s3://"),
            Err(StoreError::Address { .. })
        ));
    }
}
