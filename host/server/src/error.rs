//! The one place where an error kind becomes an HTTP status and a V2 `{"error": "..."}` body.

use axum::Json;
use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use weft_core::{Error, ErrorKind};
use weft_protocol::ErrorResponse;

/// An error on its way to the client; a quota refusal also says when to retry.
#[derive(Debug)]
pub struct ApiError {
    pub error: Error,
    /// Seconds for a `Retry-After` header (429 refusals).
    pub retry_after: Option<u64>,
}

impl ApiError {
    /// A refusal the caller may retry after `seconds`.
    pub fn retry_after(error: Error, seconds: u64) -> Self {
        ApiError {
            error,
            retry_after: Some(seconds.max(1)),
        }
    }
}

impl From<Error> for ApiError {
    fn from(error: Error) -> Self {
        ApiError {
            error,
            retry_after: None,
        }
    }
}

/// axum's `Path` extractor, except that a path that does not decode (invalid UTF-8 after
/// percent-decoding, a segment of the wrong type) answers 400 with a V2 `{"error": ...}` body
/// instead of axum's plain-text rejection.
pub struct Path<T>(pub T);

impl<T, S> FromRequestParts<S> for Path<T>
where
    T: serde::de::DeserializeOwned + Send,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        match axum::extract::Path::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Path(value)) => Ok(Path(value)),
            Err(rejection) => Err(ApiError::from(Error::invalid(format!(
                "bad request path: {}",
                rejection.body_text()
            )))),
        }
    }
}

/// The status each kind maps to (Triton's mapping, plus 401, 403, 408, 409, 413, 429 and 504).
pub fn status_of(kind: ErrorKind) -> StatusCode {
    match kind {
        ErrorKind::InvalidArgument => StatusCode::BAD_REQUEST,
        ErrorKind::NotFound => StatusCode::NOT_FOUND,
        ErrorKind::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
        ErrorKind::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        ErrorKind::Unsupported => StatusCode::NOT_IMPLEMENTED,
        ErrorKind::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
        ErrorKind::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        ErrorKind::Unauthenticated => StatusCode::UNAUTHORIZED,
        ErrorKind::PermissionDenied => StatusCode::FORBIDDEN,
        ErrorKind::Conflict => StatusCode::CONFLICT,
        ErrorKind::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
        ErrorKind::RequestTimeout => StatusCode::REQUEST_TIMEOUT,
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = status_of(self.error.kind());
        if status.is_server_error() {
            tracing::error!(kind = self.error.kind().as_str(), error = %self.error, "request failed");
        } else {
            tracing::info!(kind = self.error.kind().as_str(), error = %self.error, "request refused");
        }
        let body = ErrorResponse {
            error: self.error.message().to_string(),
        };
        let mut response = (status, Json(body)).into_response();
        if let Some(seconds) = self.retry_after
            && let Ok(value) = HeaderValue::from_str(&seconds.to_string())
        {
            response.headers_mut().insert(header::RETRY_AFTER, value);
        }
        if status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"weft\""),
            );
        }
        response
    }
}
