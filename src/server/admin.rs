//! Adapter administration: list, describe, upload (a tar of the adapter directory), load
//! into device slots, unload, delete. A tenant manages only its own adapters; adapters it
//! may not see are "not found".

use axum::body::Body;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::{Component, Path as FsPath, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::AsyncWriteExt;

use super::auth::{Access, Caller, ACCESS_FILE};
use super::body::next_chunk;
use super::errors::ApiError;
use super::{AppState, Served};
use crate::adapter::format::{
    load_adapter, validate_name, ExpertConfig, Manifest, MANIFEST_FILE, REFERENCE_CONFIG_FILE,
};
use crate::adapter::AdapterError;

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::internal(format!("worker failed: {e}")))
}

/// The adapter's manifest as stored, and its expert config.
fn read_manifest(dir: &FsPath) -> Result<(&'static str, Value, ExpertConfig), String> {
    if let Ok(text) = std::fs::read_to_string(dir.join(MANIFEST_FILE)) {
        let m: Manifest =
            serde_json::from_str(&text).map_err(|e| format!("{MANIFEST_FILE}: {e}"))?;
        let v: Value = serde_json::from_str(&text).map_err(|e| e.to_string())?;
        return Ok(("esft", v, m.expert_config));
    }
    let text = std::fs::read_to_string(dir.join(REFERENCE_CONFIG_FILE))
        .map_err(|e| format!("{REFERENCE_CONFIG_FILE}: {e}"))?;
    let c: ExpertConfig =
        serde_json::from_str(&text).map_err(|e| format!("{REFERENCE_CONFIG_FILE}: {e}"))?;
    let v: Value = serde_json::from_str(&text).map_err(|e| e.to_string())?;
    Ok(("reference", v, c))
}

