//! Fine-tuning: the durable records and blobs behind `/v1/files` (and, to come, the jobs
//! that train adapters from them). Below the server: nothing here knows HTTP, tenancy
//! beyond an owner name, or the engine.
//!
//! - [`data`]: the task-data JSONL formats and their per-line check (shared with
//!   `esft-train`)
//! - [`db`]: the records database (SQLite through sqlx, portable SQL)
//! - [`files`]: uploaded files: their records and their bytes under the data directory

pub mod data;
pub mod db;
pub mod files;
