//! mxc-vm's own failures: one line on stderr (or one JSON object with `--json`) and
//! exit code 125.

use std::io::Write;

/// Exit code when mxc-vm itself fails.
pub const EXIT_MXC_FAILED: i32 = 125;

#[derive(Debug)]
pub struct Failure {
    pub message: String,
    pub details: serde_json::Value,
}

impl Failure {
    pub fn new(message: impl Into<String>) -> Self {
        let message = message.into();
        Self {
            details: serde_json::json!({ "message": message }),
            message,
        }
    }

    /// Print the failure and return the exit code.
    pub fn report(&self, json: bool) -> i32 {
        if json {
            let line = serde_json::json!({ "type": "error", "error": self.details });
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "{line}");
        } else {
            let mut err = std::io::stderr().lock();
            let _ = writeln!(err, "mxc-vm: error: {}", self.message);
        }
        EXIT_MXC_FAILED
    }
}

impl From<policy::PolicyError> for Failure {
    fn from(e: policy::PolicyError) -> Self {
        Self {
            message: e.to_string(),
            details: e.to_json(),
        }
    }
}

/// The message of an error and all its causes, joined with ": ".
pub use sandbox::error_chain as chain;

impl From<sandbox::SandboxError> for Failure {
    fn from(e: sandbox::SandboxError) -> Self {
        let message = chain(&e);
        let kind = match &e {
            sandbox::SandboxError::Unavailable { .. } => "backend_unavailable",
            sandbox::SandboxError::Unenforceable { .. } => "policy_unenforceable",
            sandbox::SandboxError::NoCommand => "no_command",
            sandbox::SandboxError::Setup { .. } | sandbox::SandboxError::SetupFailed { .. } => {
                "setup"
            }
            sandbox::SandboxError::Io { .. } => "io",
            sandbox::SandboxError::Lifecycle(_) => "internal",
            sandbox::SandboxError::Interrupted { .. } => "interrupted",
        };
        Self {
            details: serde_json::json!({ "message": message, "kind": kind }),
            message,
        }
    }
}
