//! Errors: the library's error type and the protocol's error codes.

/// What can stop the broker from starting or running.
#[derive(Debug, thiserror::Error)]
pub enum HerdError {
    #[error("configuration: {0}")]
    Config(String),
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("evaluator {name:?}: {message}")]
    Evaluator { name: String, message: String },
}

pub use herd_core::error::{ErrorCode, EvalError};

/// The message a panic carried, for an error that reports it.
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "unknown panic".to_string()
    }
}
