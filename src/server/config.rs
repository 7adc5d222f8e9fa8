//! The server's configuration: a TOML file (every key optional, see `config/default.toml`)
//! with command-line flags on top.

use serde::Deserialize;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The model served when none is configured: the demo base shipped in the repository,
/// relative to the working directory (its adapters are in `adapters/`).
pub const DEMO_MODEL: &str = "models/demo";

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    pub host: String,
    pub port: u16,
    /// The model directory (`--model` overrides; default the shipped demo model).
    pub model: Option<PathBuf>,
    /// The adapters directory (created if missing).
    pub adapters: PathBuf,
    /// The id clients use for the base model; empty = the model directory's name.
    pub model_id: String,
    pub device: String,
    pub dtype: String,
    /// The dtype weight matrices stay in (`bf16`, `f16`); empty = the compute dtype.
    pub weight_dtype: String,
    pub engine: EngineSection,
    pub limits: Limits,
    pub shutdown: Shutdown,
    pub auth: AuthConfig,
    pub metrics: MetricsConfig,
    pub fine_tuning: FineTuningConfig,
    pub store: StoreConfig,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            host: "127.0.0.1".into(),
            port: 8080,
            model: Some(PathBuf::from(DEMO_MODEL)),
            adapters: PathBuf::from("adapters"),
            model_id: String::new(),
            device: "cpu".into(),
            dtype: "f32".into(),
            weight_dtype: String::new(),
            engine: EngineSection::default(),
            limits: Limits::default(),
            shutdown: Shutdown::default(),
            auth: AuthConfig::default(),
            metrics: MetricsConfig::default(),
            fine_tuning: FineTuningConfig::default(),
            store: StoreConfig::default(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct EngineSection {
    pub max_running: usize,
    pub max_batch_tokens: usize,
    pub prefill_chunk: usize,
    /// Bytes of device memory for adapter expert slots.
    pub device_slot_bytes: u64,
    /// Bytes of host memory for validated adapters.
    pub host_cache_bytes: u64,
    /// With an object-store registry (`[store] url`): bytes of the adapters directory
    /// given to adapters pulled from it; beyond it, the least recently used ones no request
    /// holds are removed from disk (and pulled again when named). 0: no limit.
    pub disk_cache_bytes: u64,
    /// With an object-store registry: how long one look-up of a name in the store stays
    /// current; a deleted or replaced adapter is noticed at most this long after the
    /// fact. 0: every request looks its adapter up.
    pub adapter_lookup_ttl_seconds: f64,
    /// With an object-store registry: how long the store's answer that a name has no
    /// adapter, or only one the asker may not use (another tenant's private one), is
    /// trusted before the store is asked again (per name, bounded in entries). An adapter
    /// installed through another replica under such a name is found at most this long
    /// after; through this one, at once. 0: not cached.
    pub adapter_miss_ttl_seconds: f64,
    /// Longest sequence (prompt + output); 0 = the model's `max_position_embeddings`.
    pub max_context: usize,
    /// Most running sequences of one tenant; 0 = no cap beyond the fair share.
    pub max_running_per_tenant: usize,
    /// Most sequences accepted and not yet running (429 `server_overloaded` beyond it);
    /// 0 = no limit.
    pub max_waiting: usize,
    /// The same, for one tenant's sequences; 0 = no limit beyond `max_waiting`.
    pub max_waiting_per_tenant: usize,
}

impl Default for EngineSection {
    fn default() -> Self {
        Self {
            max_running: 64,
            max_batch_tokens: 2048,
            prefill_chunk: 512,
            device_slot_bytes: 1 << 30,
            host_cache_bytes: 4 << 30,
            disk_cache_bytes: 64 << 30,
            adapter_lookup_ttl_seconds: 1.0,
            adapter_miss_ttl_seconds: 1.0,
            max_context: 0,
            max_running_per_tenant: 0,
            max_waiting: 512,
            max_waiting_per_tenant: 256,
        }
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Largest JSON request body.
    pub max_body_bytes: usize,
    /// Largest adapter package upload.
    pub max_upload_bytes: u64,
    /// Largest `n` (choices per request).
    pub max_n: usize,
    /// Most stop strings per request.
    pub max_stop: usize,
    /// Largest request head (request line and header fields), 431 above it.
    pub max_header_bytes: usize,
    /// Longest request target (the URI in the request line), 414 above it.
    pub max_uri_bytes: usize,
    /// Seconds a request head may take to arrive once the connection waits for one.
    pub header_read_timeout_seconds: f64,
    /// Seconds a request body may go without a byte before it is refused (408).
    pub body_read_timeout_seconds: f64,
    /// Longest line of an uploaded training file (400 naming the line above it).
    pub max_line_bytes: usize,
    /// A generation request that waits longer than this to start is answered 429 and
    /// dropped; 0 = no limit.
    pub max_queue_seconds: f64,
    /// Free disk space an upload (a file, an adapter) must leave where it is stored (507
    /// `insufficient_storage` otherwise); 0 = no reserve.
    pub min_free_disk_bytes: u64,
    /// A generation request running longer than this (from its arrival) ends with the
    /// tokens so far, `finish_reason: "length"`; 0 = no limit.
    pub max_request_seconds: f64,
    /// Adapters one tenant may keep (a tenant's `max_adapters` overrides it); 0 = no limit.
    pub max_adapters_per_tenant: u64,
    /// Bytes of adapter files one tenant may keep (a tenant's `max_adapter_bytes` overrides
    /// it); 0 = no limit.
    pub max_adapter_bytes_per_tenant: u64,
}

/// Longest request target hyper itself takes; `limits.max_uri_bytes` may not exceed it.
pub const MAX_URI_BYTES: usize = (u16::MAX - 1) as usize;

impl EngineSection {
    /// The disk cache settings of an object-store adapter registry.
    pub fn cache_settings(&self) -> crate::adapter::CacheSettings {
        crate::adapter::CacheSettings {
            disk_bytes: self.disk_cache_bytes,
            lookup_ttl: seconds(self.adapter_lookup_ttl_seconds),
            miss_ttl: seconds(self.adapter_miss_ttl_seconds),
        }
    }
}

impl ServerConfig {
    /// The adapter quotas: `limits`' and each tenant's overrides.
    pub fn adapter_limits(&self) -> crate::jobs::adapter_quota::AdapterLimits {
        use crate::jobs::adapter_quota::{AdapterLimit, AdapterLimits};
        let default = AdapterLimit {
            max_adapters: self.limits.max_adapters_per_tenant,
            max_bytes: self.limits.max_adapter_bytes_per_tenant,
        };
        AdapterLimits {
            default,
            tenants: self
                .auth
                .tenants
                .iter()
                .map(|t| {
                    let limit = AdapterLimit {
                        max_adapters: t.max_adapters.unwrap_or(default.max_adapters),
                        max_bytes: t.max_adapter_bytes.unwrap_or(default.max_bytes),
                    };
                    (t.name.clone(), limit)
                })
                .collect(),
        }
    }
}

impl ServerConfig {
    /// The tenants with their own file quota (`max_stored_bytes`).
    pub fn file_quotas(&self) -> std::collections::HashMap<String, u64> {
        self.tenant_values(|t| t.max_stored_bytes)
    }

    /// The tenants with their own quota of active jobs (`max_active_jobs`).
    pub fn job_quotas(&self) -> std::collections::HashMap<String, u64> {
        self.tenant_values(|t| t.max_active_jobs)
    }

    fn tenant_values(
        &self,
        value: impl Fn(&TenantConfig) -> Option<u64>,
    ) -> std::collections::HashMap<String, u64> {
        self.auth
            .tenants
            .iter()
            .filter_map(|t| Some((t.name.clone(), value(t)?)))
            .collect()
    }
}

impl Limits {
    pub fn header_read_timeout(&self) -> Duration {
        seconds(self.header_read_timeout_seconds)
    }

    pub fn body_read_timeout(&self) -> Duration {
        seconds(self.body_read_timeout_seconds)
    }

    /// `max_queue_seconds` (`None`: no limit).
    pub fn max_queue(&self) -> Option<Duration> {
        (self.max_queue_seconds > 0.0).then(|| seconds(self.max_queue_seconds))
    }

    /// `max_request_seconds` (`None`: no limit).
    pub fn max_request(&self) -> Option<Duration> {
        (self.max_request_seconds > 0.0).then(|| seconds(self.max_request_seconds))
    }
}

/// A validated number of seconds as a `Duration` (absurdly long ones are capped at a year).
fn seconds(s: f64) -> Duration {
    const YEAR: Duration = Duration::from_secs(365 * 24 * 3600);
    Duration::try_from_secs_f64(s).map_or(YEAR, |d| d.min(YEAR))
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_body_bytes: 4 << 20,
            max_upload_bytes: 8 << 30,
            max_n: 16,
            max_stop: 16,
            max_header_bytes: 64 << 10,
            max_uri_bytes: 8 << 10,
            header_read_timeout_seconds: 30.0,
            body_read_timeout_seconds: 30.0,
            max_line_bytes: crate::jobs::data::DEFAULT_MAX_LINE_BYTES,
            max_queue_seconds: 60.0,
            min_free_disk_bytes: 1 << 30,
            max_request_seconds: 900.0,
            max_adapters_per_tenant: 100,
            max_adapter_bytes_per_tenant: 64 << 30,
        }
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Shutdown {
    /// After SIGTERM, how long in-flight requests may run before they are cancelled.
    pub drain_seconds: f64,
}

impl Default for Shutdown {
    fn default() -> Self {
        Self {
            drain_seconds: 30.0,
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// SHA-256 (hex) of each admin key.
    pub admin_key_sha256: Vec<String>,
    /// Adapters every tenant may use: `NAME` (shared) or `TENANT/NAME`.
    pub public_adapters: Vec<String>,
    pub tenants: Vec<TenantConfig>,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct TenantConfig {
    pub name: String,
    /// SHA-256 (hex) of each of the tenant's keys.
    pub key_sha256: Vec<String>,
    /// Directories of the adapters directory's top level that belong to this tenant's
    /// namespace (reserved: nobody else can put a shared adapter under these names).
    pub adapters: Vec<String>,
    /// This tenant's `limits.max_adapters_per_tenant` (0 = no limit).
    pub max_adapters: Option<u64>,
    /// This tenant's `limits.max_adapter_bytes_per_tenant` (0 = no limit).
    pub max_adapter_bytes: Option<u64>,
    /// This tenant's `fine_tuning.max_stored_bytes_per_tenant`.
    pub max_stored_bytes: Option<u64>,
    /// This tenant's `fine_tuning.max_active_jobs_per_tenant` (0 = no limit).
    pub max_active_jobs: Option<u64>,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsConfig {
    /// Require an admin key or a metrics key for `GET /metrics` (when keys are configured).
    /// Without it anyone may read the metrics, and private adapters are not named in them.
    pub require_admin: bool,
    /// SHA-256 (hex) of keys that may read `/metrics` and nothing else.
    pub key_sha256: Vec<String>,
    /// Adapters with their own label in per-adapter metrics; the rest are summed as
    /// `adapter="(other)"`.
    pub max_adapter_labels: usize,
    /// Also expose the gauges an inference gateway's endpoint picker reads under vLLM's
    /// names (`vllm:num_requests_waiting`, `vllm:lora_requests_info`, ...).
    pub vllm_names: bool,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self {
            require_admin: true,
            key_sha256: Vec::new(),
            max_adapter_labels: 32,
            vllm_names: false,
        }
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct FineTuningConfig {
    /// Where uploaded files (`files/`), jobs' work (`jobs/`) and, by default, the records
    /// database (`esft.db`) live.
    pub data_dir: PathBuf,
    /// The records database (files, jobs, their events and checkpoints): `""` for SQLite in
    /// `data_dir`, or a `postgres://user:password@host:port/dbname` URL.
    pub database: String,
    /// Largest file `POST /v1/files` takes (413 above it).
    pub max_file_bytes: u64,
    /// Most bytes of files one owner (a tenant, or the admin) may keep (429 above it).
    pub max_stored_bytes_per_tenant: u64,
    /// The `esft-train` executable jobs run; empty: the one beside `esft-serve`.
    pub trainer: PathBuf,
    /// Jobs trained at once; the others wait in the queue. 0: this process trains none
    /// (a replica that only accepts jobs, for workers elsewhere to run).
    pub max_concurrent_jobs: usize,
    /// How long a worker's claim on a running job holds without a renewal (renewed every
    /// third of it): how soon another worker takes over the job of one that died.
    pub lease_seconds: f64,
    /// How often a worker looks at the queue without being woken (the claim latency of a
    /// job queued by another process, at most).
    pub poll_seconds: f64,
    /// Compute threads of a training job; 0: half the cores (at least one).
    pub training_threads: usize,
    /// Niceness of training processes (0-19): serving keeps the upper hand.
    pub training_nice: i32,
    /// Most queued or running jobs of one owner (429 above it); 0: no limit.
    pub max_active_jobs_per_tenant: u64,
    /// A job saves a resumable state (a checkpoint) every this many steps.
    pub save_every_steps: u64,
    /// Fewest examples a training file must hold.
    pub min_training_examples: usize,
    /// Longest a job may take from its first start (it then fails, `job_timeout`, and
    /// its work is removed); 0 = no limit.
    pub max_job_seconds: f64,
    /// Days an ended job is kept (its record, events, checkpoints and step metrics),
    /// counted from its end; 0 = for ever.
    pub retain_days: f64,
    /// Most optimizer steps, epochs and scoring tokens a job may ask for (400 above).
    pub max_steps: u64,
    pub max_epochs: u64,
    pub max_scoring_tokens: u64,
    /// Expert-selection previews run at once by this process; absent: 1 where it trains
    /// jobs (`max_concurrent_jobs` > 0), none where it does not. 0: previews are off.
    pub max_concurrent_previews: Option<usize>,
    /// Longest a preview may take (it is then stopped, 503 `preview_timeout`).
    pub preview_timeout_seconds: f64,
}

impl FineTuningConfig {
    /// The trainer executable: the configured one, or `esft-train` beside this program
    /// (or one directory up, where test binaries live).
    pub fn trainer_path(&self) -> PathBuf {
        if !self.trainer.as_os_str().is_empty() {
            return self.trainer.clone();
        }
        let name = format!("esft-train{}", std::env::consts::EXE_SUFFIX);
        let exe = std::env::current_exe().unwrap_or_default();
        exe.ancestors()
            .skip(1)
            .take(2)
            .map(|d| d.join(&name))
            .find(|p| p.is_file())
            .unwrap_or_else(|| PathBuf::from(name))
    }

    /// How long a claim on a job holds without renewal.
    pub fn lease(&self) -> Duration {
        Duration::from_secs_f64(self.lease_seconds)
    }

    /// How often the queue is polled.
    pub fn poll(&self) -> Duration {
        Duration::from_secs_f64(self.poll_seconds)
    }

    /// `retain_days` (`None`: for ever).
    pub fn retain(&self) -> Option<Duration> {
        // Not capped at a year as other durations are: a retention is as long as it says.
        (self.retain_days > 0.0).then(|| {
            Duration::try_from_secs_f64(self.retain_days * 86400.0).unwrap_or(Duration::MAX)
        })
    }

    /// `max_job_seconds` (`None`: no limit).
    pub fn max_job(&self) -> Option<Duration> {
        (self.max_job_seconds > 0.0).then(|| seconds(self.max_job_seconds))
    }

    /// Previews run at once here (see `max_concurrent_previews`).
    pub fn previews(&self) -> usize {
        self.max_concurrent_previews
            .unwrap_or(usize::from(self.max_concurrent_jobs > 0))
    }

    /// Longest a preview may take.
    pub fn preview_timeout(&self) -> Duration {
        seconds(self.preview_timeout_seconds)
    }

    /// Compute threads of a training job.
    pub fn threads(&self) -> usize {
        match self.training_threads {
            0 => std::thread::available_parallelism()
                .map_or(1, |n| n.get() / 2)
                .max(1),
            n => n,
        }
    }
}

impl Default for FineTuningConfig {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("data"),
            database: String::new(),
            max_file_bytes: 512 << 20,
            max_stored_bytes_per_tenant: 10 << 30,
            trainer: PathBuf::new(),
            max_concurrent_jobs: 1,
            lease_seconds: 30.0,
            poll_seconds: 1.0,
            training_threads: 0,
            training_nice: 10,
            max_active_jobs_per_tenant: 8,
            save_every_steps: 25,
            min_training_examples: 10,
            max_job_seconds: 21600.0,
            retain_days: 30.0,
            max_steps: 100_000,
            max_epochs: 100,
            max_scoring_tokens: 1_000_000,
            max_concurrent_previews: None,
            preview_timeout_seconds: 300.0,
        }
    }
}

/// The object store shared by replicas and workers (see [`crate::store`]).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct StoreConfig {
    /// `""`: none, everything stays on this machine. Else `s3://bucket/prefix`,
    /// `gs://bucket/prefix`, `az://container/prefix` or `file:///dir`.
    pub url: String,
    /// `object_store` configuration keys (`aws_endpoint`, `aws_allow_http`, ...), over the
    /// provider's environment variables.
    pub options: std::collections::BTreeMap<String, String>,
    pub connect_timeout_seconds: f64,
    /// One request, to the end of its body.
    pub request_timeout_seconds: f64,
    /// All retries of one operation together: how long an unreachable store takes to fail.
    pub retry_timeout_seconds: f64,
}

impl Default for StoreConfig {
    fn default() -> Self {
        let t = crate::store::Timeouts::default();
        Self {
            url: String::new(),
            options: Default::default(),
            connect_timeout_seconds: t.connect.as_secs_f64(),
            request_timeout_seconds: t.request.as_secs_f64(),
            retry_timeout_seconds: t.retries.as_secs_f64(),
        }
    }
}

impl StoreConfig {
    /// The configured store, or `None` where there is none.
    pub fn open(&self) -> Result<Option<crate::store::Store>, String> {
        if self.url.is_empty() {
            return Ok(None);
        }
        let timeouts = crate::store::Timeouts {
            connect: seconds(self.connect_timeout_seconds),
            request: seconds(self.request_timeout_seconds),
            retries: seconds(self.retry_timeout_seconds),
        };
        let options: Vec<(String, String)> = self
            .options
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        crate::store::Store::open_with(&self.url, &timeouts, &options)
            .map(Some)
            .map_err(|e| format!("store.url: {e}"))
    }
}

/// Flags that override the file.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub model: Option<PathBuf>,
    pub adapters: Option<PathBuf>,
    pub host: Option<String>,
    pub port: Option<u16>,
}

impl ServerConfig {
    pub fn from_toml(text: &str) -> Result<Self, String> {
        toml::from_str(text).map_err(|e| e.to_string())
    }

    /// Reads `path` (or the defaults when `None`) and applies the flags.
    pub fn load(path: Option<&Path>, flags: &Overrides) -> Result<Self, String> {
        let mut c = match path {
            Some(p) => {
                let text = std::fs::read_to_string(p)
                    .map_err(|e| format!("reading {}: {e}", p.display()))?;
                Self::from_toml(&text).map_err(|e| format!("{}: {e}", p.display()))?
            }
            None => Self::default(),
        };
        if let Some(m) = &flags.model {
            c.model = Some(m.clone());
        }
        if let Some(a) = &flags.adapters {
            c.adapters = a.clone();
        }
        if let Some(h) = &flags.host {
            c.host = h.clone();
        }
        if let Some(p) = flags.port {
            c.port = p;
        }
        c.validate()?;
        Ok(c)
    }

    pub fn validate(&self) -> Result<(), String> {
        if self.model.is_none() {
            return Err("no model: pass --model DIR or set `model` in the config file".into());
        }
        let e = &self.engine;
        for (k, v) in [
            ("engine.max_running", e.max_running),
            ("engine.max_batch_tokens", e.max_batch_tokens),
            ("engine.prefill_chunk", e.prefill_chunk),
            ("limits.max_n", self.limits.max_n),
            ("limits.max_body_bytes", self.limits.max_body_bytes),
            ("limits.max_header_bytes", self.limits.max_header_bytes),
            ("limits.max_uri_bytes", self.limits.max_uri_bytes),
            ("limits.max_line_bytes", self.limits.max_line_bytes),
            (
                "fine_tuning.max_file_bytes",
                usize::try_from(self.fine_tuning.max_file_bytes).unwrap_or(usize::MAX),
            ),
            (
                "fine_tuning.save_every_steps",
                usize::try_from(self.fine_tuning.save_every_steps).unwrap_or(usize::MAX),
            ),
            (
                "fine_tuning.min_training_examples",
                self.fine_tuning.min_training_examples,
            ),
        ] {
            if v == 0 {
                return Err(format!("{k} must be at least 1"));
            }
        }
        if self.fine_tuning.data_dir.as_os_str().is_empty() {
            return Err("fine_tuning.data_dir must name a directory".into());
        }
        if crate::jobs::db::Backend::of_setting(&self.fine_tuning.database).is_none() {
            return Err(
                "fine_tuning.database must be \"\" (SQLite in data_dir) or a postgres:// URL"
                    .into(),
            );
        }
        for (k, v) in [
            ("fine_tuning.lease_seconds", self.fine_tuning.lease_seconds),
            ("fine_tuning.poll_seconds", self.fine_tuning.poll_seconds),
        ] {
            if !(v.is_finite() && v >= 0.05) {
                return Err(format!("{k} must be a number of seconds, at least 0.05"));
            }
        }
        if !(0..=19).contains(&self.fine_tuning.training_nice) {
            return Err("fine_tuning.training_nice must be from 0 to 19".into());
        }
        if e.max_batch_tokens < e.max_running {
            return Err(format!(
                "engine.max_batch_tokens ({}) must be at least engine.max_running ({})",
                e.max_batch_tokens, e.max_running
            ));
        }
        if !(self.shutdown.drain_seconds.is_finite() && self.shutdown.drain_seconds >= 0.0) {
            return Err("shutdown.drain_seconds must be >= 0".into());
        }
        let ttl = e.adapter_lookup_ttl_seconds;
        if !(ttl.is_finite() && ttl >= 0.0) {
            return Err("engine.adapter_lookup_ttl_seconds must be >= 0".into());
        }
        let ttl = e.adapter_miss_ttl_seconds;
        if !(ttl.is_finite() && ttl >= 0.0) {
            return Err("engine.adapter_miss_ttl_seconds must be >= 0".into());
        }
        if self.limits.max_uri_bytes > MAX_URI_BYTES {
            return Err(format!(
                "limits.max_uri_bytes must be at most {MAX_URI_BYTES}"
            ));
        }
        for (k, v) in [
            (
                "limits.header_read_timeout_seconds",
                self.limits.header_read_timeout_seconds,
            ),
            (
                "limits.body_read_timeout_seconds",
                self.limits.body_read_timeout_seconds,
            ),
        ] {
            if !(v.is_finite() && v > 0.0) {
                return Err(format!("{k} must be a number of seconds above 0"));
            }
        }
        for (k, v) in [
            ("fine_tuning.max_steps", self.fine_tuning.max_steps),
            ("fine_tuning.max_epochs", self.fine_tuning.max_epochs),
            (
                "fine_tuning.max_scoring_tokens",
                self.fine_tuning.max_scoring_tokens,
            ),
        ] {
            if v == 0 {
                return Err(format!("{k} must be at least 1"));
            }
        }
        if !(self.fine_tuning.preview_timeout_seconds.is_finite()
            && self.fine_tuning.preview_timeout_seconds > 0.0)
        {
            return Err(
                "fine_tuning.preview_timeout_seconds must be a number of seconds above 0".into(),
            );
        }
        for (k, v) in [
            (
                "fine_tuning.max_job_seconds",
                self.fine_tuning.max_job_seconds,
            ),
            ("fine_tuning.retain_days", self.fine_tuning.retain_days),
            ("limits.max_queue_seconds", self.limits.max_queue_seconds),
            (
                "limits.max_request_seconds",
                self.limits.max_request_seconds,
            ),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                return Err(format!("{k} must be a number of seconds, 0 for no limit"));
            }
        }
        let hex = |k: &str| k.len() == 64 && k.bytes().all(|b| b.is_ascii_hexdigit());
        let mut names = std::collections::HashSet::new();
        for t in &self.auth.tenants {
            if t.name.is_empty() {
                return Err("auth.tenants: every tenant needs a name".into());
            }
            crate::adapter::format::validate_name(&t.name)
                .map_err(|e| format!("auth.tenants: tenant {:?}: {e}", t.name))?;
            for a in &t.adapters {
                crate::adapter::format::validate_name(a)
                    .map_err(|e| format!("auth.tenants.{}.adapters: {e}", t.name))?;
            }
            if !names.insert(t.name.as_str()) {
                return Err(format!("auth.tenants: tenant {:?} is listed twice", t.name));
            }
        }
        let mut reserved = std::collections::HashMap::new();
        for t in &self.auth.tenants {
            for a in &t.adapters {
                if let Some(other) = reserved.insert(a.as_str(), t.name.as_str()) {
                    return Err(format!(
                        "auth.tenants: adapter {a:?} is listed by both {other:?} and {:?}",
                        t.name
                    ));
                }
            }
        }
        for p in &self.auth.public_adapters {
            crate::adapter::AdapterKey::parse(p)
                .map_err(|e| format!("auth.public_adapters: {e}"))?;
        }
        let all = self
            .auth
            .admin_key_sha256
            .iter()
            .chain(self.auth.tenants.iter().flat_map(|t| t.key_sha256.iter()))
            .chain(self.metrics.key_sha256.iter());
        let mut seen = std::collections::HashSet::new();
        for k in all {
            if !hex(k) {
                return Err(format!(
                    "auth: {k:?} is not a SHA-256 hex digest (64 hex digits; `esft-serve hash-key` prints one)"
                ));
            }
            if !seen.insert(k.to_ascii_lowercase()) {
                return Err(format!("auth: key hash {k} is configured twice"));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_documented_default_file_equals_the_built_in_defaults() {
        let text = include_str!("../../config/default.toml");
        let parsed = ServerConfig::from_toml(text).unwrap();
        assert_eq!(parsed, ServerConfig::default());
    }

    #[test]
    fn the_store_is_none_or_an_address_with_known_options() {
        let mut c = ServerConfig::default();
        assert!(c.store.open().unwrap().is_none());
        c.store.url = "memory://".into();
        assert!(c.store.open().unwrap().is_some());
        c.store.url = "s3://bucket/prefix".into();
        c.store
            .options
            .insert("aws_endpoint".into(), "http://127.0.0.1:9".into());
        assert!(c.store.open().unwrap().is_some());
        c.store.options.insert("no_such_option".into(), "x".into());
        let err = c.store.open().unwrap_err();
        assert!(
            err.contains("store.url") && err.contains("no_such_option"),
            "{err}"
        );
        c.store.options.clear();
        c.store.url = "ftp://host/x".into();
        assert!(c.store.open().is_err());
    }

    #[test]
    fn the_records_database_is_sqlite_or_a_postgres_url() {
        let mut c = ServerConfig::default();
        assert!(c.validate().is_ok());
        c.fine_tuning.database = "postgres://esft:secret@db:5432/esft".into();
        assert!(c.validate().is_ok());
        let parsed =
            ServerConfig::from_toml("[fine_tuning]\ndatabase = \"postgresql://db/esft\"\n")
                .unwrap();
        assert_eq!(parsed.fine_tuning.database, "postgresql://db/esft");
        c.fine_tuning.database = "mysql://db/esft".into();
        let err = c.validate().unwrap_err();
        assert!(err.contains("fine_tuning.database"), "{err}");
    }

    #[test]
    fn flags_override_the_file_and_typos_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        std::fs::write(&p, "port = 9000\nhost = \"0.0.0.0\"\nmodel = \"m\"\n").unwrap();
        let c = ServerConfig::load(
            Some(&p),
            &Overrides {
                port: Some(9100),
                ..Overrides::default()
            },
        )
        .unwrap();
        assert_eq!((c.host.as_str(), c.port), ("0.0.0.0", 9100));
        assert_eq!(c.model, Some(PathBuf::from("m")));
        let err = ServerConfig::from_toml("prot = 1").unwrap_err();
        assert!(err.contains("prot"), "{err}");
        // With nothing configured, the demo model is served.
        let c = ServerConfig::load(None, &Overrides::default()).unwrap();
        assert_eq!(c.model, Some(PathBuf::from(DEMO_MODEL)));
    }

    #[test]
    fn key_hashes_are_checked() {
        let mut c = ServerConfig {
            model: Some("m".into()),
            ..ServerConfig::default()
        };
        c.auth.admin_key_sha256 = vec!["secret".into()];
        assert!(c.validate().unwrap_err().contains("SHA-256"));
        c.auth.admin_key_sha256 = vec!["a".repeat(64), "A".repeat(64)];
        assert!(c.validate().unwrap_err().contains("twice"));
    }

    #[test]
    fn tenant_names_and_reservations_are_checked() {
        let tenant = |name: &str, adapters: &[&str]| TenantConfig {
            name: name.into(),
            key_sha256: Vec::new(),
            adapters: adapters.iter().map(|a| a.to_string()).collect(),
            ..TenantConfig::default()
        };
        let mut c = ServerConfig {
            model: Some("m".into()),
            ..ServerConfig::default()
        };
        c.auth.tenants = vec![tenant("acme", &["x"]), tenant("globex", &["y"])];
        assert!(c.validate().is_ok());
        c.auth.tenants = vec![tenant("a/b", &[])];
        assert!(c.validate().unwrap_err().contains("a/b"));
        c.auth.tenants = vec![tenant("acme", &["x"]), tenant("globex", &["x"])];
        assert!(c.validate().unwrap_err().contains("both"));
        c.auth.tenants = vec![tenant("acme", &["../x"])];
        assert!(c.validate().is_err());
        c.auth.tenants = vec![];
        c.auth.public_adapters = vec!["acme/x".into(), "shared".into()];
        assert!(c.validate().is_ok());
        c.auth.public_adapters = vec!["a/b/c".into()];
        assert!(c.validate().is_err());
    }
}
