//! `model` names: the base model's id, an adapter name, or `<base>:<adapter>`; and
//! `GET /v1/models`, which lists what the caller may use.

use axum::extract::{Path, State};
use axum::Json;
use serde_json::{json, Value};
use std::sync::Arc;

use super::auth::{Access, Caller};
use super::errors::ApiError;
use super::{AppState, Served};
use crate::adapter::format::validate_name;

impl Served {
    /// The adapter `model` names (`None`: the base), if the caller may use it. Anything
    /// else, including another tenant's private adapter, is "not found".
    pub fn resolve(
        &self,
        state: &AppState,
        caller: &Caller,
        model: &str,
    ) -> Result<Option<String>, ApiError> {
        if model == self.base_id {
            return Ok(None);
        }
        let name = model
            .strip_prefix(self.base_id.as_str())
            .and_then(|rest| rest.strip_prefix(':'))
            .unwrap_or(model);
        match self.adapter_access(state, name) {
            Some(a) if caller.can_use(&a) => Ok(Some(name.to_string())),
            _ => Err(ApiError::model_not_found(model)),
        }
    }

    /// Who owns `name`, if it is an adapter in the adapters directory.
    pub fn adapter_access(&self, state: &AppState, name: &str) -> Option<Access> {
        validate_name(name).ok()?;
        let dir = self.engine.registry.store.path(name).ok()?;
        Some(state.auth.access(name, &dir))
    }

    /// Adapters the caller may use, with their access, in name order.
    pub fn visible_adapters(&self, state: &AppState, caller: &Caller) -> Vec<(String, Access)> {
        let store = &self.engine.registry.store;
        store
            .rescan()
            .into_iter()
            .filter_map(|name| {
                let dir = store.path(&name).ok()?;
                let a = state.auth.access(&name, &dir);
                caller.can_use(&a).then_some((name, a))
            })
            .collect()
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

    fn adapter_entry(&self, name: &str, a: &Access) -> Value {
        json!({
            "id": name,
            "object": "model",
            "created": self.created,
            "owned_by": a.owner.as_deref().unwrap_or("esft"),
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
    let st = state.clone();
    let adapters = tokio::task::spawn_blocking(move || s.visible_adapters(&st, &caller))
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?;
    let mut data = vec![served.base_entry()];
    data.extend(adapters.iter().map(|(n, a)| served.adapter_entry(n, a)));
    Ok(Json(json!({"object": "list", "data": data})))
}

pub async fn get(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let served = state.served()?;
    match served.resolve(&state, &caller, &id)? {
        None => Ok(Json(served.base_entry())),
        Some(name) => {
            let a = served
                .adapter_access(&state, &name)
                .ok_or_else(|| ApiError::model_not_found(&id))?;
            Ok(Json(served.adapter_entry(&name, &a)))
        }
    }
}