fn dir_bytes(dir: &FsPath) -> u64 {
    std::fs::read_dir(dir)
        .map(|it| {
            it.flatten()
                .filter_map(|e| e.metadata().ok())
                .filter(|m| m.is_file())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

impl Served {
    fn tiers(&self, name: &str) -> Value {
        let device = self
            .engine
            .stats
            .device_adapters
            .lock()
            .map(|d| d.iter().any(|n| n == name))
            .unwrap_or(false);
        json!({
            "disk": true,
            "host": self.engine.registry.in_host(name),
            "device": device,
        })
    }

    fn requests(&self, name: &str) -> Value {
        let (running, waiting) = self
            .engine
            .stats
            .per_adapter
            .lock()
            .ok()
            .and_then(|m| m.get(name).copied())
            .unwrap_or((0, 0));
        json!({"running": running, "waiting": waiting})
    }

    /// The short description in listings.
    fn summary(&self, name: &str, a: &Access) -> Value {
        json!({
            "id": name,
            "object": "adapter",
            "parent": self.base_id,
            "owner": a.owner,
            "public": a.public,
            "tiers": self.tiers(name),
        })
    }

    /// Everything about one adapter (blocking: reads its directory).
    fn describe(&self, name: &str, a: &Access) -> Result<Value, ApiError> {
        let dir = self
            .engine
            .registry
            .store
            .path(name)
            .map_err(|_| ApiError::adapter_not_found(name))?;
        let (layout, manifest, ec) =
            read_manifest(&dir).map_err(|e| ApiError::internal(format!("adapter {name}: {e}")))?;
        let per_layer: BTreeMap<String, usize> = ec
            .experts
            .iter()
            .map(|(l, e)| (l.to_string(), e.len()))
            .collect();
        let mut v = self.summary(name, a);
        if let Value::Object(o) = &mut v {
            o.insert("layout".into(), json!(layout));
            o.insert("size_bytes".into(), json!(dir_bytes(&dir)));
            o.insert("experts_per_layer".into(), json!(per_layer));
            o.insert("expert_count".into(), json!(ec.expert_count()));
            o.insert("shared_experts".into(), json!(ec.shared_experts));
            o.insert("non_expert_modules".into(), json!(ec.non_expert_modules));
            o.insert("requests".into(), self.requests(name));
            o.insert("manifest".into(), manifest);
        }
        Ok(v)
    }
}

/// The adapter `name` if the caller may manage it: 404 when it may not see it, 403 when
/// it may see but not manage it.
fn managed(
    state: &AppState,
    served: &Served,
    caller: &Caller,
    name: &str,
) -> Result<Access, ApiError> {
    match served.adapter_access(state, name) {
        Some(a) if caller.can_manage(&a) => Ok(a),
        Some(a) if caller.can_use(&a) => Err(ApiError::forbidden(format!(
            "the adapter `{name}` is public but not yours to manage"
        ))),
        _ => Err(ApiError::adapter_not_found(name)),
    }
}

fn adapter_error(e: AdapterError) -> ApiError {
    match e {
        AdapterError::InUse(n) => ApiError::conflict(format!(
            "the adapter `{n}` is in use by running or waiting requests"
        ))
        .code("adapter_in_use"),
        AdapterError::NotFound(n) => ApiError::adapter_not_found(&n),
        other => ApiError::internal(other.to_string()),
    }
}

pub async fn list(
    State(state): State<Arc<AppState>>,
    caller: Caller,
) -> Result<Json<Value>, ApiError> {
    let served = state.served()?;
    let st = state.clone();
    let s = served.clone();
    let data = blocking(move || {
        s.visible_adapters(&st, &caller)
            .iter()
            .map(|(n, a)| s.summary(n, a))
            .collect::<Vec<_>>()
    })
    .await?;
    Ok(Json(json!({"object": "list", "data": data})))
}

pub async fn get(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let served = state.served()?;
    let st = state.clone();
    blocking(move || match served.adapter_access(&st, &name) {
        Some(a) if caller.can_use(&a) => served.describe(&name, &a).map(Json),
        _ => Err(ApiError::adapter_not_found(&name)),
    })
    .await?
}

pub async fn load(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let served = state.served()?;
    let st = state.clone();
    blocking(move || {
        let a = managed(&st, &served, &caller, &name)?;
        served.engine.load_adapter(&name).map_err(|msg| {
            if msg.contains("no free device slots") {
                ApiError::conflict(msg).code("no_free_slots")
            } else {
                ApiError::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "invalid_request_error",
                    msg,
                )
                .code("invalid_adapter")
            }
        })?;
        served.describe(&name, &a).map(Json)
    })
    .await?
}

pub async fn unload(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let served = state.served()?;
    let st = state.clone();
    blocking(move || {
        let a = managed(&st, &served, &caller, &name)?;
        served.engine.unload_adapter(&name).map_err(adapter_error)?;
        served.describe(&name, &a).map(Json)
    })
    .await?
}

pub async fn delete(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let served = state.served()?;
    let st = state.clone();
    blocking(move || {
        managed(&st, &served, &caller, &name)?;
        served.engine.unload_adapter(&name).map_err(adapter_error)?;
        let registry = &served.engine.registry;
        registry.store.delete(&name).map_err(adapter_error)?;
        registry.forget(&name);
        tracing::info!(adapter = %name, by = caller.label(), "adapter deleted");
        Ok(Json(
            json!({"id": name, "object": "adapter", "deleted": true}),
        ))
    })
    .await?
}

#[derive(Debug, Deserialize)]
pub struct UploadQuery {
    /// The adapter's name; defaults to the name in its `adapter.json`.
    pub name: Option<String>,
    /// Whether every tenant may use it.
    #[serde(default)]
    pub public: bool,
    /// The owning tenant (admins only; a tenant always uploads for itself).
    pub owner: Option<String>,
}

/// `POST /v1/adapters`: the body is a tar archive of an adapter directory (ours or the
/// reference layout; files at the top or under one directory). It is unpacked and fully
/// validated in a staging directory inside the adapters directory and renamed into place
/// only then, so a partial or invalid upload is never visible.
pub async fn upload(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    query: Result<Query<UploadQuery>, QueryRejection>,
    body: Body,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let Query(q) = query.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let served = state.served()?;
    let owner = match (&caller, &q.owner) {
        (Caller::Tenant(t), None) => Some(t.clone()),
        (Caller::Tenant(_), Some(_)) => {
            return Err(ApiError::forbidden(
                "only an admin may upload for another owner",
            ))
        }
        (_, Some(o)) => {
            if !state.config.auth.tenants.iter().any(|t| &t.name == o) {
                return Err(ApiError::invalid(
                    "owner",
                    format!("no tenant is named {o:?}"),
                ));
            }
            Some(o.clone())
        }
        (_, None) => None,
    };
    if let Some(n) = &q.name {
        validate_name(n).map_err(|e| ApiError::invalid("name", e.to_string()))?;
    }
    let store = &served.engine.registry.store;
    let staging = store
        .staging_dir()
        .map_err(|e| ApiError::internal(format!("creating a staging directory: {e}")))?;
    let package = staging.path().join("package.tar");
    let idle = state.config.limits.body_read_timeout();
    receive(body, &package, state.config.limits.max_upload_bytes, idle).await?;

    let st = state.clone();
    let caller2 = caller.clone();
    let (status, v) = blocking(move || -> Result<(StatusCode, Value), ApiError> {
        let staged = staging.path().join("adapter");
        unpack(&package, &staged)?;
        let _ = std::fs::remove_file(&package);
        if !staged.join(MANIFEST_FILE).is_file() && !staged.join(REFERENCE_CONFIG_FILE).is_file()
        {
            return Err(ApiError::bad_request(format!(
                "the package holds neither {MANIFEST_FILE} nor {REFERENCE_CONFIG_FILE}"
            ))
            .code("invalid_adapter"));
        }
        // The name in our manifest, if there is one (a broken manifest is reported below).
        let inner = read_manifest(&staged)
            .ok()
            .and_then(|(_, m, _)| m.get("name").and_then(Value::as_str).map(str::to_string));
        let name = match (q.name.clone(), inner.clone()) {
            (Some(n), _) | (None, Some(n)) => n,
            (None, None) => {
                return Err(ApiError::invalid(
                    "name",
                    "the package does not name the adapter: pass ?name=",
                ))
            }
        };
        validate_name(&name).map_err(|e| ApiError::invalid("name", e.to_string()))?;
        if let Some(inner) = inner.filter(|i| *i != name) {
            return Err(ApiError::invalid(
                "name",
                format!("the package's {MANIFEST_FILE} names the adapter {inner:?}, not {name:?}"),
            ));
        }
        // Everything the engine would check, now, before anything is visible.
        let reg = &served.engine.registry;
        let w = load_adapter(&staged, &name, &reg.base, served.dtype).map_err(|e| {
            ApiError::bad_request(e.to_string()).code("invalid_adapter")
        })?;
        if !w.others.is_empty() {
            return Err(ApiError::bad_request(format!(
                "adapter {name} replaces non-expert modules, which cannot be served per request; merge it with `esft-train merge`"
            ))
            .code("invalid_adapter"));
        }
        let budget = served.engine.config.device_slot_bytes;
        if w.slot_bytes() > budget {
            return Err(ApiError::bad_request(format!(
                "adapter {name} needs {} bytes of expert slots; the server's budget is {budget}",
                w.slot_bytes()
            ))
            .code("invalid_adapter"));
        }
        drop(w);
        let replacing = match served.adapter_access(&st, &name) {
            Some(a) if caller2.can_manage(&a) => true,
            Some(_) => {
                return Err(ApiError::conflict(format!(
                    "the adapter name `{name}` is not available"
                )))
            }
            None => false,
        };
        let access = Access {
            owner,
            public: q.public,
        };
        let access_json = serde_json::to_vec_pretty(&access)
            .map_err(|e| ApiError::internal(e.to_string()))?;
        crate::util::write_atomic(&staged.join(ACCESS_FILE), &access_json)
            .map_err(|e| ApiError::internal(format!("writing {ACCESS_FILE}: {e}")))?;
        if replacing {
            served.engine.unload_adapter(&name).map_err(adapter_error)?;
        }
        reg.store
            .install_dir(staged, &name)
            .map_err(|e| ApiError::internal(e.to_string()))?;
        reg.forget(&name);
        tracing::info!(adapter = %name, by = caller2.label(), replacing, "adapter uploaded");
        let v = served.describe(&name, &access)?;
        Ok((if replacing { StatusCode::OK } else { StatusCode::CREATED }, v))
        // `staging` (and anything left in it) is removed here.
    })
    .await??;
    Ok((status, Json(v)))
}

/// Streams the request body to `path`, refusing more than `limit` bytes (413) and a body
/// that sends nothing for `idle` (408).
async fn receive(body: Body, path: &FsPath, limit: u64, idle: Duration) -> Result<(), ApiError> {
    let io = |e: std::io::Error| ApiError::internal(format!("storing the upload: {e}"));
    let mut file = tokio::fs::File::create(path).await.map_err(io)?;
    let mut stream = body.into_data_stream();
    let mut total = 0u64;
    while let Some(chunk) = next_chunk(&mut stream, idle).await? {
        total += chunk.len() as u64;
        if total > limit {
            return Err(ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "invalid_request_error",
                format!("the adapter package is larger than the server's limit of {limit} bytes"),
            ));
        }
        file.write_all(&chunk).await.map_err(io)?;
    }
    file.sync_all().await.map_err(io)?;
    if total == 0 {
        return Err(ApiError::bad_request(
            "the request body is empty: send a tar archive of the adapter directory",
        ));
    }
    Ok(())
}

/// Unpacks a tar of plain files into `dest`, refusing links, absolute paths, `..`, nested
/// directories, duplicates and the server's own `access.json`.
fn unpack(package: &FsPath, dest: &FsPath) -> Result<(), ApiError> {
    let bad = |m: String| ApiError::bad_request(m).code("invalid_package");
    let file = std::fs::File::open(package).map_err(|e| ApiError::internal(e.to_string()))?;
    std::fs::create_dir(dest).map_err(|e| ApiError::internal(e.to_string()))?;
    let mut archive = tar::Archive::new(file);
    let entries = archive
        .entries()
        .map_err(|e| bad(format!("not a tar archive: {e}")))?;
    let mut files: Vec<(Vec<String>, PathBuf)> = Vec::new();
    for entry in entries {
        let mut entry = entry.map_err(|e| bad(format!("not a tar archive: {e}")))?;
        let kind = entry.header().entry_type();
        let path = entry
            .path()
            .map_err(|e| bad(format!("bad entry name: {e}")))?
            .into_owned();
        let mut parts = Vec::new();
        for c in path.components() {
            match c {
                Component::CurDir => {}
                Component::Normal(p) => match p.to_str() {
                    Some(s) => parts.push(s.to_string()),
                    None => return Err(bad(format!("entry {path:?} has a non-UTF-8 name"))),
                },
                _ => return Err(bad(format!("entry {path:?} leaves the adapter directory"))),
            }
        }
        if kind.is_dir() {
            if parts.len() > 1 {
                return Err(bad(format!(
                    "entry {path:?}: nested directories are not allowed"
                )));
            }
            continue;
        }
        if kind.is_pax_global_extensions() || kind.is_pax_local_extensions() {
            continue;
        }
        if !kind.is_file() {
            return Err(bad(format!("entry {path:?} is not a regular file")));
        }
        let Some(fname) = parts.last().cloned() else {
            continue;
        };
        if parts.len() > 2 {
            return Err(bad(format!(
                "entry {path:?}: nested directories are not allowed"
            )));
        }
        if validate_name(&fname).is_err() || fname == ACCESS_FILE {
            return Err(bad(format!("entry {path:?}: file name not allowed")));
        }
        let out = dest.join(&fname);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&out)
            .map_err(|e| bad(format!("entry {path:?}: {e}")))?;
        std::io::copy(&mut entry, &mut f).map_err(|e| bad(format!("entry {path:?}: {e}")))?;
        f.sync_all()
            .map_err(|e| ApiError::internal(e.to_string()))?;
        files.push((parts, out));
    }
    if files.is_empty() {
        return Err(bad("the archive holds no files".into()));
    }
    // Either every file at the top, or every file under the same single directory.
    let tops: std::collections::BTreeSet<Option<&String>> = files
        .iter()
        .map(|(p, _)| if p.len() == 2 { Some(&p[0]) } else { None })
        .collect();
    if tops.len() > 1 {
        return Err(bad(
            "the archive must hold the adapter's files at its top or under one directory".into(),
        ));
    }
    Ok(())
}
