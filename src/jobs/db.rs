//! The records database and its schema (plain SQL run at open; every statement is
//! idempotent): SQLite in `DATA_DIR/esft.db` (WAL mode, full fsync) by default, or the
//! PostgreSQL database `fine_tuning.database` names. One code path for both: sqlx's `Any`
//! driver, portable SQL (standard types, BIGINT and TEXT columns only, integers and text
//! bound and read, `$N` placeholders: written out, or by [`Sql`], as sqlx's `QueryBuilder`
//! writes `?` for `Any`, which PostgreSQL does not take). The one statement that must
//! differ is the job claim's row lock ([`Backend::claim_lock`]).
//!
//! Owns the connection settings and the schema; what the rows mean belongs to the modules
//! that read and write them.

use sqlx::any::{AnyConnectOptions, AnyPoolOptions};
use sqlx::sqlite::SqliteConnectOptions;
use sqlx::ConnectOptions;
use sqlx::Executor;
use sqlx::Row;
use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

/// The database behind the records (SQLite or PostgreSQL, chosen at open).
pub type Db = sqlx::Any;
pub type Pool = sqlx::Pool<Db>;
/// A row of either backend.
pub type DbRow = sqlx::any::AnyRow;

/// The database file inside the data directory.
pub const DB_FILE: &str = "esft.db";

/// Which database a pool talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

impl Backend {
    /// The backend `database` (a `fine_tuning.database` value) selects: `""` is SQLite in
    /// the data directory, a `postgres://` or `postgresql://` URL is PostgreSQL.
    pub fn of_setting(database: &str) -> Option<Self> {
        if database.is_empty() {
            Some(Backend::Sqlite)
        } else if database.starts_with("postgres://") || database.starts_with("postgresql://") {
            Some(Backend::Postgres)
        } else {
            None
        }
    }

    /// The backend of an open pool.
    pub fn of(pool: &Pool) -> Self {
        match pool.connect_options().database_url.scheme() {
            "postgres" | "postgresql" => Backend::Postgres,
            _ => Backend::Sqlite,
        }
    }

    /// What the claim's `SELECT` of the next queued job appends to lock that row.
    /// PostgreSQL: `FOR UPDATE SKIP LOCKED`, so processes claiming at once each lock a
    /// different row and none waits on another's. SQLite has no row locks and needs none:
    /// it has one writer at a time, so the claim's single `UPDATE` (which re-checks
    /// `status = 'queued'`) is atomic across processes as it stands.
    pub fn claim_lock(self) -> &'static str {
        match self {
            Backend::Postgres => " FOR UPDATE SKIP LOCKED",
            Backend::Sqlite => "",
        }
    }

    /// A statement that, run first in the schema's transaction, makes processes that open
    /// the database at once bring the schema up one after the other. PostgreSQL's
    /// `CREATE TABLE IF NOT EXISTS` run at once by two sessions can fail in both (the
    /// type's name is taken by the other's uncommitted table): a transaction-scoped
    /// advisory lock orders them. SQLite's transaction is already exclusive once it writes.
    fn schema_lock(self) -> Option<&'static str> {
        match self {
            Backend::Postgres => Some("SELECT 1 FROM pg_advisory_xact_lock(7262318)"),
            Backend::Sqlite => None,
        }
    }

    /// A query counting the columns named `$2` of the table `$1` (1 if it has one, 0 if
    /// not): the catalogue is the one thing the two databases name differently.
    fn column_count(self) -> &'static str {
        match self {
            Backend::Postgres => {
                "SELECT CAST(COUNT(*) AS BIGINT) AS n FROM information_schema.columns \
                 WHERE table_schema = current_schema() AND table_name = $1 AND column_name = $2"
            }
            Backend::Sqlite => "SELECT COUNT(*) AS n FROM pragma_table_info($1) WHERE name = $2",
        }
    }
}

/// A value bound to a statement built with [`Sql`]: the two types the records hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Bind {
    Int(Option<i64>),
    Text(Option<String>),
}

impl From<i64> for Bind {
    fn from(v: i64) -> Self {
        Bind::Int(Some(v))
    }
}

impl From<Option<i64>> for Bind {
    fn from(v: Option<i64>) -> Self {
        Bind::Int(v)
    }
}

impl From<String> for Bind {
    fn from(v: String) -> Self {
        Bind::Text(Some(v))
    }
}

impl From<&str> for Bind {
    fn from(v: &str) -> Self {
        Bind::Text(Some(v.to_string()))
    }
}

