//! vLLM's adapter-placement routes, which inference-gateway adapter controllers call
//! (`POST /v1/load_lora_adapter`, `POST /v1/unload_lora_adapter`): placing an adapter
//! makes it resident in this replica's device slots, unplacing frees them. With
//! `lora_path`, an admin also installs the adapter directory at that server path first,
//! validated exactly as an upload is. Replies are vLLM's plain-text success lines; errors
//! are OpenAI-shaped like every other route's.
//!
//! The adapters themselves stay in the store (the gauges that tell a gateway where they
//! are placed live in [`super::metrics`]); deleting one is `DELETE /v1/adapters/{name}`.

use axum::extract::State;
use serde::Deserialize;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::auth::Caller;
use super::body::ApiJson;
use super::errors::{adapter_error, off_thread, ApiError};
use super::{AppState, Served};
use crate::adapter::format::validate_name;
use crate::adapter::AdapterKey;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoadRequest {
    pub lora_name: String,
    /// A directory on the server holding the adapter (admins only).
    #[serde(default)]
    pub lora_path: Option<String>,
    /// With `lora_path`: replace an adapter of the same name (else that is refused).
    #[serde(default)]
    pub load_inplace: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UnloadRequest {
    pub lora_name: String,
    /// vLLM's numeric id; names identify adapters here, so it is accepted and unused.
    #[serde(default)]
    pub lora_int_id: Option<u64>,
}

/// `POST /v1/load_lora_adapter`.
pub async fn load(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    ApiJson(req): ApiJson<LoadRequest>,
) -> Result<String, ApiError> {
    let served = state.served()?;
    let name = req.lora_name.clone();
    if let Some(path) = req.lora_path.clone() {
        if !caller.is_admin() {
            return Err(ApiError::forbidden(
                "installing from a server path (lora_path) needs the admin key; upload with \
                 POST /v1/adapters instead",
            ));
        }
        validate_name(&name).map_err(|e| ApiError::invalid("lora_name", e.to_string()))?;
        let slot_bytes = served.engine.config.device_slot_bytes;
        let replace = req.load_inplace;
        off_thread(move || install_from(&served, &name, Path::new(&path), replace, slot_bytes))
            .await?;
    }
    let served = state.served()?;
    let name = req.lora_name;
    served.refresh(&caller, &name).await?;
    off_thread(move || {
        let v = served.managed(&caller, &name)?;
        served.place(&v)?;
        tracing::info!(adapter = %v.key(), version = v.id(), by = caller.label(), "adapter placed");
        Ok(format!(
            "Success: LoRA adapter '{name}' added successfully."
        ))
    })
    .await
}

/// `POST /v1/unload_lora_adapter`: frees the adapter's device slots (409 while requests
/// use it). It stays installed and is loaded again by the next request that names it.
pub async fn unload(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    ApiJson(req): ApiJson<UnloadRequest>,
) -> Result<String, ApiError> {
    let served = state.served()?;
    let name = req.lora_name;
    off_thread(move || {
        let v = served.managed(&caller, &name)?;
        served.engine.unload_adapter(&v).map_err(adapter_error)?;
        tracing::info!(adapter = %v.key(), version = v.id(), by = caller.label(), "adapter unplaced");
        Ok(format!("Success: LoRA adapter '{name}' removed successfully."))
    })
    .await
}

/// Copies the adapter directory at `path` into a staging directory, checks it as an
/// upload is checked and installs it as the shared, public adapter `name`.
fn install_from(
    served: &Served,
    name: &str,
    path: &Path,
    replace: bool,
    slot_bytes: usize,
) -> Result<(), ApiError> {
    let reg = &served.engine.registry;
    let key = AdapterKey {
        tenant: None,
        name: name.to_string(),
    };
    let files = adapter_files(path)?;
    let staging = reg
        .store
        .staging()
        .map_err(|e| ApiError::logged("creating a staging directory", &e))?;
    let staged = staging.dir();
    for f in &files {
        let Some(file_name) = f.file_name() else {
            continue;
        };
        std::fs::copy(f, staged.join(file_name))
            .map_err(|e| ApiError::logged("copying the adapter", &e))?;
    }
    reg.check_servable(&staged, name, slot_bytes)
        .map_err(|e| ApiError::bad_request(e).code("invalid_adapter"))?;
    let done = if replace {
        reg.install(&key, staging, true)
    } else {
        reg.install_new(&key, staging, true)
    }
    .map_err(adapter_error)?;
    tracing::info!(adapter = %key, version = done.version.id(), from = %path.display(), "adapter installed from a server path");
    Ok(())
}

/// The regular files of the adapter directory `path` (its top level).
fn adapter_files(path: &Path) -> Result<Vec<PathBuf>, ApiError> {
    let unreadable = |e: std::io::Error| {
        ApiError::invalid(
            "lora_path",
            format!("cannot read the directory {}: {e}", path.display()),
        )
    };
    let mut files = Vec::new();
    for entry in std::fs::read_dir(path).map_err(unreadable)? {
        let entry = entry.map_err(unreadable)?;
        if entry.file_type().map_err(unreadable)?.is_file() {
            files.push(entry.path());
        }
    }
    if files.is_empty() {
        return Err(ApiError::invalid(
            "lora_path",
            format!("{} holds no files", path.display()),
        ));
    }
    Ok(files)
}
