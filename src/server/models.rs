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
use std::collections::HashSet;
use std::sync::Arc;

use super::auth::Caller;
use super::errors::{adapter_error, off_thread, ApiError};
use super::{AppState, Served};
use crate::adapter::{AdapterKey, Version};

/// One adapter of a listing.
pub struct Listed {
    /// The name that reaches it for the caller.
    pub shown: String,
    pub key: AdapterKey,
    pub public: bool,
    /// Seconds since the epoch when it was published or installed.
    pub created: u64,
    /// This replica's copy of its current content, if it has one.
    pub version: Option<Arc<Version>>,
}

impl Listed {
    fn of(v: Arc<Version>) -> Self {
        Self {
            shown: String::new(),
            key: v.key().clone(),
            public: v.is_public(),
            created: v.installed_at(),
            version: Some(v),
        }
    }
}

impl Served {
    /// The keys `model` may mean to `caller`, in the order [`Served::resolve`] tries them.
    fn candidates(&self, caller: &Caller, model: &str) -> Vec<AdapterKey> {
        if model == self.base_id {
            return Vec::new();
        }
        let stripped = model
            .strip_prefix(self.base_id.as_str())
            .and_then(|r| r.strip_prefix(':'));
        let mut out = Vec::new();
        for name in [Some(model), stripped].into_iter().flatten() {
            let Ok(key) = AdapterKey::parse(name) else {
                continue;
            };
            if let (None, Some(t)) = (&key.tenant, caller.tenant()) {
                out.push(AdapterKey::of_tenant(t, &key.name));
            }
            out.push(key);
        }
        out
    }

    /// Brings this replica's copy of the adapters `model` may name for `caller` in line
    /// with the object-store registry (nothing without one): 503 `store_unavailable` where
    /// the registry does not answer and this replica has no copy.
    pub async fn refresh(self: &Arc<Self>, caller: &Caller, model: &str) -> Result<(), ApiError> {
        let registry = &self.engine.registry;
        if registry.remote().is_none() {
            return Ok(());
        }
        let keys = self.candidates(caller, model);
        if keys.is_empty() {
            return Ok(());
        }
        let allow = |owner: Option<&str>, public: bool| caller.may_use(owner, public);
        match registry.refresh(&keys, &allow).await {
            Ok(()) => Ok(()),
            // Another name `model` may mean is cached here: that one is served.
            Err(e @ crate::adapter::AdapterError::StoreUnavailable(_)) => {
                let (me, c, m) = (self.clone(), caller.clone(), model.to_string());
                let cached = off_thread(move || Ok(me.resolve(&c, &m).ok().flatten().is_some()))
                    .await
                    .unwrap_or(false);
                if cached {
                    Ok(())
                } else {
                    Err(adapter_error(e))
                }
            }
            Err(e) => Err(adapter_error(e)),
        }
    }

    /// What the caller may use, under the names that reach it, in name order: with an
    /// object-store registry, what the store has (and adapters local to this replica);
    /// where the store does not answer, what this replica has (logged).
    pub async fn listing(self: &Arc<Self>, caller: &Caller) -> Result<Vec<Listed>, ApiError> {
        let registry = self.engine.registry.clone();
        let heads = match registry.registry_heads().await {
            Ok(h) => h,
            Err(e) => {
                tracing::warn!(
                    "listing the adapter registry: {e}; listing this replica's adapters only"
                );
                None
            }
        };
        let r = registry.clone();
        let local = off_thread(move || Ok(r.store.list())).await?;
        let all: Vec<Listed> = match heads {
            None => local.into_iter().map(Listed::of).collect(),
            Some(heads) => {
                let named: HashSet<AdapterKey> = heads.iter().map(|h| h.key.clone()).collect();
                let mut all: Vec<Listed> = heads
                    .iter()
                    .filter(|h| !h.deleted)
                    .map(|h| Listed {
                        shown: String::new(),
                        key: h.key.clone(),
                        public: h.public || registry.store.policy_public(&h.key),
                        created: h.created,
                        version: local
                            .iter()
                            .find(|v| {
                                v.key() == &h.key && v.origin().is_some_and(|o| o.hash == h.hash)
                            })
                            .cloned(),
                    })
                    .collect();
                all.extend(
                    local
                        .into_iter()
                        .filter(|v| v.origin().is_none() && !named.contains(v.key()))
                        .map(Listed::of),
                );
                all
            }
        };
        Ok(Self::visible(caller, all))
    }

    /// `all` as `caller` sees it: what it may use, under the names that reach it, in name
    /// order. (A shared adapter a tenant shadows with its own is left out: its name reaches
    /// the tenant's own.)
    fn visible(caller: &Caller, all: Vec<Listed>) -> Vec<Listed> {
        let own: HashSet<String> = all
            .iter()
            .filter(|l| caller.tenant().is_some() && l.key.tenant.as_deref() == caller.tenant())
            .map(|l| l.key.name.clone())
            .collect();
        let mut out: Vec<Listed> = all
            .into_iter()
            .filter(|l| caller.may_use(l.key.tenant.as_deref(), l.public))
            .filter(|l| !(l.key.tenant.is_none() && own.contains(&l.key.name)))
            .map(|mut l| {
                l.shown = Self::shown_key(caller, &l.key);
                l
            })
            .collect();
        out.sort_by(|a, b| a.shown.cmp(&b.shown));
        out
    }

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
        Self::shown_key(caller, v.key())
    }

    fn shown_key(caller: &Caller, key: &AdapterKey) -> String {
        match (key.tenant.as_deref(), caller.tenant()) {
            (Some(t), Some(c)) if t == c => key.name.clone(),
            (None, _) => key.name.clone(),
            _ => key.qualified(),
        }
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

    fn adapter_entry(&self, id: &str, key: &AdapterKey, created: u64) -> Value {
        json!({
            "id": id,
            "object": "model",
            "created": created,
            "owned_by": key.tenant.as_deref().unwrap_or("esft"),
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
    let adapters = served.listing(&caller).await?;
    let mut data = vec![served.base_entry()];
    data.extend(
        adapters
            .iter()
            .map(|l| served.adapter_entry(&l.shown, &l.key, l.created)),
    );
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
    served.refresh(&caller, &id).await?;
    let s = served.clone();
    let c = caller.clone();
    let q = id.clone();
    let found = off_thread(move || s.resolve(&c, &q)).await?;
    match found {
        None => Ok(Json(served.base_entry())),
        Some(v) => Ok(Json(served.adapter_entry(&id, v.key(), v.installed_at()))),
    }
}
