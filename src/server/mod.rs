//! `esft-serve serve`: the OpenAI-compatible HTTP server.
//!
//! - [`config`]: the TOML file and flags
//! - [`auth`]: API keys, tenants, adapter ownership
//! - [`openai`]: request bodies -> engine plans; [`generate`]: engine events -> JSON / SSE
//! - [`completions`], [`models`], [`admin`], [`files`], [`fine_tuning`], [`gateway`]: the
//!   routes
//! - [`metrics`]: Prometheus text; [`errors`]: OpenAI-shaped errors; [`body`]: reading
//!   request bodies (size limit, idle timeout)
//! - [`listen`]: the accept loop and HTTP/1.1 connections, every request head checked
//! - [`worker`]: `esft-serve worker`, the fine-tuning runner without HTTP

pub mod admin;
pub mod auth;
pub mod body;
pub mod completions;
pub mod config;
pub mod errors;
pub mod files;
pub mod fine_tuning;
pub mod gateway;
pub mod generate;
pub mod listen;
pub mod metrics;
pub mod models;
pub mod objects;
pub mod openai;
pub mod worker;

use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use candle_core::DType;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use crate::adapter::{AdapterRegistry, AdapterStats, AdapterStore, BaseModel};
use crate::engine::{Engine, EngineConfig};
use crate::jobs::adapter_quota::AdapterQuota;
use crate::jobs::files::FileStore;
use crate::jobs::queue::JobStore;
use crate::jobs::runner::{Runner, RunnerConfig};
use crate::model::LoadedModel;
use auth::Auth;
use config::ServerConfig;
use errors::ApiError;
use metrics::Metrics;

/// The model being served, once loaded.
pub struct Served {
    pub engine: Arc<Engine>,
    pub base_id: String,
    pub max_context: usize,
    pub created: u64,
    /// The dtype adapter experts are loaded in (the base's matrix dtype).
    pub dtype: DType,
}

pub struct AppState {
    pub config: ServerConfig,
    pub auth: Auth,
    pub metrics: Metrics,
    served: OnceLock<Arc<Served>>,
    /// Uploaded files and their records, opened at the first use (`run` opens it at
    /// startup).
    files: tokio::sync::OnceCell<Arc<FileStore>>,
    /// Fine-tuning jobs' records (in the files' database).
    jobs: tokio::sync::OnceCell<Arc<JobStore>>,
    /// Runs jobs; started once the model is loaded.
    runner: tokio::sync::OnceCell<Arc<Runner>>,
    /// Tenants' adapter quotas (in the files' database), reconciled with the adapter store
    /// when first opened.
    quota: tokio::sync::OnceCell<AdapterQuota>,
    draining: AtomicBool,
}

impl AppState {
    pub fn new(config: ServerConfig) -> Result<Self, String> {
        Ok(Self {
            auth: Auth::new(&config.auth, &config.metrics),
            metrics: Metrics::new().map_err(|e| e.to_string())?,
            config,
            served: OnceLock::new(),
            files: tokio::sync::OnceCell::new(),
            jobs: tokio::sync::OnceCell::new(),
            runner: tokio::sync::OnceCell::new(),
            quota: tokio::sync::OnceCell::new(),
            draining: AtomicBool::new(false),
        })
    }

    /// The file store in `fine_tuning.data_dir`, opened (and swept) on first use.
    pub async fn open_files(&self) -> anyhow::Result<Arc<FileStore>> {
        let ft = &self.config.fine_tuning;
        let store = self
            .files
            .get_or_try_init(|| async {
                let store = self.config.store.open().map_err(anyhow::Error::msg)?;
                FileStore::open(&ft.data_dir, &ft.database, ft.max_stored_bytes_per_tenant)
                    .await
                    .map(|f| {
                        Arc::new(
                            f.with_store(store)
                                .with_max_line_bytes(self.config.limits.max_line_bytes)
                                .with_owner_quotas(self.config.file_quotas()),
                        )
                    })
                    .map_err(anyhow::Error::from)
            })
            .await
            .map_err(|e| {
                anyhow::anyhow!(
                    "opening the fine-tuning data directory {}: {e}",
                    ft.data_dir.display()
                )
            })?;
        Ok(store.clone())
    }

