//! `model` names and what they mean to a caller: the base model's id, an adapter, or
//! `<base>:<adapter>`; and `GET /v1/models`, which lists what the caller may use.
//!
//! An adapter is named `NAME` or `TENANT/NAME`. A bare `NAME` means the caller's own
//! adapter (a tenant's), else the shared adapter `NAME` if the caller may use it; an admin's
//! bare `NAME` is the shared one. Listings show each adapter under the name that reaches it
//! for that caller. Anything the caller may not use is "not found".

use axum::extract::{Path, State};
use axum::Json;
use serde_json::{json, Value};
use std::sync::Arc;

use super::auth::Caller;
use super::errors::{off_thread, ApiError};
use super::{AppState, Served};
use crate::adapter::{AdapterKey, Version};

impl Served {
    /// The adapter version `model` names (`None`: the base), if the caller may use it.
    pub fn resolve(&self, caller: &Caller, model: &str) -> Result<Option<Arc<Version>>, ApiError> {
        if model == self.base_id {
            return Ok(None);
        }
        // Adapter names may hold ':' (`ft:<base>:<suffix>:<id>`): the whole name first,
        // then `<base>:<adapter>`.
        self.find(caller, model)
            .or_else(|| {
                let rest = model
                    .strip_prefix(self.base_id.as_str())?
                    .strip_prefix(':')?;
                self.find(caller, rest)
            })
            .map(Some)
            .ok_or_else(|| ApiError::model_not_found(model))
    }

    /// The current version `name` means to `caller`, if it may use it.
    pub fn find(&self, caller: &Caller, name: &str) -> Option<Arc<Version>> {
        let key = AdapterKey::parse(name).ok()?;
        let mut keys = Vec::with_capacity(2);
        if let (None, Some(t)) = (&key.tenant, caller.tenant()) {
            keys.push(AdapterKey::of_tenant(t, &key.name));
        }
        keys.push(key);
        let v = self.engine.registry.resolve(&keys)?;
        caller.can_use(&v).then_some(v)
    }

    /// How `caller` names `v`: bare for its own adapters and shared ones, `TENANT/NAME`
    /// for another tenant's.
    pub fn shown_name(caller: &Caller, v: &Version) -> String {
        match (v.tenant(), caller.tenant()) {
            (Some(t), Some(c)) if t == c => v.name().to_string(),
            (None, _) => v.name().to_string(),
            _ => v.qualified(),
        }
    }

    /// Adapters the caller may use, under the names that reach them, in name order.
    /// (A shared adapter a tenant shadows with its own is left out: its name reaches the
    /// tenant's own.)
    pub fn visible_adapters(&self, caller: &Caller) -> Vec<(String, Arc<Version>)> {
        let all = self.engine.registry.store.list();
        let own: Vec<String> = all
            .iter()
            .filter(|v| caller.tenant().is_some() && v.tenant() == caller.tenant())
            .map(|v| v.name().to_string())
            .collect();
        let mut out: Vec<(String, Arc<Version>)> = all
            .into_iter()
            .filter(|v| caller.can_use(v))
            .filter(|v| !(v.tenant().is_none() && own.iter().any(|n| n == v.name())))
            .map(|v| (Self::shown_name(caller, &v), v))
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    fn base_entry(&self) -> Value {
        json!({
            "id": self.base_id,
            "object": "model",
            "created": self.created,
            "owned_by": "esft",
            "root": self.base_id,
            "parent": null,
            "max_model_len": self.max_context,
        })
    }

    fn adapter_entry(&self, id: &str, v: &Version) -> Value {
        json!({
            "id": id,
            "object": "model",
            "created": v.installed_at(),
            "owned_by": v.tenant().unwrap_or("esft"),
            "root": self.base_id,
            "parent": self.base_id,
            "max_model_len": self.max_context,
        })
    }
}

pub async fn list(
    State(state): State<Arc<AppState>>,
    caller: Caller,
) -> Result<Json<Value>, ApiError> {
    let served = state.served()?;
    let s = served.clone();
    let adapters = off_thread(move || Ok(s.visible_adapters(&caller))).await?;
    let mut data = vec![served.base_entry()];
    data.extend(adapters.iter().map(|(n, v)| served.adapter_entry(n, v)));
    Ok(Json(json!({"object": "list", "data": data})))
}

/// `GET /v1/models/{id}` and `GET /v1/models/{tenant}/{name}`.
pub async fn get(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    Path(parts): Path<Vec<String>>,
) -> Result<Json<Value>, ApiError> {
    let id = parts.join("/");
    let served = state.served()?;
    let s = served.clone();
    let c = caller.clone();
    let q = id.clone();
    let found = off_thread(move || s.resolve(&c, &q)).await?;
    match found {
        None => Ok(Json(served.base_entry())),
        Some(v) => Ok(Json(served.adapter_entry(&id, &v))),
    }
}
