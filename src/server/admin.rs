//! Adapter administration: list, describe, upload (a tar of the adapter directory), load
//! into device slots, unload, delete. A tenant manages only its own namespace; adapters it
//! may not see are "not found". Routes take `NAME` or `TENANT/NAME` (as two path segments,
//! or one with the slash encoded as `%2F`).

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

use super::auth::Caller;
use super::body::next_chunk;
use super::errors::{adapter_error, off_thread, quota_error, ApiError};
use super::{AppState, Served};
use crate::adapter::format::{validate_name, MANIFEST_FILE, REFERENCE_CONFIG_FILE};
use crate::adapter::store::{adapter_bytes, ACCESS_FILE};
use crate::adapter::{AdapterKey, Staging, Version};

impl Served {
    fn tiers(&self, v: &Version) -> Value {
        let device = self
            .engine
            .stats
            .device_versions
            .lock()
            .map(|d| d.contains(&v.id()))
            .unwrap_or(false);
        json!({
            "disk": !v.is_retired(),
            "host": self.engine.registry.in_host(v.id()),
            "device": device,
        })
    }

    fn requests(&self, v: &Version) -> Value {
        let load = self
            .engine
            .stats
            .per_adapter
            .lock()
            .ok()
            .and_then(|m| m.get(&v.qualified()).copied())
            .unwrap_or_default();
        json!({"running": load.running, "waiting": load.waiting})
    }

    /// The short description in listings, under the name `caller` uses for it.
    fn summary(&self, caller: &Caller, v: &Version) -> Value {
        json!({
            "id": Self::shown_name(caller, v),
            "object": "adapter",
            "name": v.name(),
            "owner": v.tenant(),
            "public": v.is_public(),
            "version": v.id(),
            "created": v.installed_at(),
            "parent": self.base_id,
            "tiers": self.tiers(v),
        })
    }

    /// Everything about one version.
    fn describe(&self, caller: &Caller, v: &Version) -> Value {
        let mut out = self.summary(caller, v);
        if let Value::Object(o) = &mut out {
            o.insert("size_bytes".into(), json!(v.size_bytes()));
            o.insert("requests".into(), self.requests(v));
            match v.description() {
                Ok(d) => {
                    let ec = &d.expert_config;
                    let per_layer: BTreeMap<String, usize> = ec
                        .experts
                        .iter()
                        .map(|(l, e)| (l.to_string(), e.len()))
                        .collect();
                    o.insert("layout".into(), json!(d.layout));
                    o.insert("experts_per_layer".into(), json!(per_layer));
                    o.insert("expert_count".into(), json!(ec.expert_count()));
                    o.insert("shared_experts".into(), json!(ec.shared_experts));
                    o.insert("non_expert_modules".into(), json!(ec.non_expert_modules));
                    o.insert("manifest".into(), d.manifest.clone());
                }
                Err(e) => {
                    o.insert("invalid".into(), json!(e));
                }
            }
        }
        out
    }

    /// The version `name` means to `caller` for management: 404 when it may not see it,
    /// 403 when it may see but not manage it (blocking: may rescan the directory).
    pub(super) fn managed(&self, caller: &Caller, name: &str) -> Result<Arc<Version>, ApiError> {
        match self.find(caller, name) {
            Some(v) if caller.can_manage(&v) => Ok(v),
            Some(_) => Err(ApiError::forbidden(format!(
                "the adapter `{name}` is public but not yours to manage"
            ))),
            None => Err(ApiError::adapter_not_found(name)),
        }
    }
}

/// An adapter route's name (`NAME`, `TENANT/NAME`) from its path segments.
fn joined(parts: &[String]) -> String {
    parts.join("/")
}

pub async fn list(
    State(state): State<Arc<AppState>>,
    caller: Caller,
) -> Result<Json<Value>, ApiError> {
    let served = state.served()?;
    let listed = served.listing(&caller).await?;
    let data: Vec<Value> = listed
        .iter()
        .map(|l| match &l.version {
            Some(v) => served.summary(&caller, v),
            // In the registry, not pulled to this replica yet.
            None => json!({
                "id": l.shown,
                "object": "adapter",
                "name": l.key.name,
                "owner": l.key.tenant,
                "public": l.public,
                "version": null,
                "created": l.created,
                "parent": served.base_id,
                "tiers": {"disk": false, "host": false, "device": false},
            }),
        })
        .collect();
    Ok(Json(json!({"object": "list", "data": data})))
}

