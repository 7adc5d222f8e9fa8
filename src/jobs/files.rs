//! Uploaded files: their records (the `files` table) and their bytes
//! (`DATA_DIR/files/<id>`, and with an object store configured also `files/<id>` there,
//! which every replica and worker reads).
//!
//! An upload is streamed by the caller into a [`FileStore::staging`] file inside the files
//! directory; [`FileStore::add`] checks it line by line as training data, checks the
//! owner's quota, fsyncs and renames it into place, and only then inserts its row. A
//! delete removes the row first, then the bytes. So a crash leaves at most bytes without a
//! row, never a row without its bytes, and [`FileStore::open`] removes such leftovers (and
//! unfinished uploads). With an object store, the bytes go up to the store (one whole
//! object) before the row is inserted, a delete removes the object after the row, and a
//! process that lacks a file's bytes locally fetches them from the store
//! ([`FileStore::local_path`]); the local copies are then a cache. An owner is a tenant's name, or `None` for the admin (and the
//! callers of a server without keys); who may see what is the caller's `visible_to`:
//! `None` sees every file, `Some(tenant)` only that tenant's. Knows nothing of HTTP.

use rand::distr::{Alphanumeric, SampleString};

use sqlx::Row;
use std::collections::HashSet;
use std::path::{Path, PathBuf};

use super::data::{check_train_file, LineError, DEFAULT_MAX_LINE_BYTES};
use super::db::{self, now, DbRow, PerOwner, Pool, Sql};
use super::lifecycle::Status;
use crate::store::{Store, StoreError};

/// The one purpose files are uploaded for today.
pub const PURPOSE_FINE_TUNE: &str = "fine-tune";

/// The directory of file bytes inside the data directory.
pub const FILES_DIR: &str = "files";

/// Unfinished uploads in the files directory start with this, then the tag of the
/// process writing them (see [`crate::util::tagged`]).
const STAGING_PREFIX: &str = ".upload-";

/// Bytes without a record are removed at open only once they are this old: a process
/// sharing the directory records a file right after putting its bytes in place (after
/// sending them to the object store, where there is one).
const UNRECORDED_GRACE: std::time::Duration = std::time::Duration::from_secs(3600);

/// A stored file's record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileRecord {
    /// `file-` and 24 letters and digits.
    pub id: String,
    /// The tenant; `None` for the admin.
    pub owner: Option<String>,
    pub filename: String,
    pub purpose: String,
    pub bytes: u64,
    /// Unix seconds.
    pub created_at: i64,
    /// Training samples (non-blank lines) counted at upload; `None` for a file uploaded
    /// before they were counted.
    pub samples: Option<u64>,
}

impl FileRecord {
    fn from_row(row: &DbRow) -> Result<Self, sqlx::Error> {
        Ok(Self {
            id: row.try_get("id")?,
            owner: row.try_get("owner")?,
            filename: row.try_get("filename")?,
            purpose: row.try_get("purpose")?,
            bytes: u64::try_from(row.try_get::<i64, _>("bytes")?).unwrap_or(0),
            created_at: row.try_get("created_at")?,
            samples: row
                .try_get::<Option<i64>, _>("samples")?
                .and_then(|n| u64::try_from(n).ok()),
        })
    }

    fn visible_to(&self, viewer: Option<&str>) -> bool {
        viewer.is_none() || self.owner.as_deref() == viewer
    }
}

const COLUMNS: &str = "id, owner, filename, purpose, bytes, created_at, samples";

