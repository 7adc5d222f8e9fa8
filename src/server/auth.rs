//! API keys and tenants. Keys are configured as SHA-256 digests only; a request's
//! `Authorization: Bearer KEY` is hashed and looked up. Who may use and manage an adapter
//! follows from its namespace (a tenant's, or the shared one: admin only) and whether it
//! is public; the configuration's ownership lists become the store's [`Policy`].

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{header, StatusCode};
use sha2::{Digest, Sha256};
use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use super::config::{AuthConfig, MetricsConfig};
use super::errors::ApiError;
use super::AppState;
use crate::adapter::{Policy, Version};

/// Who is calling.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// No keys are configured: everyone may do everything.
    Open,
    Admin,
    Tenant(String),
}

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

    /// Its own adapters and public ones (a tenant); everything (an admin).
    pub fn can_use(&self, v: &Version) -> bool {
        self.may_use(v.tenant(), v.is_public())
    }

    /// Whether it may use an adapter of tenant `owner` (`None`: shared) that is `public`.
    pub fn may_use(&self, owner: Option<&str>, public: bool) -> bool {
        match self {
            Caller::Open | Caller::Admin => true,
            Caller::Tenant(t) => public || owner == Some(t.as_str()),
        }
    }

    /// Its own adapters (a tenant); everything (an admin).
    pub fn can_manage(&self, v: &Version) -> bool {
        match self {
            Caller::Open | Caller::Admin => true,
            Caller::Tenant(t) => v.tenant() == Some(t.as_str()),
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
    /// Digests of keys that may only read `/metrics`.
    metrics_keys: HashSet<String>,
    /// Whether `/metrics` needs the admin key or a metrics key.
    metrics_need_key: bool,
}

pub fn hash_key(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

impl Auth {
    pub fn new(c: &AuthConfig, m: &MetricsConfig) -> Self {
        let mut keys = HashMap::new();
        for k in &c.admin_key_sha256 {
            keys.insert(k.to_ascii_lowercase(), Caller::Admin);
        }
        for t in &c.tenants {
            for k in &t.key_sha256 {
                keys.insert(k.to_ascii_lowercase(), Caller::Tenant(t.name.clone()));
            }
        }
        Self {
            keys,
            metrics_keys: m
                .key_sha256
                .iter()
                .map(|k| k.to_ascii_lowercase())
                .collect(),
            metrics_need_key: m.require_admin,
        }
    }

    /// The store's view of the configuration: names reserved for tenants, public adapters.
    pub fn policy(c: &AuthConfig) -> Policy {
        let mut reserved = HashMap::new();
        for t in &c.tenants {
            for a in &t.adapters {
                reserved.insert(a.clone(), t.name.clone());
            }
        }
        Policy {
            reserved,
            public: c.public_adapters.iter().cloned().collect(),
        }
    }

    /// Whether a `/metrics` request may read the metrics, and whether it may see every
    /// adapter's name in them (an admin, a metrics key, or a server without keys).
    pub fn scrape(&self, header: Option<&str>) -> Result<bool, ApiError> {
        let key = header.and_then(bearer);
        if key.is_some_and(|k| self.metrics_keys.contains(&hash_key(k))) {
            return Ok(true);
        }
        if !self.metrics_need_key {
            return Ok(self.is_open()
                || header.is_some_and(|h| self.authenticate(Some(h)).is_ok_and(|c| c.is_admin())));
        }
        match self.authenticate(header)? {
            c if c.is_admin() => Ok(true),
            _ => Err(ApiError::forbidden(
                "the metrics need an admin key or a metrics key",
            )),
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
        let Some(key) = bearer(value) else {
            return Err(unauthorized(
                "no API key: send `Authorization: Bearer <key>`",
                "missing_api_key",
            ));
        };
        self.keys
            .get(&hash_key(key))
            .cloned()
            .ok_or_else(|| unauthorized("the API key is not valid", "invalid_api_key"))
    }
}

/// The key of an `Authorization: Bearer KEY` header value.
fn bearer(value: &str) -> Option<&str> {
    value
        .strip_prefix("Bearer ")
        .or_else(|| value.strip_prefix("bearer "))
        .map(str::trim)
        .filter(|k| !k.is_empty())
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
    fn keys_map_to_callers_and_the_metrics_need_a_key() {
        let config = AuthConfig {
            admin_key_sha256: vec![hash_key("root")],
            public_adapters: vec!["shared".into()],
            tenants: vec![TenantConfig {
                name: "acme".into(),
                key_sha256: vec![hash_key("acme-key").to_uppercase()],
                adapters: vec!["mine".into()],
                ..TenantConfig::default()
            }],
        };
        let metrics = MetricsConfig {
            key_sha256: vec![hash_key("scraper")],
            ..MetricsConfig::default()
        };
        let auth = Auth::new(&config, &metrics);
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
        // A metrics key reads the metrics and nothing else.
        assert!(auth.authenticate(Some("Bearer scraper")).is_err());
        assert_eq!(auth.scrape(Some("Bearer scraper")), Ok(true));
        assert_eq!(auth.scrape(Some("Bearer root")), Ok(true));
        assert_eq!(
            auth.scrape(Some("Bearer acme-key")).unwrap_err().status,
            StatusCode::FORBIDDEN
        );
        assert_eq!(
            auth.scrape(None).unwrap_err().status,
            StatusCode::UNAUTHORIZED
        );
        // Turned off: anyone reads them, but only privileged scrapers see private names.
        let open_metrics = MetricsConfig {
            require_admin: false,
            ..MetricsConfig::default()
        };
        let auth = Auth::new(&config, &open_metrics);
        assert_eq!(auth.scrape(None), Ok(false));
        assert_eq!(auth.scrape(Some("Bearer acme-key")), Ok(false));
        assert_eq!(auth.scrape(Some("Bearer root")), Ok(true));
        let policy = Auth::policy(&config);
        assert_eq!(policy.reserved["mine"], "acme");
        assert!(policy.public.contains("shared"));
        let open = Auth::new(&AuthConfig::default(), &MetricsConfig::default());
        assert!(open.is_open());
        assert_eq!(open.scrape(None), Ok(true));
    }
}