    /// The file store, for a request: 500 (the details logged) when it cannot be opened.
    pub async fn files(&self) -> Result<Arc<FileStore>, ApiError> {
        self.open_files()
            .await
            .map_err(|e| ApiError::logged("opening the files database", &e))
    }

    /// The jobs' records, for a request.
    pub async fn jobs(&self) -> Result<Arc<JobStore>, ApiError> {
        let files = self.files().await?;
        let max = self.config.fine_tuning.max_active_jobs_per_tenant;
        Ok(self
            .jobs
            .get_or_init(|| async move {
                Arc::new(
                    JobStore::new(files.pool(), max).with_owner_quotas(self.config.job_quotas()),
                )
            })
            .await
            .clone())
    }

    /// The tenants' adapter quotas, opened on first use once the model is loaded (the
    /// loader opens them at startup): the ledger is first reconciled with what the adapter
    /// store holds (see [`AdapterQuota::reconcile`]); where that fails (the store does not
    /// answer), the next use tries again.
    pub async fn adapter_quota(&self) -> Result<AdapterQuota, ApiError> {
        let served = self.served()?;
        let files = self.files().await?;
        let quota = self
            .quota
            .get_or_try_init(|| async {
                let quota = AdapterQuota::new(files.pool(), self.config.adapter_limits());
                let listed_at = crate::jobs::db::now_ms();
                let present = admin::tenant_adapters(&served).await?;
                quota
                    .reconcile(&present, listed_at)
                    .await
                    .map_err(|e| ApiError::logged("reconciling the adapter quotas", &e))?;
                tracing::info!(
                    adapters = present.len(),
                    "adapter quotas reconciled with the adapter store"
                );
                Ok::<_, ApiError>(quota)
            })
            .await?;
        Ok(quota.clone())
    }

    /// The job runner, started on first use once the model is loaded (jobs a previous
    /// process left running go back to the queue then); 503 while the model loads.
    pub async fn runner(&self) -> Result<Arc<Runner>, ApiError> {
        let served = self.served()?;
        let runner = self
            .runner
            .get_or_try_init(|| async {
                let ft = &self.config.fine_tuning;
                let cfg = RunnerConfig {
                    data_dir: ft.data_dir.clone(),
                    trainer: ft.trainer_path(),
                    model_dir: self.config.model.clone().unwrap_or_default(),
                    max_concurrent: ft.max_concurrent_jobs,
                    threads: ft.threads(),
                    nice: ft.training_nice,
                    save_every: ft.save_every_steps,
                    slot_budget: served.engine.config.device_slot_bytes,
                    lease: ft.lease(),
                    poll: ft.poll(),
                    min_free_disk_bytes: self.config.limits.min_free_disk_bytes,
                    max_job: ft.max_job(),
                    retain: ft.retain(),
                    max_previews: ft.previews(),
                    preview_timeout: ft.preview_timeout(),
                };
                let jobs = self.jobs().await?;
                let files = self.files().await?;
                let quota = self.adapter_quota().await?;
                Runner::start(jobs, files, served.engine.registry.clone(), quota, cfg)
                    .await
                    .map_err(|e| ApiError::logged("starting the fine-tuning runner", &e))
            })
            .await?;
        Ok(runner.clone())
    }

    /// The runner if it has started.
    pub fn started_runner(&self) -> Option<Arc<Runner>> {
        self.runner.get().cloned()
    }

    /// The loaded model; 503 while it loads or once the server drains.
    pub fn served(&self) -> Result<Arc<Served>, ApiError> {
        if self.draining.load(Ordering::Relaxed) {
            return Err(ApiError::unavailable("the server is shutting down").code("shutting_down"));
        }
        self.served
            .get()
            .cloned()
            .ok_or_else(|| ApiError::unavailable("the model is still loading").code("loading"))
    }

    pub fn set_served(&self, s: Arc<Served>) {
        let _ = self.served.set(s);
    }

    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::Relaxed);
    }

    pub fn engine(&self) -> Option<Arc<Engine>> {
        self.served.get().map(|s| s.engine.clone())
    }
}