#[derive(Debug, thiserror::Error)]
pub enum FilesError {
    /// The file is not training data (or is empty); nothing was stored.
    #[error("the file is not valid training data: {0}")]
    Invalid(LineError),
    /// Storing the file would take its owner past the quota.
    #[error("storing {size} more bytes would exceed the quota of {limit} bytes ({used} stored)")]
    Quota { used: u64, size: u64, limit: u64 },
    /// An active fine-tuning job (named) uses the file.
    #[error("the file is used by the fine-tuning job {0}, which is still active: cancel it or wait for it to end")]
    InUse(String),
    /// `after` names no file the caller may see.
    #[error("no file `{0}`")]
    NoSuchFile(String),
    /// Reading or writing the data directory (details for the log only: they name paths).
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// The object store failed (unreachable: worth retrying).
    #[error("{0}")]
    Store(#[from] StoreError),
    #[error("{0}")]
    Db(#[from] sqlx::Error),
}

/// Sort order of a listing, by creation time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Order {
    Asc,
    Desc,
}

/// One page of a listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Page {
    pub files: Vec<FileRecord>,
    pub has_more: bool,
}

pub struct FileStore {
    pool: Pool,
    dir: PathBuf,
    /// Where the bytes live for every machine (`None`: only in `dir`).
    store: Option<Store>,
    max_stored_bytes: PerOwner,
    /// Longest line of a training file.
    max_line_bytes: usize,
}

/// How long a reservation of quota for an upload holds if its process never gives it
/// back (it died): then it lapses.
const RESERVATION_SECONDS: i64 = 3600;

/// Bytes of an owner's file quota held for an upload in flight ([`FileStore::reserve`]):
/// given back when dropped, or turned into the file's own bytes by [`FileStore::add`].
pub struct Reservation {
    id: String,
    pool: Pool,
    owner: Option<String>,
    bytes: u64,
    settled: bool,
}

impl Reservation {
    /// The bytes held.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if self.settled {
            return;
        }
        let (pool, id) = (self.pool.clone(), self.id.clone());
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                if let Err(e) = sqlx::query("DELETE FROM file_reservations WHERE id = $1")
                    .bind(&id)
                    .execute(&pool)
                    .await
                {
                    tracing::warn!(
                        "giving back an upload's quota reservation: {e}; it lapses in an hour"
                    );
                }
            });
        }
    }
}

impl FileStore {
    /// Opens the data directory (creating it), the database, and removes what a crash may
    /// have left in the files directory: unfinished uploads and bytes without a record.
    pub async fn open(
        data_dir: &Path,
        database: &str,
        max_stored_bytes: u64,
    ) -> Result<Self, FilesError> {
        let dir = data_dir.join(FILES_DIR);
        std::fs::create_dir_all(&dir)?;
        let pool = db::open(data_dir, database).await?;
        let store = Self {
            pool,
            dir,
            store: None,
            max_stored_bytes: PerOwner::all(max_stored_bytes),
            max_line_bytes: DEFAULT_MAX_LINE_BYTES,
        };
        store.sweep().await?;
        Ok(store)
    }

    /// Owners whose quota of stored bytes is their own, not the default.
    pub fn with_owner_quotas(mut self, owners: std::collections::HashMap<String, u64>) -> Self {
        self.max_stored_bytes.owners = owners;
        self
    }

    /// Keeps the files' bytes in `store` too (under `files/<id>`); `None`: only locally.
    pub fn with_store(mut self, store: Option<Store>) -> Self {
        self.store = store;
        self
    }

    /// Refuses files with a line longer than `max` bytes (default
    /// [`DEFAULT_MAX_LINE_BYTES`]).
    pub fn with_max_line_bytes(mut self, max: usize) -> Self {
        self.max_line_bytes = max;
        self
    }

    /// The object store the bytes go to, if any.
    pub fn store(&self) -> Option<&Store> {
        self.store.as_ref()
    }