impl From<Option<String>> for Bind {
    fn from(v: Option<String>) -> Self {
        Bind::Text(v)
    }
}

/// A statement built piece by piece, its values bound as `$1`, `$2`, ... (which both
/// backends take).
#[derive(Debug, Clone, Default)]
pub struct Sql {
    text: String,
    binds: Vec<Bind>,
}

impl Sql {
    pub fn new(text: impl Into<String>) -> Self {
        Self {
            text: text.into(),
            binds: Vec::new(),
        }
    }

    /// Appends SQL text.
    pub fn push(&mut self, text: impl AsRef<str>) -> &mut Self {
        self.text.push_str(text.as_ref());
        self
    }

    /// Appends the placeholder of a new bound value.
    pub fn push_bind(&mut self, value: impl Into<Bind>) -> &mut Self {
        self.binds.push(value.into());
        let n = self.binds.len();
        self.text.push_str(&format!("${n}"));
        self
    }

    /// The statement's text (for tests and logs; it holds no values).
    pub fn text(&self) -> &str {
        &self.text
    }

    /// The statement, its values bound, to execute or fetch.
    pub fn build(&self) -> sqlx::query::Query<'_, Db, sqlx::any::AnyArguments<'_>> {
        self.binds
            .iter()
            .fold(sqlx::query(&self.text), |q, b| match b {
                Bind::Int(v) => q.bind(*v),
                Bind::Text(v) => q.bind(v.as_deref()),
            })
    }
}

/// The schema, in order. `owner` NULL is the admin (or an open server's caller).
const SCHEMA: &[&str] = &[
    "CREATE TABLE IF NOT EXISTS files (
        id TEXT PRIMARY KEY,
        owner TEXT,
        filename TEXT NOT NULL,
        purpose TEXT NOT NULL,
        bytes BIGINT NOT NULL,
        created_at BIGINT NOT NULL
    )",
    "CREATE INDEX IF NOT EXISTS files_by_owner ON files (owner, created_at, id)",
    "CREATE TABLE IF NOT EXISTS jobs (
        id TEXT PRIMARY KEY,
        owner TEXT,
        model TEXT NOT NULL,
        status TEXT NOT NULL,
        created_at BIGINT NOT NULL,
        started_at BIGINT,
        finished_at BIGINT,
        estimated_finish BIGINT,
        training_file TEXT NOT NULL,
        validation_file TEXT,
        suffix TEXT,
        seed BIGINT NOT NULL,
        metadata TEXT,
        spec TEXT NOT NULL,
        adapter TEXT NOT NULL,
        fine_tuned_model TEXT,
        trained_tokens BIGINT,
        error TEXT,
        esft TEXT
    )",
    "CREATE INDEX IF NOT EXISTS jobs_by_owner ON jobs (owner, created_at, id)",
    "CREATE INDEX IF NOT EXISTS jobs_by_status ON jobs (status, created_at, id)",
    "CREATE TABLE IF NOT EXISTS job_events (
        id TEXT PRIMARY KEY,
        job_id TEXT NOT NULL,
        seq BIGINT NOT NULL,
        created_at BIGINT NOT NULL,
        level TEXT NOT NULL,
        kind TEXT NOT NULL,
        message TEXT NOT NULL,
        data TEXT,
        UNIQUE (job_id, seq)
    )",
    // One row per owner ('' for the admin), updated to serialise that owner's quota
    // checks with the writes they allow, across every process sharing the database.
    "CREATE TABLE IF NOT EXISTS owner_locks (
        owner TEXT PRIMARY KEY,
        n BIGINT NOT NULL
    )",
    // Bytes of uploads in flight, counted in their owner's file quota until they are
    // recorded or given up (or expire, when the process that made one died).
    "CREATE TABLE IF NOT EXISTS file_reservations (
        id TEXT PRIMARY KEY,
        owner TEXT,
        bytes BIGINT NOT NULL,
        expires_at BIGINT NOT NULL
    )",
    // Tenants' adapters and the installs in flight that reserve room for one, counted in
    // the adapter quotas (see `adapter_quota`).
    "CREATE TABLE IF NOT EXISTS adapter_usage (
        owner TEXT NOT NULL,
        name TEXT NOT NULL,
        bytes BIGINT,
        pending_bytes BIGINT,
        pending_token TEXT,
        pending_until BIGINT,
        updated_at BIGINT NOT NULL,
        PRIMARY KEY (owner, name)
    )",
    "CREATE TABLE IF NOT EXISTS job_checkpoints (
        id TEXT PRIMARY KEY,
        job_id TEXT NOT NULL,
        step BIGINT NOT NULL,
        created_at BIGINT NOT NULL,
        metrics TEXT NOT NULL,
        model TEXT NOT NULL,
        UNIQUE (job_id, step)
    )",
    "CREATE TABLE IF NOT EXISTS job_metrics (
        job_id TEXT NOT NULL,
        step BIGINT NOT NULL,
        created_at BIGINT NOT NULL,
        train_loss DOUBLE PRECISION NOT NULL,
        valid_loss DOUBLE PRECISION,
        learning_rate DOUBLE PRECISION NOT NULL,
        tokens_per_s DOUBLE PRECISION NOT NULL,
        trained_tokens BIGINT NOT NULL,
        PRIMARY KEY (job_id, step)
    )",
    "CREATE INDEX IF NOT EXISTS jobs_by_finish ON jobs (finished_at)",
];

