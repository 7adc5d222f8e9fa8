//! `esft-serve worker`: the fine-tuning runner of a server without the server. It claims
//! jobs from the records database the config names (PostgreSQL, for workers on other
//! machines than the replicas), trains them with `esft-train` children, keeps their
//! checkpoints in the object store of `[store]`, and publishes their adapters to the
//! registry there (without a store: installs them in the adapter directory `adapters`); on SIGTERM it gives its running jobs back to the queue and exits,
//! and a worker killed outright loses them when its lease expires (see
//! [`crate::jobs::runner`]). No HTTP, no engine: the model directory is only read for its
//! config and tensor shapes (to check adapters as serving will).

use anyhow::Context;
use std::sync::Arc;
use std::time::Duration;

use super::auth::Auth;
use super::config::ServerConfig;
use crate::adapter::{AdapterRegistry, AdapterStats, AdapterStore, BaseModel};
use crate::jobs::files::FileStore;
use crate::jobs::queue::JobStore;
use crate::jobs::runner::{Runner, RunnerConfig};

/// How long a stopping worker waits for its children to end and its jobs to be released.
const RELEASE_WAIT: Duration = Duration::from_secs(30);

/// Runs the worker until SIGTERM / Ctrl-C; `jobs`: jobs trained at once (at least one).
pub async fn run(config: ServerConfig, jobs_at_once: usize) -> anyhow::Result<()> {
    let ft = &config.fine_tuning;
    let store = config.store.open().map_err(anyhow::Error::msg)?;
    let files = FileStore::open(&ft.data_dir, &ft.database, ft.max_stored_bytes_per_tenant)
        .await
        .with_context(|| {
            format!(
                "opening the fine-tuning data directory {}",
                ft.data_dir.display()
            )
        })?
        .with_store(store.clone())
        .with_max_line_bytes(config.limits.max_line_bytes);
    let files = Arc::new(files);
    let jobs = Arc::new(JobStore::new(files.pool(), ft.max_active_jobs_per_tenant));
    let model_dir = config
        .model
        .clone()
        .context("no model directory configured")?;
    let base = BaseModel::open(&model_dir)
        .with_context(|| format!("reading the model {}", model_dir.display()))?;
    // Adapters are checked in the dtype the replicas hold them in.
    let dtype = crate::model::LoadOptions::named("cpu", &config.dtype, Some(&config.weight_dtype))?
        .matrices();
    let adapters = AdapterStore::open_with(&config.adapters, Auth::policy(&config.auth))
        .with_context(|| {
            format!(
                "opening the adapters directory {}",
                config.adapters.display()
            )
        })?;
    let registry = AdapterRegistry::new(
        adapters,
        Arc::new(base),
        dtype,
        config.engine.host_cache_bytes,
        Arc::new(AdapterStats::default()),
    );
    // With a shared store, finished adapters are published to its registry, where every
    // replica finds them; the directory is then only a staging area and cache.
    let registry = Arc::new(match &store {
        Some(shared) => {
            let remote = crate::adapter::remote::Remote::open(shared)
                .context("opening the adapter registry in the object store")?;
            registry.with_remote(remote, config.engine.cache_settings())
        }
        None => registry,
    });
    let cfg = RunnerConfig {
        data_dir: ft.data_dir.clone(),
        trainer: ft.trainer_path(),
        model_dir,
        max_concurrent: jobs_at_once.max(1),
        threads: ft.threads(),
        nice: ft.training_nice,
        save_every: ft.save_every_steps,
        slot_budget: usize::try_from(config.engine.device_slot_bytes).unwrap_or(usize::MAX),
        lease: ft.lease(),
        poll: ft.poll(),
        min_free_disk_bytes: config.limits.min_free_disk_bytes,
        max_job: ft.max_job(),
        retain: ft.retain(),
        // A worker serves no HTTP: no previews.
        max_previews: 0,
        preview_timeout: ft.preview_timeout(),
    };
    let quota =
        crate::jobs::adapter_quota::AdapterQuota::new(files.pool(), config.adapter_limits());
    let runner = Runner::start(jobs, files, registry, quota, cfg)
        .await
        .context("starting the fine-tuning runner")?;
    tracing::info!(
        worker = runner.worker(),
        "worker ready: claiming fine-tuning jobs"
    );
    super::termination().await;
    tracing::info!(
        running = runner.running(),
        "stopping: giving the running jobs back to the queue"
    );
    runner.shutdown(RELEASE_WAIT).await;
    tracing::info!("stopped");
    Ok(())
}