    async fn sweep(&self) -> Result<(), FilesError> {
        let known: HashSet<String> = sqlx::query("SELECT id FROM files")
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(|r| r.try_get::<String, _>("id"))
            .collect::<Result<_, _>>()?;
        let dir = self.dir.clone();
        let removed = blocking(move || {
            let mut removed = 0usize;
            for entry in std::fs::read_dir(&dir)? {
                let entry = entry?;
                let name = entry.file_name().to_string_lossy().into_owned();
                // Another live process's upload, or bytes it has just put in place and is
                // about to record, are left alone.
                let leftover = if name.starts_with(STAGING_PREFIX) {
                    crate::util::left_by_the_dead(&name, STAGING_PREFIX)
                } else {
                    !known.contains(&name)
                        && entry
                            .metadata()?
                            .modified()?
                            .elapsed()
                            .is_ok_and(|age| age > UNRECORDED_GRACE)
                };
                if leftover {
                    let path = entry.path();
                    if entry.file_type()?.is_dir() {
                        std::fs::remove_dir_all(&path)?;
                    } else {
                        std::fs::remove_file(&path)?;
                    }
                    removed += 1;
                }
            }
            Ok(removed)
        })
        .await?;
        if removed > 0 {
            tracing::info!(
                removed,
                "removed unfinished uploads and file bytes without a record"
            );
        }
        Ok(())
    }

    /// A new, empty temporary file in the files directory for an upload's bytes; it is
    /// removed when dropped unless [`Self::add`] keeps it.
    pub async fn staging(&self) -> Result<tempfile::NamedTempFile, FilesError> {
        let dir = self.dir.clone();
        blocking(move || {
            tempfile::Builder::new()
                .prefix(&crate::util::tagged(STAGING_PREFIX))
                .tempfile_in(&dir)
        })
        .await
    }

    /// Keeps the complete upload `staged` (`bytes` long, already flushed) as a new file of
    /// `owner`: refused, with nothing stored, when it is not training data or would take
    /// the owner past the quota. `reservation` (the quota [`Self::reserve`] held for the
    /// upload) is settled in the transaction that records the file.
    pub async fn add(
        &self,
        staged: tempfile::NamedTempFile,
        bytes: u64,
        owner: Option<&str>,
        filename: &str,
        purpose: &str,
        reservation: Option<Reservation>,
    ) -> Result<FileRecord, FilesError> {
        if let Some(r) = &reservation {
            if r.owner.as_deref() != owner {
                return Err(FilesError::Io(std::io::Error::other(
                    "a reservation of another owner's quota",
                )));
            }
        }
        if bytes == 0 {
            return Err(FilesError::Invalid(LineError {
                line: None,
                message: "the file is empty".into(),
            }));
        }
        let max_line = self.max_line_bytes;
        let (staged, samples) = blocking(move || {
            let file = std::fs::File::open(staged.path())?;
            match check_train_file(std::io::BufReader::new(file), max_line) {
                Ok(n) => Ok(Ok((staged, n))),
                Err(e) => Ok(Err(e)),
            }
        })
        .await?
        .map_err(FilesError::Invalid)?;

        let record = FileRecord {
            id: new_id(),
            owner: owner.map(str::to_string),
            filename: filename.to_string(),
            purpose: purpose.to_string(),
            bytes,
            created_at: now(),
            samples: Some(samples as u64),
        };
        let (dir, dest) = (self.dir.clone(), self.blob_path(&record.id));
        blocking(move || {
            staged.as_file().sync_all()?;
            staged.persist_noclobber(&dest).map_err(|e| e.error)?;
            std::fs::File::open(&dir)?.sync_all()
        })
        .await?;
        if let Some(store) = &self.store {
            if let Err(e) = store
                .upload_file(&object_key(&record.id), &self.blob_path(&record.id))
                .await
            {
                let _ = std::fs::remove_file(self.blob_path(&record.id));
                return Err(e.into());
            }
        }
        let inserted = self.record(&record, samples, reservation).await;
        if let Err(e) = inserted {
            let _ = std::fs::remove_file(self.blob_path(&record.id));
            if let Some(store) = &self.store {
                let _ = store.delete(&object_key(&record.id)).await;
            }
            return Err(e);
        }
        Ok(record)
    }

