//! The records database: `DATA_DIR/esft.db`, SQLite in WAL mode with full fsync, opened
//! through sqlx, and its schema (plain SQL run at open; every statement is idempotent).
//!
//! Every query in `jobs/` is portable SQL (standard types, `$N` placeholders or sqlx's
//! `QueryBuilder`, no SQLite-only syntax), so that [`Db`] is the one thing to change to
//! run the same code on PostgreSQL. Owns the connection settings and the schema; what the
//! rows mean belongs to the modules that read and write them.

use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use std::path::Path;
use std::time::Duration;

/// The database behind the records.
pub type Db = sqlx::Sqlite;
pub type Pool = sqlx::Pool<Db>;

/// The database file inside the data directory.
pub const DB_FILE: &str = "esft.db";

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
    "CREATE TABLE IF NOT EXISTS job_checkpoints (
        id TEXT PRIMARY KEY,
        job_id TEXT NOT NULL,
        step BIGINT NOT NULL,
        created_at BIGINT NOT NULL,
        metrics TEXT NOT NULL,
        model TEXT NOT NULL,
        UNIQUE (job_id, step)
    )",
];

/// Unix seconds now: the time every record carries.
pub fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// Opens (creating if missing) the database in `data_dir` and brings its schema up.
pub async fn open(data_dir: &Path) -> Result<Pool, sqlx::Error> {
    std::fs::create_dir_all(data_dir)?;
    let options = SqliteConnectOptions::new()
        .filename(data_dir.join(DB_FILE))
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Full)
        .busy_timeout(Duration::from_secs(10));
    let pool = SqlitePoolOptions::new()
        .max_connections(4)
        .connect_with(options)
        .await?;
    for statement in SCHEMA {
        sqlx::query(statement).execute(&pool).await?;
    }
    Ok(pool)
}

#[cfg(test)]
mod tests {
    use super::*;
    use sqlx::Row;

    #[tokio::test]
    async fn opens_twice_in_wal_mode_and_keeps_rows() {
        let dir = tempfile::tempdir().unwrap();
        let pool = open(dir.path()).await.unwrap();
        let mode: String = sqlx::query("PRAGMA journal_mode")
            .fetch_one(&pool)
            .await
            .unwrap()
            .get(0);
        assert_eq!(mode, "wal");
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
        let pool = open(dir.path()).await.unwrap();
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
        assert!(open(&file.join("sub")).await.is_err());
    }
}
