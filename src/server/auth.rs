//! API keys and tenants. Keys are configured as SHA-256 digests only; a request's
//! `Authorization: Bearer KEY` is hashed and looked up. Adapters belong to a tenant (or to
//! nobody: admin only) and may be public.

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{header, StatusCode};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;

use super::config::AuthConfig;
use super::errors::ApiError;
use super::AppState;

/// Who is calling.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// No keys are configured: everyone may do everything.
    Open,
    Admin,
    Tenant(String),
}

/// Who an adapter belongs to, and whether every tenant may use it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Access {
    #[serde(default)]
    pub owner: Option<String>,
    #[serde(default)]
    pub public: bool,
}

/// Written into an uploaded adapter's directory.
pub const ACCESS_FILE: &str = "access.json";

impl Caller {
    pub fn tenant(&self) -> Option<&str> {
        match self {
            Caller::Tenant(t) => Some(t),
            _ => None,
        }
    }

    pub fn is_admin(&self) -> bool {
        matches!(self, Caller::Open | Caller::Admin)
    }

    pub fn can_use(&self, a: &Access) -> bool {
        match self {
            Caller::Open | Caller::Admin => true,
            Caller::Tenant(t) => a.public || a.owner.as_deref() == Some(t),
        }
    }

    pub fn can_manage(&self, a: &Access) -> bool {
        match self {
            Caller::Open | Caller::Admin => true,
            Caller::Tenant(t) => a.owner.as_deref() == Some(t),
        }
    }

    /// The label a tenant has in logs.
    pub fn label(&self) -> &str {
        match self {
            Caller::Open => "open",
            Caller::Admin => "admin",
            Caller::Tenant(t) => t,
        }
    }
}

pub struct Auth {
    /// key digest (lowercase hex) -> caller
    keys: HashMap<String, Caller>,
    public: HashSet<String>,
    /// adapter -> owning tenant, from the config
    owners: HashMap<String, String>,
}

pub fn hash_key(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

impl Auth {
    pub fn new(c: &AuthConfig) -> Self {
        let mut keys = HashMap::new();
        for k in &c.admin_key_sha256 {
            keys.insert(k.to_ascii_lowercase(), Caller::Admin);
        }
        let mut owners = HashMap::new();
        for t in &c.tenants {
            for k in &t.key_sha256 {
                keys.insert(k.to_ascii_lowercase(), Caller::Tenant(t.name.clone()));
            }
            for a in &t.adapters {
                owners.insert(a.clone(), t.name.clone());
            }
        }
        Self {
            keys,
            public: c.public_adapters.iter().cloned().collect(),
            owners,
        }
    }

    pub fn is_open(&self) -> bool {
        self.keys.is_empty()
    }

    /// The caller behind an `Authorization` header value.
    pub fn authenticate(&self, header: Option<&str>) -> Result<Caller, ApiError> {
        if self.is_open() {
            return Ok(Caller::Open);
        }
        let unauthorized = |msg: &str, code| {
            ApiError::new(StatusCode::UNAUTHORIZED, "authentication_error", msg).code(code)
        };
        let Some(value) = header else {
            return Err(unauthorized(
                "no API key: send `Authorization: Bearer <key>`",
                "missing_api_key",
            ));
        };
        let key = value
            .strip_prefix("Bearer ")
            .or_else(|| value.strip_prefix("bearer "))
            .map(str::trim)
            .unwrap_or("");
        if key.is_empty() {
            return Err(unauthorized(
                "no API key: send `Authorization: Bearer <key>`",
                "missing_api_key",
            ));
        }
        self.keys
            .get(&hash_key(key))
            .cloned()
            .ok_or_else(|| unauthorized("the API key is not valid", "invalid_api_key"))
    }

    /// Who `name` (a directory `dir` of the adapters directory) belongs to: the config
    /// first, then the directory's `access.json`; neither: admin only, not public.
    pub fn access(&self, name: &str, dir: &Path) -> Access {
        let mut a: Access = std::fs::read(dir.join(ACCESS_FILE))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        if let Some(owner) = self.owners.get(name) {
            a.owner = Some(owner.clone());
        }
        if self.public.contains(name) {
            a.public = true;
        }
        a
    }
}

impl FromRequestParts<Arc<AppState>> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<AppState>,
    ) -> Result<Self, Self::Rejection> {
        let header = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        state.auth.authenticate(header)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::config::TenantConfig;

    #[test]
    fn keys_map_to_callers_and_access_follows_ownership() {
        let auth = Auth::new(&AuthConfig {
            admin_key_sha256: vec![hash_key("root")],
            public_adapters: vec!["shared".into()],
            tenants: vec![TenantConfig {
                name: "acme".into(),
                key_sha256: vec![hash_key("acme-key").to_uppercase()],
                adapters: vec!["mine".into()],
            }],
        });
        assert_eq!(
            auth.authenticate(Some("Bearer root")).unwrap(),
            Caller::Admin
        );
        let acme = auth.authenticate(Some("Bearer acme-key")).unwrap();
        assert_eq!(acme, Caller::Tenant("acme".into()));
        for bad in [None, Some("Bearer "), Some("Bearer nope"), Some("root")] {
            assert_eq!(
                auth.authenticate(bad).unwrap_err().status,
                StatusCode::UNAUTHORIZED
            );
        }
        let dir = tempfile::tempdir().unwrap();
        let mine = auth.access("mine", dir.path());
        let shared = auth.access("shared", dir.path());
        let other = auth.access("other", dir.path());
        assert!(acme.can_use(&mine) && acme.can_manage(&mine));
        assert!(acme.can_use(&shared) && !acme.can_manage(&shared));
        assert!(!acme.can_use(&other));
        assert!(Caller::Admin.can_manage(&other));
        std::fs::write(
            dir.path().join(ACCESS_FILE),
            r#"{"owner": "acme", "public": false}"#,
        )
        .unwrap();
        assert!(acme.can_manage(&auth.access("other", dir.path())));
        assert!(Auth::new(&AuthConfig::default()).is_open());
    }
}