/// `GET /v1/adapters/{name}`, `GET /v1/adapters/{tenant}/{name}`.
pub async fn get(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    Path(parts): Path<Vec<String>>,
) -> Result<Json<Value>, ApiError> {
    let served = state.served()?;
    let name = joined(&parts);
    served.refresh(&caller, &name).await?;
    off_thread(move || match served.find(&caller, &name) {
        Some(v) => Ok(Json(served.describe(&caller, &v))),
        None => Err(ApiError::adapter_not_found(&name)),
    })
    .await
}

/// `POST /v1/adapters/{name}/{load|unload}`, `POST /v1/adapters/{tenant}/{name}/{load|unload}`.
pub async fn action(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    Path(mut parts): Path<Vec<String>>,
) -> Result<Json<Value>, ApiError> {
    let served = state.served()?;
    let what = parts.pop().unwrap_or_default();
    let name = joined(&parts);
    if what != "load" && what != "unload" {
        return Err(ApiError::not_found(format!(
            "no route for POST /v1/adapters/{name}/{what}: the actions are load and unload"
        ))
        .code("unknown_url"));
    }
    served.refresh(&caller, &name).await?;
    off_thread(move || {
        let v = served.managed(&caller, &name)?;
        if what == "load" {
            served.place(&v)?;
        } else {
            served.engine.unload_adapter(&v).map_err(adapter_error)?;
        }
        Ok(Json(served.describe(&caller, &v)))
    })
    .await
}

impl Served {
    /// Makes `v` resident in device slots now (blocking).
    pub(super) fn place(&self, v: &Arc<Version>) -> Result<(), ApiError> {
        self.engine.load_adapter(v).map_err(|msg| {
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
        })
    }
}

/// `DELETE /v1/adapters/{name}`: the adapter is gone for new requests at once; requests
/// already running on it finish on it, and its slots and files go when they end.
pub async fn delete(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    Path(parts): Path<Vec<String>>,
) -> Result<Json<Value>, ApiError> {
    let served = state.served()?;
    let name = joined(&parts);
    served.refresh(&caller, &name).await?;
    let (key, answer) = off_thread(move || {
        let v = served.managed(&caller, &name)?;
        let gone = served
            .engine
            .registry
            .delete(v.key())
            .map_err(adapter_error)?;
        let version = gone.as_ref().map_or(v.id(), |g| g.id());
        tracing::info!(adapter = %v.key(), version, by = caller.label(), "adapter deleted");
        Ok((
            v.key().clone(),
            json!({"id": name, "object": "adapter", "version": version, "deleted": true}),
        ))
    })
    .await?;
    // It counts in its owner's quota no more. (Where that cannot be written now, the
    // quotas are corrected when the server next starts.)
    let released = match state.adapter_quota().await {
        Ok(q) => q
            .release(key.tenant.as_deref(), &key.name)
            .await
            .map_err(|e| e.to_string()),
        Err(e) => Err(e.message),
    };
    if let Err(e) = released {
        tracing::warn!(adapter = %key, "releasing a deleted adapter's quota: {e}");
    }
    Ok(Json(answer))
}

#[derive(Debug, Deserialize)]
pub struct UploadQuery {
    /// The adapter's name; defaults to the name in its `adapter.json`.
    pub name: Option<String>,
    /// Whether every tenant may use it.
    #[serde(default)]
    pub public: bool,
    /// The owning tenant (admins only; a tenant always uploads into its own namespace).
    pub owner: Option<String>,
}