    /// Inserts the row of `record` in one transaction with its owner's quota check (its
    /// lock held: see [`db::lock_owner`]), settling `reservation` in the same step.
    async fn record(
        &self,
        record: &FileRecord,
        samples: usize,
        mut reservation: Option<Reservation>,
    ) -> Result<(), FilesError> {
        let owner = record.owner.as_deref();
        let mut tx = self.pool.begin().await?;
        db::lock_owner(&mut tx, owner).await?;
        if let Some(r) = &reservation {
            sqlx::query("DELETE FROM file_reservations WHERE id = $1")
                .bind(&r.id)
                .execute(&mut *tx)
                .await?;
        }
        let used = Self::committed_bytes(&mut tx, owner).await?;
        let limit = self.max_stored_bytes.of(owner);
        if used.saturating_add(record.bytes) > limit {
            return Err(FilesError::Quota {
                used,
                size: record.bytes,
                limit,
            });
        }
        sqlx::query(
            "INSERT INTO files (id, owner, filename, purpose, bytes, created_at, samples) \
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(&record.id)
        .bind(&record.owner)
        .bind(&record.filename)
        .bind(&record.purpose)
        .bind(i64::try_from(record.bytes).unwrap_or(i64::MAX))
        .bind(record.created_at)
        .bind(i64::try_from(samples).unwrap_or(i64::MAX))
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        if let Some(r) = &mut reservation {
            r.settled = true;
        }
        Ok(())
    }

    /// Bytes `owner`'s quota holds inside `tx`: its files, and its uploads' reservations
    /// that have not lapsed.
    async fn committed_bytes(
        tx: &mut sqlx::Transaction<'_, db::Db>,
        owner: Option<&str>,
    ) -> Result<u64, FilesError> {
        let key = owner.unwrap_or("");
        let row = sqlx::query(
            "SELECT CAST(COALESCE((SELECT SUM(bytes) FROM files WHERE COALESCE(owner, '') = $1), 0) \
             + COALESCE((SELECT SUM(bytes) FROM file_reservations \
             WHERE COALESCE(owner, '') = $1 AND expires_at > $2), 0) AS BIGINT) AS used",
        )
        .bind(key)
        .bind(now())
        .fetch_one(&mut **tx)
        .await?;
        Ok(u64::try_from(row.try_get::<i64, _>("used")?).unwrap_or(0))
    }

    /// Holds up to `wanted` bytes of `owner`'s quota for an upload about to stream (its
    /// declared size, at most the largest file): as much of it as the owner's files and
    /// uploads in flight leave, refused when they leave nothing. The upload may then store
    /// at most [`Reservation::bytes`]. Checked and held in one transaction, so uploads
    /// through any number of processes at once never pass the quota together.
    pub async fn reserve(
        &self,
        owner: Option<&str>,
        wanted: u64,
    ) -> Result<Reservation, FilesError> {
        let mut tx = self.pool.begin().await?;
        db::lock_owner(&mut tx, owner).await?;
        // Lapsed reservations (their process died) go; they no longer count anyway.
        sqlx::query("DELETE FROM file_reservations WHERE expires_at <= $1")
            .bind(now())
            .execute(&mut *tx)
            .await?;
        let used = Self::committed_bytes(&mut tx, owner).await?;
        let limit = self.max_stored_bytes.of(owner);
        let bytes = wanted.min(limit.saturating_sub(used));
        if bytes == 0 {
            return Err(FilesError::Quota {
                used,
                size: wanted,
                limit,
            });
        }
        let id = format!("rsv-{}", Alphanumeric.sample_string(&mut rand::rng(), 24));
        sqlx::query(
            "INSERT INTO file_reservations (id, owner, bytes, expires_at) VALUES ($1, $2, $3, $4)",
        )
        .bind(&id)
        .bind(owner)
        .bind(i64::try_from(bytes).unwrap_or(i64::MAX))
        .bind(now() + RESERVATION_SECONDS)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(Reservation {
            id,
            pool: self.pool.clone(),
            owner: owner.map(str::to_string),
            bytes,
            settled: false,
        })
    }

    /// Bytes of files `owner` keeps.
    pub async fn used_bytes(&self, owner: Option<&str>) -> Result<u64, FilesError> {
        let sum = "SELECT CAST(COALESCE(SUM(bytes), 0) AS BIGINT) AS used FROM files";
        let row = match owner {
            Some(o) => {
                sqlx::query(&format!("{sum} WHERE owner = $1"))
                    .bind(o)
                    .fetch_one(&self.pool)
                    .await?
            }
            None => {
                sqlx::query(&format!("{sum} WHERE owner IS NULL"))
                    .fetch_one(&self.pool)
                    .await?
            }
        };
        Ok(u64::try_from(row.try_get::<i64, _>("used")?).unwrap_or(0))
    }

    /// Bytes of stored files by owner (`None`: the admin).
    pub async fn bytes_by_owner(&self) -> Result<Vec<(Option<String>, u64)>, FilesError> {
        let rows = sqlx::query(
            "SELECT owner, CAST(SUM(bytes) AS BIGINT) AS used FROM files GROUP BY owner",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok((
                    r.try_get("owner")?,
                    u64::try_from(r.try_get::<i64, _>("used")?).unwrap_or(0),
                ))
            })
            .collect()
    }