/// The id of the base model: the configured one or the model directory's name.
pub fn base_id(config: &ServerConfig, dir: &std::path::Path) -> String {
    if !config.model_id.is_empty() {
        return config.model_id.clone();
    }
    std::fs::canonicalize(dir)
        .ok()
        .as_deref()
        .unwrap_or(dir)
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("model")
        .to_string()
}

/// Loads the model and starts the engine (blocking).
pub fn load(config: &ServerConfig) -> anyhow::Result<Served> {
    use anyhow::Context;
    let dir = config
        .model
        .clone()
        .context("no model directory configured")?;
    let opts = crate::model::LoadOptions::named(
        &config.device,
        &config.dtype,
        Some(&config.weight_dtype),
    )?;
    // Adapters' experts are held like the base's matrices.
    let dtype = opts.matrices();
    let loaded =
        LoadedModel::load(&dir, &opts).with_context(|| format!("loading {}", dir.display()))?;
    let model_ctx = loaded.max_context();
    let max_context = match config.engine.max_context {
        0 => model_ctx,
        n => n.min(model_ctx),
    };
    let base = Arc::new(BaseModel::new(
        loaded.model.config().clone(),
        loaded.store.clone(),
    ));
    let store = AdapterStore::open_with(&config.adapters, Auth::policy(&config.auth))
        .with_context(|| {
            format!(
                "opening the adapters directory {}",
                config.adapters.display()
            )
        })?;
    let registry = AdapterRegistry::new(
        store,
        base,
        dtype,
        config.engine.host_cache_bytes,
        Arc::new(AdapterStats::default()),
    );
    // With a shared store, it is the adapters' authority and the directory its cache.
    let registry = match config.store.open().map_err(anyhow::Error::msg)? {
        Some(shared) => {
            let remote = crate::adapter::remote::Remote::open(&shared)
                .context("opening the adapter registry in the object store")?;
            tracing::info!(registry = remote.url(), cache = %config.adapters.display(), "adapters: object-store registry with a local disk cache");
            registry.with_remote(remote, config.engine.cache_settings())
        }
        None => registry,
    };
    let registry = Arc::new(registry);
    let e = &config.engine;
    let engine = Engine::start(
        loaded.model,
        Arc::new(loaded.tokenizer),
        registry,
        EngineConfig {
            max_running: e.max_running,
            max_batch_tokens: e.max_batch_tokens,
            prefill_chunk: e.prefill_chunk,
            device_slot_bytes: usize::try_from(e.device_slot_bytes).unwrap_or(usize::MAX),
            max_context,
            max_running_per_tenant: e.max_running_per_tenant,
            max_waiting: e.max_waiting,
            max_waiting_per_tenant: e.max_waiting_per_tenant,
            max_queue: config.limits.max_queue(),
            max_request: config.limits.max_request(),
        },
    );
    Ok(Served {
        engine,
        base_id: base_id(config, &dir),
        max_context,
        created: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        dtype,
    })
}

async fn health() -> impl IntoResponse {
    axum::Json(serde_json::json!({"status": "ok"}))
}

async fn ready(State(state): State<Arc<AppState>>) -> Response {
    match state.served() {
        Ok(s) => {
            axum::Json(serde_json::json!({"status": "ready", "model": s.base_id})).into_response()
        }
        Err(e) => e.into_response(),
    }
}

