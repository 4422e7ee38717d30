//! The HTTP side of tenancy: the bearer key of a request, and a quota's refusal as an HTTP
//! answer. Everything else about tenants — keys, namespaces, quotas, lifecycles, replicas —
//! lives in `weft-tenancy`, re-exported here for the handlers.

use axum::http::{HeaderMap, header};
use weft_core::{Error, ErrorKind, Result};
pub use weft_store::unix_now;
pub use weft_tenancy::lifecycle::{check_model_config, graph_path};
pub use weft_tenancy::{
    BOOTSTRAP_TENANT, Tenancy, TenancyConfig, TenantScope, follow_shared_store,
};

use crate::error::ApiError;

/// A quota's refusal as the HTTP answer: its status, with `Retry-After` when retrying helps.
pub fn refused(refusal: weft_tenancy::Refusal) -> ApiError {
    match refusal.retry_after_seconds {
        Some(seconds) => ApiError::retry_after(refusal.error, seconds),
        None => ApiError::from(refusal.error),
    }
}

/// The scope of the tenant whose API key the request carries: 401 without a valid key.
pub fn authenticate(tenancy: &Tenancy, headers: &HeaderMap) -> Result<std::sync::Arc<TenantScope>> {
    tenancy.authenticate(bearer(headers)?)
}

/// Checks the operator's admin key on a request.
pub fn authenticate_admin(tenancy: &Tenancy, headers: &HeaderMap) -> Result<()> {
    tenancy.authenticate_admin(bearer(headers)?)
}

/// The bearer token of `Authorization`, or 401 saying how to send one.
fn bearer(headers: &HeaderMap) -> Result<&str> {
    let missing = || {
        Error::new(
            ErrorKind::Unauthenticated,
            "missing API key: send the header 'Authorization: Bearer <key>'",
        )
    };
    let value = headers
        .get(header::AUTHORIZATION)
        .ok_or_else(missing)?
        .to_str()
        .map_err(|_| missing())?;
    let (scheme, token) = value.trim().split_once(' ').ok_or_else(missing)?;
    if !scheme.eq_ignore_ascii_case("bearer") || token.trim().is_empty() {
        return Err(missing());
    }
    Ok(token.trim())
}
