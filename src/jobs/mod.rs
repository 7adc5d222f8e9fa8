//! Fine-tuning: the durable records and blobs behind `/v1/files` and
//! `/v1/fine_tuning/jobs`, and the runner that trains jobs into adapters. Below the
//! server, above the adapter store (a finished job installs its adapter there): nothing
//! here knows HTTP, tenancy beyond an owner name, or the engine.
//!
//! - [`adapter_quota`]: tenants' adapter quotas, a ledger of their adapters in the records
//!   database
//! - [`contract`]: the contract with `esft-train`: work-directory names, command lines,
//!   the JSON lines it prints (shared with `esft-train`)
//! - [`data`]: the task-data JSONL formats and their per-line check (shared with
//!   `esft-train`)
//! - [`db`]: the records database (SQLite or PostgreSQL, one portable SQL through sqlx)
//! - [`files`]: uploaded files: their records and their bytes (the data directory, and the
//!   object store where one is configured)
//! - [`lifecycle`]: a job's statuses and the transition table (from, to, who, event)
//! - [`queue`]: fine-tuning jobs' records, events and checkpoints, the queue order and the
//!   leases of running jobs
//! - [`runner`]: runs jobs as `esft-train` child processes and installs their adapters

pub mod adapter_quota;
pub mod contract;
pub mod data;
pub mod db;
pub mod files;
pub mod lifecycle;
pub mod queue;
pub mod runner;
