//! The protocol's error codes, and why an evaluation produced no output.

use std::fmt;

/// The `code` of an `error` frame (docs/protocol.md, "Errors").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    BadJson,
    BadRequest,
    UnknownOp,
    UnknownFn,
    Forbidden,
    Busy,
    RateLimited,
    ShuttingDown,
    StaleTask,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadJson => "bad_json",
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::UnknownOp => "unknown_op",
            ErrorCode::UnknownFn => "unknown_fn",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::Busy => "busy",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::ShuttingDown => "shutting_down",
            ErrorCode::StaleTask => "stale_task",
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why an evaluation produced no output; every waiter of it receives this.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EvalError {
    /// `eval_failed`: the evaluator reported an error, panicked or crashed.
    Failed(String),
    /// `eval_timeout`: it ran past its evaluator's `timeout_ms`.
    Timeout(String),
    /// `deadline_exceeded`: one request's own `deadline_ms` passed first;
    /// only that request gets it, and it is never cached or stored.
    Deadline(String),
}

impl EvalError {
    pub fn code(&self) -> &'static str {
        match self {
            EvalError::Failed(_) => "eval_failed",
            EvalError::Timeout(_) => "eval_timeout",
            EvalError::Deadline(_) => "deadline_exceeded",
        }
    }

    pub fn message(&self) -> &str {
        match self {
            EvalError::Failed(m) | EvalError::Timeout(m) | EvalError::Deadline(m) => m,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{ErrorCode, EvalError};

    #[test]
    fn codes_are_the_protocol_s() {
        let codes = [
            (ErrorCode::BadJson, "bad_json"),
            (ErrorCode::BadRequest, "bad_request"),
            (ErrorCode::UnknownOp, "unknown_op"),
            (ErrorCode::UnknownFn, "unknown_fn"),
            (ErrorCode::Forbidden, "forbidden"),
            (ErrorCode::Busy, "busy"),
            (ErrorCode::RateLimited, "rate_limited"),
            (ErrorCode::ShuttingDown, "shutting_down"),
            (ErrorCode::StaleTask, "stale_task"),
        ];
        for (code, text) in codes {
            assert_eq!(code.as_str(), text);
            assert_eq!(code.to_string(), text);
        }
        let failed = EvalError::Failed("boom".into());
        let timeout = EvalError::Timeout("slow".into());
        assert_eq!((failed.code(), failed.message()), ("eval_failed", "boom"));
        assert_eq!(
            (timeout.code(), timeout.message()),
            ("eval_timeout", "slow")
        );
        let late = EvalError::Deadline("late".into());
        assert_eq!((late.code(), late.message()), ("deadline_exceeded", "late"));
    }
}
