//! Cross-origin access for browser clients (`--allowed-origins`, `--allowed-methods`,
//! `--allowed-headers`, `--allow-credentials`, vLLM's flags): which pages on other origins may
//! call the API, checked once at start-up into a tower-http [`CorsLayer`] that answers
//! preflights before any route (so before the API key check: a preflight never carries the key).
//!
//! The Fetch standard's rules decide the headers: a wildcard is never sent where a browser
//! would not honour it. Access-Control-Allow-Headers `*` does not cover `Authorization` (the
//! header every OpenAI client sends), and no `*` counts on a credentialed request; so `*` for
//! methods and headers is answered by echoing what the preflight asks for, and `*` for origins
//! with credentials by echoing the request's origin (with `Vary: Origin`).

use axum::http::{HeaderName, HeaderValue, Method};
use tower_http::cors::{AllowHeaders, AllowMethods, AllowOrigin, CorsLayer};

/// The flags as given. No origins: no cross-origin access (no CORS headers at all).
#[derive(Debug, Clone, Default)]
pub struct CorsPolicy {
    /// `*`, or origins as browsers send them (`scheme://host[:port]`).
    pub allowed_origins: Vec<String>,
    /// Empty or `*`: any method.
    pub allowed_methods: Vec<String>,
    /// Empty or `*`: any header.
    pub allowed_headers: Vec<String>,
    /// Pages may send cookies or HTTP authentication with their requests.
    pub allow_credentials: bool,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum CorsError {
    #[error("--allowed-origins: `{0}` is not an origin (scheme://host[:port], no path) or `*`")]
    Origin(String),
    #[error("--allowed-methods: `{0}` is not an HTTP method")]
    Method(String),
    #[error("--allowed-headers: `{0}` is not an HTTP header name")]
    Header(String),
}

/// How long a browser may cache a preflight's answer.
const PREFLIGHT_MAX_AGE: std::time::Duration = std::time::Duration::from_secs(600);

impl CorsPolicy {
    /// The layer to put outside every route, or `None` without allowed origins.
    pub fn layer(&self) -> Result<Option<CorsLayer>, CorsError> {
        if self.allowed_origins.is_empty() {
            return Ok(None);
        }
        let wildcard = |list: &[String]| list.is_empty() || list.iter().any(|v| v.trim() == "*");
        let origin = if wildcard(&self.allowed_origins) {
            if self.allow_credentials {
                AllowOrigin::mirror_request()
            } else {
                AllowOrigin::any()
            }
        } else {
            let origins =
                self.allowed_origins.iter().map(|o| parse_origin(o.trim())).collect::<Result<Vec<_>, _>>()?;
            AllowOrigin::list(origins)
        };
        let methods = if wildcard(&self.allowed_methods) {
            AllowMethods::mirror_request()
        } else {
            let methods = self
                .allowed_methods
                .iter()
                .map(|m| {
                    let m = m.trim().to_ascii_uppercase();
                    Method::from_bytes(m.as_bytes()).map_err(|_| CorsError::Method(m.clone()))
                })
                .collect::<Result<Vec<_>, _>>()?;
            AllowMethods::list(methods)
        };
        let headers = if wildcard(&self.allowed_headers) {
            AllowHeaders::mirror_request()
        } else {
            let headers = self
                .allowed_headers
                .iter()
                .map(|h| HeaderName::try_from(h.trim()).map_err(|_| CorsError::Header(h.trim().to_string())))
                .collect::<Result<Vec<_>, _>>()?;
            AllowHeaders::list(headers)
        };
        Ok(Some(
            CorsLayer::new()
                .allow_origin(origin)
                .allow_methods(methods)
                .allow_headers(headers)
                .allow_credentials(self.allow_credentials)
                .max_age(PREFLIGHT_MAX_AGE),
        ))
    }
}

/// An origin as a browser serializes it: `scheme://host[:port]`, nothing after.
fn parse_origin(origin: &str) -> Result<HeaderValue, CorsError> {
    let bad = || CorsError::Origin(origin.to_string());
    let (scheme, authority) = origin.split_once("://").ok_or_else(bad)?;
    let scheme_ok = !scheme.is_empty()
        && scheme.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'));
    if !scheme_ok || authority.is_empty() || authority.contains(['/', '?', '#', ' ']) {
        return Err(bad());
    }
    HeaderValue::from_str(origin).map_err(|_| bad())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(origins: &[&str]) -> CorsPolicy {
        CorsPolicy { allowed_origins: origins.iter().map(|s| s.to_string()).collect(), ..Default::default() }
    }

    #[test]
    fn bad_values_are_named() {
        for bad in ["example.com", "https://example.com/", "https://example.com/app", "://x", "https://"] {
            assert_eq!(policy(&[bad]).layer().unwrap_err(), CorsError::Origin(bad.into()), "{bad}");
        }
        let p = CorsPolicy { allowed_methods: vec!["GET".into(), "PO ST".into()], ..policy(&["*"]) };
        assert_eq!(p.layer().unwrap_err(), CorsError::Method("PO ST".into()));
        let p = CorsPolicy { allowed_headers: vec!["x-ok".into(), "bad header".into()], ..policy(&["*"]) };
        assert_eq!(p.layer().unwrap_err(), CorsError::Header("bad header".into()));
        assert!(policy(&[]).layer().unwrap().is_none(), "no origins: no layer");
        assert!(policy(&["http://localhost:3000", "https://app.example"]).layer().unwrap().is_some());
        // Credentials with every wildcard: tower-http would panic on `*` there; echoing is used.
        let p = CorsPolicy { allow_credentials: true, ..policy(&["*"]) };
        assert!(p.layer().unwrap().is_some());
    }
}