async fn metrics_text(
    State(state): State<Arc<AppState>>,
    headers: axum::http::HeaderMap,
) -> Response {
    let h = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    let reveal = match state.auth.scrape(h) {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    let fine_tuning = match fine_tuning_snapshot(&state).await {
        Ok(f) => Some(f),
        Err(e) => {
            tracing::error!("reading the fine-tuning records for /metrics: {e}");
            None
        }
    };
    let served = state.served.get();
    let text = state.metrics.render(
        served.map(|s| s.engine.stats.as_ref()),
        served.map(|s| s.engine.registry.stats.as_ref()),
        fine_tuning.as_ref(),
        state.config.metrics.max_adapter_labels,
        reveal,
        state.config.metrics.vllm_names,
    );
    match text {
        Ok(t) => (
            [(
                header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )],
            t,
        )
            .into_response(),
        Err(e) => ApiError::internal(e).into_response(),
    }
}

async fn fine_tuning_snapshot(state: &AppState) -> anyhow::Result<metrics::FineTuningSnapshot> {
    use prometheus::core::Collector;
    let files = state.open_files().await?;
    let jobs = state.jobs().await.map_err(|e| anyhow::anyhow!(e.message))?;
    let runner = state.started_runner();
    Ok(metrics::FineTuningSnapshot {
        jobs: jobs
            .counts()
            .await?
            .into_iter()
            .map(|(s, n)| (s.as_str(), n))
            .collect(),
        tokens_per_s: runner.as_ref().map_or(0.0, |r| r.tokens_per_s()),
        stored_bytes: files.bytes_by_owner().await?,
        durations: runner.map(|r| r.durations.collect()).unwrap_or_default(),
    })
}

/// Counts every routed request by route template and status code.
async fn count_requests(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let endpoint = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_string(), |p| p.as_str().to_string());
    let resp = next.run(req).await;
    state
        .metrics
        .http_requests
        .with_label_values(&[endpoint.as_str(), resp.status().as_str()])
        .inc();
    resp
}

async fn not_found(State(state): State<Arc<AppState>>, req: Request) -> Response {
    state
        .metrics
        .http_requests
        .with_label_values(&["unmatched", "404"])
        .inc();
    ApiError::not_found(format!(
        "no route for {} {}",
        req.method(),
        req.uri().path()
    ))
    .code("unknown_url")
    .into_response()
}

async fn method_not_allowed(req: Request) -> Response {
    ApiError::new(
        axum::http::StatusCode::METHOD_NOT_ALLOWED,
        "invalid_request_error",
        format!("{} is not allowed on {}", req.method(), req.uri().path()),
    )
    .code("method_not_allowed")
    .into_response()
}

/// Every route, with the body limits and request counting.
pub fn router(state: Arc<AppState>) -> Router {
    let json_limit = state.config.limits.max_body_bytes;
    let api = Router::new()
        .route("/v1/completions", post(completions::completions))
        .route("/v1/chat/completions", post(completions::chat))
        .route("/v1/models", get(models::list))
        .route("/v1/models/{id}", get(models::get))
        .route("/v1/models/{tenant}/{name}", get(models::get))
        .route("/v1/adapters", get(admin::list).post(admin::upload))
        .route("/v1/adapters/{a}", get(admin::get).delete(admin::delete))
        .route(
            "/v1/adapters/{a}/{b}",
            get(admin::get).delete(admin::delete).post(admin::action),
        )
        .route("/v1/adapters/{a}/{b}/{c}", post(admin::action))
        .route(
            "/v1/files",
            // Uploads have their own limit (`fine_tuning.max_file_bytes`).
            post(files::upload)
                .layer(DefaultBodyLimit::disable())
                .get(files::list),
        )
        .route("/v1/files/{id}", get(files::get).delete(files::delete))
        .route("/v1/files/{id}/content", get(files::content))
        .route(
            "/v1/fine_tuning/jobs",
            post(fine_tuning::create).get(fine_tuning::list),
        )
        .route("/v1/fine_tuning/jobs/{id}", get(fine_tuning::get))
        .route(
            "/v1/fine_tuning/jobs/{id}/cancel",
            post(fine_tuning::cancel),
        )
        .route("/v1/fine_tuning/jobs/{id}/events", get(fine_tuning::events))
        .route(
            "/v1/fine_tuning/jobs/{id}/checkpoints",
            get(fine_tuning::checkpoints),
        )
        .route(
            "/v1/fine_tuning/expert_selection",
            post(fine_tuning::expert_selection),
        )
        .route("/v1/load_lora_adapter", post(gateway::load))
        .route("/v1/unload_lora_adapter", post(gateway::unload))
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics_text))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            count_requests,
        ))
        .method_not_allowed_fallback(method_not_allowed)
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(json_limit))
        .layer(tower_http::trace::TraceLayer::new_for_http());
    api.with_state(state)
}

