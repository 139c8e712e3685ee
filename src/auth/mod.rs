//! Who is calling: API keys (`Authorization: Bearer <key>`), their tenant and scopes, and
//! their rate limits.
//!
//! A key belongs to one tenant and carries scopes: `ingest` (write events), `read` (analytics
//! and raw events), `admin` (the tenant's keys, usage and data deletion). The bootstrap admin
//! key from `ADTRACK_ADMIN_KEY` is the operator: it manages tenants and every tenant's keys,
//! and reads no event data itself.

pub mod keys;
pub mod rate_limit;
pub mod store;

use std::sync::Arc;

use serde::{Deserialize, Serialize};

pub use rate_limit::RateLimits;
pub use store::{ApiKey, CachedKey, KeyStore, LimitOverrides, Tenant};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    Ingest,
    Read,
    Admin,
}

impl Scope {
    pub const ALL: [Scope; 3] = [Scope::Ingest, Scope::Read, Scope::Admin];

    pub fn name(self) -> &'static str {
        match self {
            Scope::Ingest => "ingest",
            Scope::Read => "read",
            Scope::Admin => "admin",
        }
    }

    pub fn parse(name: &str) -> Option<Scope> {
        Scope::ALL.into_iter().find(|s| s.name() == name)
    }

    fn bit(self) -> u8 {
        1 << (self as u8)
    }
}

/// A set of scopes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Scopes(u8);

impl Scopes {
    pub fn of(scopes: &[Scope]) -> Self {
        Scopes(scopes.iter().fold(0, |acc, s| acc | s.bit()))
    }

    /// Parses scope names; `Err` carries the first unknown one.
    pub fn parse<S: AsRef<str>>(names: &[S]) -> Result<Self, String> {
        let mut scopes = Scopes::default();
        for name in names {
            let scope = Scope::parse(name.as_ref()).ok_or_else(|| name.as_ref().to_string())?;
            scopes.0 |= scope.bit();
        }
        Ok(scopes)
    }

    pub fn contains(self, scope: Scope) -> bool {
        self.0 & scope.bit() != 0
    }

    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    pub fn names(self) -> Vec<&'static str> {
        Scope::ALL
            .into_iter()
            .filter(|s| self.contains(*s))
            .map(Scope::name)
            .collect()
    }
}

/// The authenticated caller of a request.
#[derive(Clone)]
pub enum Principal {
    /// The bootstrap admin key.
    Operator,
    Key(Arc<CachedKey>),
}

impl Principal {
    /// The tenant whose data the caller may touch; `None` for the operator.
    pub fn tenant(&self) -> Option<&str> {
        match self {
            Principal::Operator => None,
            Principal::Key(k) => Some(&k.key.tenant),
        }
    }

    /// How the caller appears in the usage log (never a secret).
    pub fn key_id(&self) -> &str {
        match self {
            Principal::Operator => "bootstrap-admin",
            Principal::Key(k) => &k.key.id,
        }
    }

    pub fn has(&self, scope: Scope) -> bool {
        match self {
            Principal::Operator => scope == Scope::Admin,
            Principal::Key(k) => k.key.scopes.contains(scope),
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum AuthError {
    #[error("missing API key: send `Authorization: Bearer <key>`")]
    Missing,
    /// Unknown, malformed or revoked: one answer for all, so nothing is learnt from it.
    #[error("the API key is not valid")]
    Invalid,
    #[error("the API key cannot be checked now (ClickHouse unavailable); retry")]
    Unavailable,
}

/// Authenticates requests.
pub struct Auth {
    pub store: Arc<KeyStore>,
    bootstrap: Option<keys::KeyHash>,
}

impl Auth {
    pub fn new(store: Arc<KeyStore>, bootstrap_key: Option<&str>) -> Self {
        Auth {
            store,
            bootstrap: bootstrap_key.map(keys::hash),
        }
    }

    /// The caller behind an `Authorization` header value.
    pub async fn authenticate(&self, header: Option<&str>) -> Result<Principal, AuthError> {
        let header = header.map(str::trim).filter(|h| !h.is_empty());
        let Some(header) = header else {
            return Err(AuthError::Missing);
        };
        let token = match header.split_once(' ') {
            Some((scheme, token)) if scheme.eq_ignore_ascii_case("bearer") => token.trim(),
            _ => return Err(AuthError::Invalid),
        };
        let presented = keys::hash(token);
        if let Some(bootstrap) = &self.bootstrap {
            if keys::same_hash(bootstrap, &presented) {
                return Ok(Principal::Operator);
            }
        }
        let id = keys::id_of(token).ok_or(AuthError::Invalid)?;
        let cached = self
            .store
            .lookup(id)
            .await
            .map_err(|_| AuthError::Unavailable)?
            .ok_or(AuthError::Invalid)?;
        if !keys::same_hash(&cached.key.hash, &presented) || cached.key.revoked_at.is_some() {
            return Err(AuthError::Invalid);
        }
        Ok(Principal::Key(cached))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes_round_trip_through_their_names() {
        let s = Scopes::parse(&["read", "ingest"]).unwrap();
        assert!(s.contains(Scope::Read) && s.contains(Scope::Ingest) && !s.contains(Scope::Admin));
        assert_eq!(s.names(), vec!["ingest", "read"]);
        assert_eq!(Scopes::parse(&["read", "write"]), Err("write".to_string()));
        assert!(Scopes::parse::<&str>(&[]).unwrap().is_empty());
    }

    #[test]
    fn the_operator_only_administers() {
        assert!(Principal::Operator.has(Scope::Admin));
        assert!(!Principal::Operator.has(Scope::Read));
        assert!(!Principal::Operator.has(Scope::Ingest));
        assert_eq!(Principal::Operator.tenant(), None);
    }
}