/// Columns added after the tables were first made: `(table, column, type)`, each added to a
/// database that lacks it when it is opened.
const ADDED_COLUMNS: &[(&str, &str, &str)] = &[
    // The worker holding a running job (`host/pid/random`), and until when (Unix
    // milliseconds): see `queue::JobStore::claim`.
    ("jobs", "worker", "TEXT"),
    ("jobs", "lease_expires_at", "BIGINT"),
    // How many training samples a file holds, counted when it was uploaded (NULL for files
    // uploaded before it was recorded: counted again when a job names them).
    ("files", "samples", "BIGINT"),
];

/// A quota's value per owner: `default`, or the owner's own where `owners` has one.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PerOwner {
    pub default: u64,
    pub owners: std::collections::HashMap<String, u64>,
}

impl PerOwner {
    /// The same value for everyone.
    pub fn all(default: u64) -> Self {
        Self {
            default,
            owners: Default::default(),
        }
    }

    /// `owner`'s value (`None`, the admin: the default).
    pub fn of(&self, owner: Option<&str>) -> u64 {
        owner
            .and_then(|o| self.owners.get(o))
            .copied()
            .unwrap_or(self.default)
    }
}

/// Takes `owner`'s lock (`None`: the admin) inside the transaction `tx`, until it ends:
/// a quota check made after it, and the write it allows, are not interleaved with another
/// one's of the same owner, in this process or any other sharing the database. (An
/// `UPDATE` of the owner's row: a row lock on PostgreSQL, the write lock on SQLite.)
pub async fn lock_owner(
    tx: &mut sqlx::Transaction<'_, Db>,
    owner: Option<&str>,
) -> Result<(), sqlx::Error> {
    let key = owner.unwrap_or("");
    sqlx::query("INSERT INTO owner_locks (owner, n) VALUES ($1, 0) ON CONFLICT (owner) DO NOTHING")
        .bind(key)
        .execute(&mut **tx)
        .await?;
    sqlx::query("UPDATE owner_locks SET n = n + 1 WHERE owner = $1")
        .bind(key)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

/// Unix seconds now: the time every record carries.
pub fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// Unix milliseconds now: the clock of leases.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// Opens the records database `database` names (see [`Backend::of_setting`]; for SQLite
/// the file in `data_dir`, created if missing) and brings its schema up.
pub async fn open(data_dir: &Path, database: &str) -> Result<Pool, sqlx::Error> {
    sqlx::any::install_default_drivers();
    let options = match Backend::of_setting(database) {
        Some(Backend::Sqlite) => {
            std::fs::create_dir_all(data_dir)?;
            // The URL form of the file's options (percent-encoded, `mode=rwc`).
            let url = SqliteConnectOptions::new()
                .filename(data_dir.join(DB_FILE))
                .create_if_missing(true)
                .to_url_lossy();
            AnyConnectOptions::from_url(&url)?
        }
        Some(Backend::Postgres) => AnyConnectOptions::from_str(database)?,
        None => {
            return Err(sqlx::Error::Configuration(
                "fine_tuning.database must be \"\" (SQLite in the data directory) or a \
                 postgres:// URL"
                    .into(),
            ))
        }
    };
    let pool = AnyPoolOptions::new()
        .max_connections(4)
        .acquire_timeout(Duration::from_secs(30))
        .after_connect(|conn, _| {
            Box::pin(async move {
                // SQLite: WAL (readers never wait on the writer), a full fsync per commit,
                // and waiting up to 10 s for another writer (another process included).
                if conn.backend_name().eq_ignore_ascii_case("sqlite") {
                    conn.execute(
                        "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL; \
                         PRAGMA busy_timeout = 10000;",
                    )
                    .await?;
                }
                Ok(())
            })
        })
        .connect_with(options)
        .await?;
    let mut tx = pool.begin().await?;
    if let Some(lock) = Backend::of(&pool).schema_lock() {
        sqlx::query(lock).execute(&mut *tx).await?;
    }
    for statement in SCHEMA {
        sqlx::query(statement).execute(&mut *tx).await?;
    }
    // Columns an older database lacks (under the same lock as the tables, so two
    // processes never both add one).
    let backend = Backend::of(&pool);
    for (table, column, kind) in ADDED_COLUMNS {
        let n: i64 = sqlx::query(backend.column_count())
            .bind(*table)
            .bind(*column)
            .fetch_one(&mut *tx)
            .await?
            .try_get("n")?;
        if n == 0 {
            sqlx::query(&format!("ALTER TABLE {table} ADD COLUMN {column} {kind}"))
                .execute(&mut *tx)
                .await?;
        }
    }
    tx.commit().await?;
    Ok(pool)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_setting_chooses_the_backend() {
        assert_eq!(Backend::of_setting(""), Some(Backend::Sqlite));
        assert_eq!(
            Backend::of_setting("postgres://u:p@h:5432/d"),
            Some(Backend::Postgres)
        );
        assert_eq!(
            Backend::of_setting("postgresql://h/d?sslmode=require"),
            Some(Backend::Postgres)
        );
        for bad in ["esft.db", "mysql://h/d", "sqlite://x.db", " postgres://h/d"] {
            assert_eq!(Backend::of_setting(bad), None, "{bad}");
        }
        assert_eq!(Backend::Postgres.claim_lock(), " FOR UPDATE SKIP LOCKED");
        assert_eq!(Backend::Sqlite.claim_lock(), "");
    }

    #[test]
    fn built_statements_number_their_placeholders() {
        let mut q = Sql::new("SELECT 1 FROM t WHERE a = ");
        q.push_bind(3i64)
            .push(" AND b = ")
            .push_bind("x")
            .push(" AND c IS ");
        q.push_bind(None::<String>);
        assert_eq!(
            q.text(),
            "SELECT 1 FROM t WHERE a = $1 AND b = $2 AND c IS $3"
        );
    }

    #[tokio::test]
    async fn opens_twice_in_wal_mode_and_keeps_rows() {
        let dir = tempfile::tempdir().unwrap();
        let pool = open(dir.path(), "").await.unwrap();
        let mode: String = sqlx::query("PRAGMA journal_mode")
            .fetch_one(&pool)
            .await
            .unwrap()
            .get(0);
        assert_eq!(mode, "wal");
        // Every connection of the pool (three held at once are three different ones): a full
        // fsync per commit, a 10 s wait for another writer.
        let mut held = Vec::new();
        for _ in 0..3 {
            let mut conn = pool.acquire().await.unwrap();
            let sync: i64 = sqlx::query("PRAGMA synchronous")
                .fetch_one(&mut *conn)
                .await
                .unwrap()
                .get(0);
            assert_eq!(sync, 2, "FULL");
            let busy: i64 = sqlx::query("PRAGMA busy_timeout")
                .fetch_one(&mut *conn)
                .await
                .unwrap()
                .get(0);
            assert_eq!(busy, 10_000);
            held.push(conn);
        }
        drop(held);
        sqlx::query(
            "INSERT INTO files (id, owner, filename, purpose, bytes, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind("file-x")
        .bind(None::<String>)
        .bind("a.jsonl")
        .bind("fine-tune")
        .bind(3i64)
        .bind(7i64)
        .execute(&pool)
        .await
        .unwrap();
        pool.close().await;
        // The schema statements run again without harm; the row is still there.
        let pool = open(dir.path(), "").await.unwrap();
        let row = sqlx::query("SELECT filename, bytes FROM files WHERE id = $1")
            .bind("file-x")
            .fetch_one(&pool)
            .await
            .unwrap();
        assert_eq!(row.get::<String, _>("filename"), "a.jsonl");
        assert_eq!(row.get::<i64, _>("bytes"), 3);
        // A data directory that cannot be made is an error, not a panic.
        let file = dir.path().join("plain-file");
        std::fs::write(&file, b"x").unwrap();
        assert!(open(&file.join("sub"), "").await.is_err());
    }
}