/// Resolves when SIGTERM or Ctrl-C arrives.
pub async fn termination() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}

/// Runs the server until SIGTERM / Ctrl-C, then drains: no new connections, in-flight
/// requests run up to `shutdown.drain_seconds`, then whatever is left is cancelled.
pub async fn run(config: ServerConfig) -> anyhow::Result<()> {
    let state = Arc::new(AppState::new(config.clone()).map_err(anyhow::Error::msg)?);
    if state.auth.is_open() {
        tracing::warn!(
            "no API keys are configured: the server is open, anyone who can reach it may use and manage every adapter"
        );
    }
    // The fine-tuning records must open before anything is served.
    let files = state.open_files().await?;
    drop(files);
    let addr = format!("{}:{}", config.host, config.port);
    let listener = tokio::net::TcpListener::bind(&addr)
        .await
        .map_err(|e| anyhow::anyhow!("binding {addr}: {e}"))?;
    tracing::info!("listening on http://{}", listener.local_addr()?);

    // Load in the background: /health answers at once, /ready once the model is in.
    let loader = {
        let state = state.clone();
        let config = config.clone();
        let rt = tokio::runtime::Handle::current();
        tokio::task::spawn_blocking(move || match load(&config) {
            Ok(s) => {
                tracing::info!(model = %s.base_id, max_context = s.max_context, weight_dtype = ?s.dtype, "model loaded, ready");
                state.set_served(Arc::new(s));
                // Queued jobs (and those a crash interrupted) start without waiting for a
                // request.
                let st = state.clone();
                rt.spawn(async move {
                    if let Err(e) = st.adapter_quota().await {
                        tracing::error!("the adapter quotas were not reconciled: {}", e.message);
                    }
                    if let Err(e) = st.runner().await {
                        tracing::error!("the fine-tuning runner did not start: {}", e.message);
                    }
                });
                Ok(())
            }
            Err(e) => Err(e),
        })
    };
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<anyhow::Error>();
    tokio::spawn(async move {
        if let Ok(Err(e)) = loader.await {
            let _ = stop_tx.send(e);
        }
    });

    let drain = Duration::from_secs_f64(config.shutdown.drain_seconds);
    let signal_state = state.clone();
    let (load_failed_tx, mut load_failed_rx) = tokio::sync::mpsc::unbounded_channel();
    let shutdown = async move {
        tokio::select! {
            _ = termination() => {
                tracing::info!(drain_seconds = drain.as_secs_f64(), "shutting down: draining in-flight requests");
            }
            Ok(e) = stop_rx => {
                let _ = load_failed_tx.send(e);
            }
        }
        signal_state.start_draining();
        // The deadline: cancel what still runs, so streams end and connections close.
        let st = signal_state.clone();
        tokio::spawn(async move {
            tokio::time::sleep(drain).await;
            if let Some(engine) = st.engine() {
                tracing::warn!("drain deadline reached: cancelling the requests still running");
                let _ = tokio::task::spawn_blocking(move || engine.shutdown()).await;
            }
            // Connections that still hang on after that get a little longer, no more.
            tokio::time::sleep(Duration::from_secs(10)).await;
            tracing::error!("connections still open 10 s after the drain deadline: exiting");
            std::process::exit(1);
        });
    };
    let app = router(state.clone());
    listen::serve(
        listener,
        app,
        listen::HttpLimits::new(&config.limits),
        shutdown,
    )
    .await?;
    if let Ok(e) = load_failed_rx.try_recv() {
        return Err(e.context("the model could not be loaded"));
    }
    if let Some(runner) = state.started_runner() {
        // Jobs running here go back to the queue at once rather than when their lease
        // expires.
        runner.shutdown(Duration::from_secs(10)).await;
    }
    if let Some(engine) = state.engine() {
        let _ = tokio::task::spawn_blocking(move || engine.shutdown()).await;
    }
    tracing::info!("stopped");
    Ok(())
}