/// `POST /v1/adapters`: the body is a tar archive of an adapter directory (ours or the
/// reference layout; files at the top or under one directory). It is unpacked and fully
/// validated in a staging directory inside the adapters directory, then installed in one
/// step as the current version of its name in the owner's namespace (201 new, 200 replaced),
/// so a partial or invalid upload is never visible.
pub async fn upload(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    query: Result<Query<UploadQuery>, QueryRejection>,
    headers: axum::http::HeaderMap,
    body: Body,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let Query(q) = query.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let served = state.served()?;
    // The package and its unpacked copy must leave the disk its reserve (a package sent
    // without a length: the reserve itself must be there).
    let declared = headers
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
        .map_or(0, |n| n.min(state.config.limits.max_upload_bytes));
    crate::util::room_for(
        served.engine.registry.store.root(),
        declared.saturating_mul(2),
        state.config.limits.min_free_disk_bytes,
    )
    .map_err(|free| ApiError::insufficient_storage(declared.saturating_mul(2), free))?;
    let owner = match (&caller, &q.owner) {
        (Caller::Tenant(t), None) => Some(t.clone()),
        (Caller::Tenant(t), Some(o)) if o == t => Some(t.clone()),
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
        .staging()
        .map_err(|e| ApiError::logged("creating a staging directory", &e))?;
    let package = staging.scratch().join("package.tar");
    let idle = state.config.limits.body_read_timeout();
    receive(body, &package, state.config.limits.max_upload_bytes, idle).await?;

    let public = q.public;
    let (served2, caller2) = (served.clone(), caller.clone());
    let (key, staging, bytes) =
        off_thread(move || -> Result<(AdapterKey, Staging, u64), ApiError> {
            let served = served2;
            let staged = staging.dir();
            unpack(&package, &staged)?;
            let _ = std::fs::remove_file(&package);
            if !staged.join(MANIFEST_FILE).is_file()
                && !staged.join(REFERENCE_CONFIG_FILE).is_file()
            {
                return Err(ApiError::bad_request(format!(
                    "the package holds neither {MANIFEST_FILE} nor {REFERENCE_CONFIG_FILE}"
                ))
                .code("invalid_adapter"));
            }
            // The name in our manifest, if there is one (a broken manifest is reported below).
            let inner = std::fs::read(staged.join(MANIFEST_FILE))
                .ok()
                .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
                .and_then(|m| m.get("name").and_then(Value::as_str).map(str::to_string));
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
                    format!(
                        "the package's {MANIFEST_FILE} names the adapter {inner:?}, not {name:?}"
                    ),
                ));
            }
            // Everything the engine would check, now, before anything is visible.
            let reg = &served.engine.registry;
            reg.check_servable(&staged, &name, served.engine.config.device_slot_bytes)
                .map_err(|e| ApiError::bad_request(e).code("invalid_adapter"))?;
            let key = AdapterKey {
                tenant: owner,
                name,
            };
            let bytes = adapter_bytes(&staged);
            Ok((key, staging, bytes))
        })
        .await?;
    // Room in the owner's adapter quota, held until the install ends (given back if it
    // fails).
    let quota = state.adapter_quota().await?;
    let held = quota
        .reserve(key.tenant.as_deref(), &key.name, bytes)
        .await
        .map_err(quota_error)?;
    let (served2, k) = (served.clone(), key.clone());
    let done = off_thread(move || {
        served2
            .engine
            .registry
            .install(&k, staging, public)
            .map_err(adapter_error)
    })
    .await;
    let done = match done {
        Ok(done) => done,
        Err(e) => {
            if let Err(c) = held.cancel().await {
                tracing::warn!(adapter = %key, "giving back an adapter quota reservation: {c}; it lapses in an hour");
            }
            return Err(e);
        }
    };
    if let Err(e) = held.settle().await {
        tracing::warn!(adapter = %key, "recording an installed adapter in the quotas: {e}; corrected when the server next starts");
    }
    let replaced = done.replaced.as_ref().map(|o| o.id());
    tracing::info!(adapter = %key, version = done.version.id(), ?replaced, by = caller2.label(), "adapter installed");
    let status = if replaced.is_some() {
        StatusCode::OK
    } else {
        StatusCode::CREATED
    };
    Ok((status, Json(served.describe(&caller2, &done.version))))
}

/// Every tenant adapter the adapter store holds, `(tenant, name, bytes)`: the object-store
/// registry's where there is one, else the adapters directory's. What the adapter quotas
/// are reconciled with.
pub(super) async fn tenant_adapters(
    served: &Arc<Served>,
) -> Result<Vec<(String, String, u64)>, ApiError> {
    let registry = served.engine.registry.clone();
    if let Some(heads) = registry.registry_heads().await.map_err(adapter_error)? {
        return Ok(heads
            .iter()
            .filter(|h| !h.deleted)
            .filter_map(|h| Some((h.key.tenant.clone()?, h.key.name.clone(), h.size_bytes())))
            .collect());
    }
    off_thread(move || {
        Ok(registry
            .store
            .list()
            .iter()
            .filter_map(|v| {
                let bytes = v.read(adapter_bytes).unwrap_or(v.size_bytes());
                Some((v.tenant()?.to_string(), v.name().to_string(), bytes))
            })
            .collect())
    })
    .await
}

/// Streams the request body to `path`, refusing more than `limit` bytes (413) and a body
/// that sends nothing for `idle` (408).
async fn receive(body: Body, path: &FsPath, limit: u64, idle: Duration) -> Result<(), ApiError> {
    let io = |e: std::io::Error| ApiError::logged("storing the upload", &e);
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

/// Unpacks a tar of plain files into the empty directory `dest`, refusing links, absolute paths, `..`, nested
/// directories, duplicates and the server's own `access.json`.
fn unpack(package: &FsPath, dest: &FsPath) -> Result<(), ApiError> {
    let bad = |m: String| ApiError::bad_request(m).code("invalid_package");
    let file = std::fs::File::open(package).map_err(|e| ApiError::logged("unpacking", &e))?;
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
            .map_err(|e| ApiError::logged("unpacking", &e))?;
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