    /// The file `id`, if `viewer` may see it (`None`: the admin, who sees every file).
    pub async fn get(
        &self,
        viewer: Option<&str>,
        id: &str,
    ) -> Result<Option<FileRecord>, FilesError> {
        let row = sqlx::query(&format!("SELECT {COLUMNS} FROM files WHERE id = $1"))
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        let record = row.as_ref().map(FileRecord::from_row).transpose()?;
        Ok(record.filter(|r| r.visible_to(viewer)))
    }

    /// The files `viewer` may see, `purpose` ones only when given, by creation time in
    /// `order`, at most `limit` of them, starting after the file `after`.
    pub async fn list(
        &self,
        viewer: Option<&str>,
        purpose: Option<&str>,
        after: Option<&str>,
        limit: usize,
        order: Order,
    ) -> Result<Page, FilesError> {
        let cursor = match after {
            Some(a) => Some(
                self.get(viewer, a)
                    .await?
                    .ok_or_else(|| FilesError::NoSuchFile(a.to_string()))?,
            ),
            None => None,
        };
        let mut q = Sql::new(format!("SELECT {COLUMNS} FROM files WHERE 1 = 1"));
        if let Some(v) = viewer {
            q.push(" AND owner = ").push_bind(v.to_string());
        }
        if let Some(p) = purpose {
            q.push(" AND purpose = ").push_bind(p.to_string());
        }
        let (cmp, dir) = match order {
            Order::Asc => (">", "ASC"),
            Order::Desc => ("<", "DESC"),
        };
        if let Some(c) = cursor {
            q.push(format!(" AND (created_at {cmp} "))
                .push_bind(c.created_at)
                .push(" OR (created_at = ")
                .push_bind(c.created_at)
                .push(format!(" AND id {cmp} "))
                .push_bind(c.id)
                .push("))");
        }
        q.push(format!(" ORDER BY created_at {dir}, id {dir} LIMIT "))
            .push_bind(i64::try_from(limit.saturating_add(1)).unwrap_or(i64::MAX));
        let rows = q.build().fetch_all(&self.pool).await?;
        let mut files = rows
            .iter()
            .map(FileRecord::from_row)
            .collect::<Result<Vec<_>, _>>()?;
        let has_more = files.len() > limit;
        files.truncate(limit);
        Ok(Page { files, has_more })
    }

