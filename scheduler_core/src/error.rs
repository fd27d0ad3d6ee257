//! The one error type of the core; the Python layer turns each variant into its own exception
//! class (`py/errors.rs`).

use thiserror::Error;

#[derive(Debug, Error, Clone, PartialEq)]
pub enum CoreError {
    /// A configuration or input value is out of its domain.
    #[error("invalid {field} = {value}: {reason}")]
    InvalidInput { field: &'static str, value: String, reason: String },
    /// No stage plan satisfies the capacity constraints.
    #[error("infeasible: {0}")]
    Infeasible(String),
    /// An id the caller never registered.
    #[error("unknown {kind} {id}")]
    Unknown { kind: &'static str, id: u64 },
}

impl CoreError {
    pub fn invalid(field: &'static str, value: impl ToString, reason: impl Into<String>) -> Self {
        CoreError::InvalidInput { field, value: value.to_string(), reason: reason.into() }
    }
}

pub type Result<T> = std::result::Result<T, CoreError>;
