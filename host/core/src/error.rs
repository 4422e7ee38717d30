//! One error type with a protocol-neutral kind; only the server maps kinds to HTTP statuses.

use std::fmt;

/// What went wrong, independent of transport. The server maps each kind to exactly one status.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// The caller sent something malformed or inconsistent with the model (HTTP 400).
    InvalidArgument,
    /// No such model, version or graph visible to this caller (HTTP 404).
    NotFound,
    /// The request body is larger than allowed (HTTP 413).
    PayloadTooLarge,
    /// The model exists but cannot serve now: failed to load, shutting down, queue full (HTTP 503).
    Unavailable,
    /// The operation is not implemented for this model or backend (HTTP 501).
    Unsupported,
    /// A deadline passed before the work finished (HTTP 504).
    DeadlineExceeded,
    /// A bug or an unexpected backend failure (HTTP 500).
    Internal,
    /// No credentials, or credentials nobody issued (HTTP 401).
    Unauthenticated,
    /// The caller is known but a limit of its account forbids this, e.g. a storage quota (HTTP 403).
    PermissionDenied,
    /// The thing already exists in a state this request may not change, e.g. an immutable version
    /// (HTTP 409).
    Conflict,
    /// A rate or concurrency quota is spent for now; retrying later helps (HTTP 429).
    ResourceExhausted,
    /// The client stopped sending its request body (HTTP 408).
    RequestTimeout,
}

impl ErrorKind {
    /// A short stable name, used in logs and metric labels.
    pub const fn as_str(self) -> &'static str {
        match self {
            ErrorKind::InvalidArgument => "invalid_argument",
            ErrorKind::NotFound => "not_found",
            ErrorKind::PayloadTooLarge => "payload_too_large",
            ErrorKind::Unavailable => "unavailable",
            ErrorKind::Unsupported => "unsupported",
            ErrorKind::DeadlineExceeded => "deadline_exceeded",
            ErrorKind::Internal => "internal",
            ErrorKind::Unauthenticated => "unauthenticated",
            ErrorKind::PermissionDenied => "permission_denied",
            ErrorKind::Conflict => "conflict",
            ErrorKind::ResourceExhausted => "resource_exhausted",
            ErrorKind::RequestTimeout => "request_timeout",
        }
    }
}

/// An error with a kind and a message written for the person who caused it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Error {
    kind: ErrorKind,
    message: String,
    /// Whether a plugin trapped (or ran out of fuel or memory) on the way: rollouts count
    /// these apart from other failures, and [`Error::context`] keeps the mark.
    trapped: bool,
}

/// Result with Weft's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Error {
            kind,
            message: message.into(),
            trapped: false,
        }
    }

    /// The same error, marked as a plugin trap (see [`Error::is_trap`]).
    pub fn trapped(mut self) -> Self {
        self.trapped = true;
        self
    }

    /// Whether a sandboxed plugin trapped, or ran out of fuel or memory, on the way here.
    pub fn is_trap(&self) -> bool {
        self.trapped
    }

    pub fn invalid(message: impl Into<String>) -> Self {
        Error::new(ErrorKind::InvalidArgument, message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Error::new(ErrorKind::NotFound, message)
    }

    pub fn unavailable(message: impl Into<String>) -> Self {
        Error::new(ErrorKind::Unavailable, message)
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Error::new(ErrorKind::Internal, message)
    }

    pub fn conflict(message: impl Into<String>) -> Self {
        Error::new(ErrorKind::Conflict, message)
    }

    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    pub fn message(&self) -> &str {
        &self.message
    }

    /// Prefixes the message with context, keeping the kind: `"input 'x': " + message`.
    pub fn context(self, context: impl fmt::Display) -> Self {
        Error {
            kind: self.kind,
            message: format!("{context}: {}", self.message),
            trapped: self.trapped,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Error {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_trap_mark_survives_context_and_plain_errors_have_none() {
        let trap = Error::internal("plugin 'p': trapped: unreachable").trapped();
        let wrapped = trap.context("graph 'g' version 1");
        assert!(wrapped.is_trap());
        assert_eq!(wrapped.kind(), ErrorKind::Internal);
        assert!(!Error::internal("x").context("y").is_trap());
    }
}