    /// Deletes the file `id` if `viewer` may see it: its record, then its bytes.
    pub async fn delete(
        &self,
        viewer: Option<&str>,
        id: &str,
    ) -> Result<Option<FileRecord>, FilesError> {
        let Some(record) = self.get(viewer, id).await? else {
            return Ok(None);
        };
        // One statement: the file goes only while no active job names it, so a job being
        // created either sees the file or is refused (see `queue::JobStore::create`).
        let active = Status::sql_list(&Status::ACTIVE);
        let deleted = sqlx::query(&format!(
            "DELETE FROM files WHERE id = $1 AND NOT EXISTS (SELECT 1 FROM jobs \
             WHERE status IN {active} AND (training_file = $1 OR validation_file = $1))",
        ))
        .bind(id)
        .execute(&self.pool)
        .await?;
        if deleted.rows_affected() == 0 {
            let job = sqlx::query(&format!(
                "SELECT id FROM jobs WHERE status IN {active} \
                 AND (training_file = $1 OR validation_file = $1)",
            ))
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
            return match job {
                Some(row) => Err(FilesError::InUse(row.try_get("id")?)),
                // Deleted meanwhile by another request.
                None => Ok(None),
            };
        }
        let path = self.blob_path(id);
        blocking(move || match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                // The record is gone; the next start removes the bytes.
                tracing::warn!("removing {}: {e}", path.display());
                Ok(())
            }
            _ => Ok(()),
        })
        .await?;
        if let Some(store) = &self.store {
            if let Err(e) = store.delete(&object_key(id)).await {
                // The record is gone, so nothing reads the object any more.
                tracing::warn!("removing the stored bytes of {id}: {e}");
            }
        }
        Ok(Some(record))
    }

    /// A local path holding the bytes of the file `id` (a record the caller has): its
    /// local copy, fetched from the object store first where this process lacks it.
    pub async fn local_path(&self, id: &str) -> Result<PathBuf, FilesError> {
        let path = self.blob_path(id);
        if let Some(store) = &self.store {
            if !tokio::fs::try_exists(&path).await.unwrap_or(false)
                && store.download_file(&object_key(id), &path).await?.is_none()
            {
                return Err(FilesError::Io(std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    format!("{}: no such object", store.url()),
                )));
            }
        }
        Ok(path)
    }

    /// How many training samples the file of `record` holds: as counted at upload, or for
    /// an older file counted now from its bytes (fetched from the object store where this
    /// process lacks them).
    pub async fn samples(
        &self,
        record: &FileRecord,
    ) -> Result<Result<usize, LineError>, FilesError> {
        if let Some(n) = record.samples {
            return Ok(Ok(usize::try_from(n).unwrap_or(usize::MAX)));
        }
        let path = self.local_path(&record.id).await?;
        let max_line = self.max_line_bytes;
        blocking(move || {
            let file = std::fs::File::open(&path)?;
            Ok(check_train_file(std::io::BufReader::new(file), max_line))
        })
        .await
    }

    /// The records database (jobs keep their records beside the files').
    pub fn pool(&self) -> Pool {
        self.pool.clone()
    }

    /// Where the bytes of file `id` are.
    pub fn blob_path(&self, id: &str) -> PathBuf {
        self.dir.join(id)
    }
}

/// The key of a file's bytes in the object store.
pub fn object_key(id: &str) -> String {
    format!("{FILES_DIR}/{id}")
}

/// `file-` and 24 random letters and digits.
pub fn new_id() -> String {
    format!("file-{}", Alphanumeric.sample_string(&mut rand::rng(), 24))
}

/// Runs filesystem work on the blocking pool.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> Result<T, FilesError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| FilesError::Io(std::io::Error::other(e.to_string())))?
        .map_err(FilesError::Io)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    const LINE: &str = "{\"prompt\": \"a\", \"completion\": \"b\"}\n";

    async fn staged(store: &FileStore, text: &[u8]) -> tempfile::NamedTempFile {
        let mut t = store.staging().await.unwrap();
        t.write_all(text).unwrap();
        t
    }

    async fn add(
        store: &FileStore,
        owner: Option<&str>,
        text: &str,
    ) -> Result<FileRecord, FilesError> {
        let t = staged(store, text.as_bytes()).await;
        store
            .add(
                t,
                text.len() as u64,
                owner,
                "t.jsonl",
                PURPOSE_FINE_TUNE,
                None,
            )
            .await
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[tokio::test]
    async fn files_are_kept_listed_owned_and_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::open(dir.path(), "", 1 << 20).await.unwrap();
        let a = add(&store, Some("acme"), LINE).await.unwrap();
        assert!(a.id.starts_with("file-") && a.id.len() == 29, "{}", a.id);
        assert!(a.id[5..].bytes().all(|b| b.is_ascii_alphanumeric()));
        assert_eq!(a.bytes, LINE.len() as u64);
        assert_eq!(
            std::fs::read(store.blob_path(&a.id)).unwrap(),
            LINE.as_bytes()
        );
        let b = add(&store, None, LINE).await.unwrap();
        // Tenancy: a tenant sees its own, the admin (None) sees all.
        assert_eq!(
            store.get(Some("acme"), &a.id).await.unwrap(),
            Some(a.clone())
        );
        assert_eq!(store.get(Some("globex"), &a.id).await.unwrap(), None);
        assert_eq!(store.get(Some("acme"), &b.id).await.unwrap(), None);
        assert!(store.get(None, &a.id).await.unwrap().is_some());
        let all = store.list(None, None, None, 10, Order::Asc).await.unwrap();
        assert_eq!(all.files.len(), 2);
        assert!(!all.has_more);
        let mine = store
            .list(Some("acme"), None, None, 10, Order::Desc)
            .await
            .unwrap();
        assert_eq!(mine.files, vec![a.clone()]);
        assert_eq!(store.used_bytes(Some("acme")).await.unwrap(), a.bytes);
        assert_eq!(store.used_bytes(None).await.unwrap(), b.bytes);
        assert_eq!(store.used_bytes(Some("nobody")).await.unwrap(), 0);
        assert!(matches!(
            store
                .list(Some("globex"), None, Some(&a.id), 10, Order::Asc)
                .await,
            Err(FilesError::NoSuchFile(_))
        ));
        // Another tenant cannot delete it; its owner can, and the bytes go too.
        assert_eq!(store.delete(Some("globex"), &a.id).await.unwrap(), None);
        assert_eq!(
            store.delete(Some("acme"), &a.id).await.unwrap(),
            Some(a.clone())
        );
        assert!(!store.blob_path(&a.id).exists());
        assert_eq!(store.get(None, &a.id).await.unwrap(), None);
        assert_eq!(names(&store.dir), vec![b.id.clone()]);
    }

    #[tokio::test]
    async fn refused_files_leave_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::open(dir.path(), "", 2 * LINE.len() as u64)
            .await
            .unwrap();
        for bad in [
            "",
            "not json\n",
            "{\"messages\": [{\"role\": \"system\", \"content\": \"x\"}]}",
        ] {
            assert!(
                matches!(
                    add(&store, Some("acme"), bad).await,
                    Err(FilesError::Invalid(_))
                ),
                "{bad:?}"
            );
        }
        add(&store, Some("acme"), LINE).await.unwrap();
        add(&store, Some("acme"), LINE).await.unwrap();
        let over = add(&store, Some("acme"), LINE).await.unwrap_err();
        assert!(matches!(over, FilesError::Quota { used, .. } if used == 2 * LINE.len() as u64));
        // The quota is per owner.
        add(&store, Some("globex"), LINE).await.unwrap();
        assert_eq!(names(&store.dir).len(), 3);
        assert_eq!(
            store
                .list(None, None, None, 100, Order::Desc)
                .await
                .unwrap()
                .files
                .len(),
            3
        );
    }

    #[tokio::test]
    async fn pages_follow_the_order_and_the_cursor() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::open(dir.path(), "", 1 << 20).await.unwrap();
        let mut ids = Vec::new();
        for _ in 0..5 {
            ids.push(add(&store, Some("acme"), LINE).await.unwrap().id);
        }
        let asc = store
            .list(Some("acme"), None, None, 100, Order::Asc)
            .await
            .unwrap();
        let asc: Vec<String> = asc.files.into_iter().map(|f| f.id).collect();
        let mut walked = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let page = store
                .list(
                    Some("acme"),
                    Some(PURPOSE_FINE_TUNE),
                    after.as_deref(),
                    2,
                    Order::Asc,
                )
                .await
                .unwrap();
            walked.extend(page.files.iter().map(|f| f.id.clone()));
            after = page.files.last().map(|f| f.id.clone());
            if !page.has_more {
                break;
            }
        }
        assert_eq!(walked, asc);
        let desc = store
            .list(Some("acme"), None, None, 100, Order::Desc)
            .await
            .unwrap();
        let mut rev: Vec<String> = desc.files.into_iter().map(|f| f.id).collect();
        rev.reverse();
        assert_eq!(rev, asc);
        let other = store
            .list(Some("acme"), Some("assistants"), None, 100, Order::Desc)
            .await
            .unwrap();
        assert!(other.files.is_empty() && !other.has_more);
    }

    #[tokio::test]
    async fn with_a_store_the_bytes_go_there_first_and_come_back_from_there() {
        let store = Store::open("memory://").unwrap();
        let (one, two) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let db = one.path().join("shared");
        // Two processes' file stores on one database, each with its own files directory.
        let first = FileStore::open(&db, "", 1 << 20)
            .await
            .unwrap()
            .with_store(Some(store.clone()));
        let a = add(&first, Some("acme"), LINE).await.unwrap();
        assert_eq!(
            store
                .get(&object_key(&a.id))
                .await
                .unwrap()
                .unwrap()
                .as_ref(),
            LINE.as_bytes()
        );
        let second = FileStore {
            pool: first.pool(),
            dir: two.path().join(FILES_DIR),
            store: Some(store.clone()),
            max_stored_bytes: PerOwner::all(1 << 20),
            max_line_bytes: DEFAULT_MAX_LINE_BYTES,
        };
        assert!(!second.blob_path(&a.id).exists());
        let fetched = second.local_path(&a.id).await.unwrap();
        assert_eq!(std::fs::read(&fetched).unwrap(), LINE.as_bytes());
        // A refused file reaches neither the store nor the records.
        assert!(add(&first, Some("acme"), "not json\n").await.is_err());
        assert_eq!(store.list(FILES_DIR).await.unwrap().len(), 1);
        // A delete removes the object too.
        assert!(second.delete(Some("acme"), &a.id).await.unwrap().is_some());
        assert_eq!(store.get(&object_key(&a.id)).await.unwrap(), None);
        assert!(second.local_path(&a.id).await.is_err());
    }

    #[tokio::test]
    async fn reopening_keeps_records_and_sweeps_leftovers() {
        let dir = tempfile::tempdir().unwrap();
        let host = crate::util::hostname();
        let (kept, live) = {
            let store = FileStore::open(dir.path(), "", 1 << 20).await.unwrap();
            let kept = add(&store, Some("acme"), LINE).await.unwrap();
            // What a crash could leave: an unfinished upload of a process that is gone
            // (no process has that pid), bytes whose row never came (an hour ago).
            let (_, half) = staged(&store, b"half").await.keep().unwrap();
            let dead = format!("{STAGING_PREFIX}{host}@2147483646@gone0000-abc");
            std::fs::rename(&half, store.dir.join(dead)).unwrap();
            let orphan = store.blob_path(&new_id());
            std::fs::write(&orphan, LINE).unwrap();
            let hour_ago = std::time::SystemTime::now() - UNRECORDED_GRACE * 2;
            std::fs::File::options()
                .write(true)
                .open(&orphan)
                .unwrap()
                .set_modified(hour_ago)
                .unwrap();
            // What a live process sharing the directory is doing: an upload (this
            // process's), bytes it has just put in place.
            let (_, live) = staged(&store, b"live").await.keep().unwrap();
            let fresh = store.blob_path(&new_id());
            std::fs::write(&fresh, LINE).unwrap();
            assert_eq!(names(&store.dir).len(), 5);
            (kept, [live, fresh])
        };
        let store = FileStore::open(dir.path(), "", 1 << 20).await.unwrap();
        let mut want = vec![kept.id.clone()];
        want.extend(
            live.iter()
                .map(|p| p.file_name().unwrap().to_string_lossy().into_owned()),
        );
        want.sort();
        let mut got = names(&store.dir);
        got.sort();
        assert_eq!(got, want);
        assert_eq!(store.get(Some("acme"), &kept.id).await.unwrap(), Some(kept));
    }
}
