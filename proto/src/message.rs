//! JSON control messages and their validation.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::{ProtoError, DEFAULT_MAX_FRAME, MIN_MAX_FRAME, PROTOCOL_VERSION};

/// One control message. On the wire: a JSON object whose `"type"` names the variant
/// in snake case, e.g. `{"type":"stdin_close","id":1}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Control {
    /// Host to agent, the host's answer to [`Control::Ready`]: its version and the
    /// negotiated maximum frame size both sides use from now on.
    Hello {
        /// Protocol version of the host.
        version: u32,
        /// Negotiated maximum frame size (whole frame).
        max_frame: u32,
    },
    /// Agent to host, first message on every connection.
    Ready {
        /// Protocol version of the agent.
        version: u32,
        /// Build version of the agent, for logs.
        agent_version: String,
        /// Largest frame the agent accepts.
        max_frame: u32,
    },
    /// Host to agent: start a process.
    Exec(Exec),
    /// Agent to host: the agent has taken `bytes` more stdin bytes of exec `id` off
    /// its buffer; the host may send that many more (see [`crate::STDIN_WINDOW`]).
    StdinCredit {
        /// The exec.
        id: u32,
        /// Bytes credited back.
        bytes: u64,
    },
    /// Host to agent: no more stdin for exec `id` (the agent closes the pipe).
    StdinClose {
        /// The exec.
        id: u32,
    },
    /// Host to agent: send signal `signo` to the process group of exec `id`.
    Signal {
        /// The exec.
        id: u32,
        /// Signal number (1..=64).
        signo: i32,
    },
    /// Agent to host: exec `id` finished; all its output frames came before this.
    Exit(Exit),
    /// Either way: something went wrong. With an `id`, that exec is over (it could not
    /// start, or was refused); without, the connection-level request failed.
    Error {
        /// The exec concerned, if any.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<u32>,
        /// What went wrong.
        message: String,
    },
    /// Host to agent: power the guest off (outside a VM: the agent exits).
    Shutdown,
    /// Either way: are you there?
    Ping,
    /// The answer to [`Control::Ping`].
    Pong,
    /// Host to agent, once, before any exec: create these links and mount these shares,
    /// as the kernel command line's `mxc.links=` and `mxc.mounts=` would have at boot
    /// (same encoding, see [`crate::mounts`]). A VM restored from a snapshot gets its
    /// shares this way. Answered with [`Control::SetupDone`] or an [`Control::Error`];
    /// after a failure the agent refuses every exec.
    Setup {
        /// `mxc.links=` value (empty: none).
        #[serde(default)]
        links: String,
        /// `mxc.mounts=` value (empty: none).
        #[serde(default)]
        mounts: String,
    },
    /// The answer to a [`Control::Setup`] that succeeded.
    SetupDone,
}

impl Control {
    /// Serializes to the JSON payload of a control frame.
    pub fn to_json(&self) -> Result<Vec<u8>, ProtoError> {
        serde_json::to_vec(self).map_err(ProtoError::Json)
    }

    /// Parses the JSON payload of a control frame.
    pub fn from_json(bytes: &[u8]) -> Result<Self, ProtoError> {
        serde_json::from_slice(bytes).map_err(ProtoError::Json)
    }

    /// The `"type"` tag of this message.
    pub fn type_name(&self) -> &'static str {
        match self {
            Self::Hello { .. } => "hello",
            Self::Ready { .. } => "ready",
            Self::Exec(_) => "exec",
            Self::StdinCredit { .. } => "stdin_credit",
            Self::StdinClose { .. } => "stdin_close",
            Self::Signal { .. } => "signal",
            Self::Exit(_) => "exit",
            Self::Error { .. } => "error",
            Self::Shutdown => "shutdown",
            Self::Ping => "ping",
            Self::Pong => "pong",
            Self::Setup { .. } => "setup",
            Self::SetupDone => "setup_done",
        }
    }

    /// An [`Control::Error`] with a message.
    pub fn error(id: Option<u32>, message: impl Into<String>) -> Self {
        Self::Error {
            id,
            message: message.into(),
        }
    }
}

/// Resource limits applied to an exec (soft and hard limit alike).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rlimits {
    /// Address space in bytes (`RLIMIT_AS`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub as_bytes: Option<u64>,
    /// Processes (the agent enforces it per exec; see the agent's docs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nproc: Option<u64>,
    /// Open files (`RLIMIT_NOFILE`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nofile: Option<u64>,
    /// Largest file the process may write, in bytes (`RLIMIT_FSIZE`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fsize: Option<u64>,
    /// CPU seconds (`RLIMIT_CPU`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_s: Option<u64>,
}

/// A request to run one process.
///
/// Unknown fields are refused: a limit or option the agent does not know about must
/// not be dropped silently.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Exec {
    /// Host-chosen id, unique among the running execs of a connection, never 0; it is
    /// the stream id of the exec's data frames.
    pub id: u32,
    /// Program and arguments; a program without `/` is looked up in `PATH` from `env`
    /// (or the default path when `env` has none).
    pub argv: Vec<String>,
    /// The complete environment: nothing is inherited from the agent.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Absolute working directory (default `/`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cwd: Option<String>,
    /// Whether the host will send stdin; otherwise the process reads end-of-file.
    #[serde(default)]
    pub stdin: bool,
    /// Kill the process group with SIGKILL after this many milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    /// Resource limits.
    #[serde(default)]
    pub rlimits: Rlimits,
    /// A pseudo-terminal; not supported yet, must be false.
    #[serde(default)]
    pub pty: bool,
    /// Run as root. Otherwise an agent running as root runs the command as the
    /// unprivileged user `nobody` (65534:65534), which cannot signal, trace or replace the
    /// agent.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub root: bool,
    /// Host randomness (at most [`MAX_EXEC_ENTROPY`] bytes) that the agent mixes into
    /// the guest kernel's pool, reseeding its generator, before the command starts:
    /// VMs restored from one snapshot must not share a random state. An agent that
    /// cannot reseed refuses the exec.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub entropy: Vec<u8>,
    /// The host's wall-clock time, nanoseconds since the epoch: the agent sets the
    /// guest's clock to it first (a restored VM's clock stood still while it was saved).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wall_clock_ns: Option<u64>,
}

/// The most host randomness one exec carries.
pub const MAX_EXEC_ENTROPY: usize = 64;

impl Exec {
    /// Checks what serde cannot: the agent refuses an exec that fails this.
    pub fn validate(&self) -> Result<(), ProtoError> {
        let invalid = |m: String| Err(ProtoError::Invalid(m));
        if self.id == 0 {
            return invalid("exec.id must not be 0".into());
        }
        if self.argv.is_empty() || self.argv[0].is_empty() {
            return invalid("exec.argv must name a program".into());
        }
        if let Some(i) = self.argv.iter().position(|a| a.contains('\0')) {
            return invalid(format!("exec.argv[{i}] contains a NUL byte"));
        }
        for (key, value) in &self.env {
            if key.is_empty() || key.contains(['=', '\0']) {
                return invalid(format!("exec.env key {key:?} is empty or has '=' or NUL"));
            }
            if value.contains('\0') {
                return invalid(format!("exec.env.{key} contains a NUL byte"));
            }
        }
        if let Some(cwd) = &self.cwd {
            if !cwd.starts_with('/') || cwd.contains('\0') {
                return invalid(format!("exec.cwd {cwd:?} is not an absolute path"));
            }
        }
        if self.timeout_ms == Some(0) {
            return invalid("exec.timeout_ms must be at least 1".into());
        }
        if self.pty {
            return invalid("exec.pty is not supported".into());
        }
        if self.entropy.len() > MAX_EXEC_ENTROPY {
            return invalid(format!(
                "exec.entropy has {} bytes, more than {MAX_EXEC_ENTROPY}",
                self.entropy.len()
            ));
        }
        Ok(())
    }
}

/// How an exec ended, from [`Exit::status`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitStatus {
    /// It exited with this code.
    Code(i32),
    /// A signal killed it.
    Signal(i32),
}

/// The end of an exec.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Exit {
    /// The exec.
    pub id: u32,
    /// Exit code, when it exited (exactly one of `code` and `signal` is set).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<i32>,
    /// Signal number, when a signal killed it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<i32>,
    /// Whether the agent killed it because `timeout_ms` passed.
    #[serde(default)]
    pub timed_out: bool,
    /// Milliseconds from start to end.
    pub duration_ms: u64,
}

impl Exit {
    /// The exit code or signal; an error when the message has both or neither.
    pub fn status(&self) -> Result<ExitStatus, ProtoError> {
        match (self.code, self.signal) {
            (Some(code), None) => Ok(ExitStatus::Code(code)),
            (None, Some(signal)) => Ok(ExitStatus::Signal(signal)),
            _ => Err(ProtoError::Invalid(
                "exit must carry exactly one of code and signal".into(),
            )),
        }
    }

    /// The shell convention: the code, or 128 + the signal.
    pub fn shell_code(&self) -> Result<i32, ProtoError> {
        Ok(match self.status()? {
            ExitStatus::Code(code) => code,
            ExitStatus::Signal(signal) => 128 + signal,
        })
    }
}

/// The maximum frame both sides use after the handshake: the smaller of ours and the
/// peer's, after checking the peer's version and that its maximum is usable.
pub fn negotiate_max_frame(ours: u32, peer_version: u32, peer_max: u32) -> Result<u32, ProtoError> {
    if peer_version != PROTOCOL_VERSION {
        return Err(ProtoError::VersionMismatch {
            ours: PROTOCOL_VERSION,
            theirs: peer_version,
        });
    }
    if peer_max < MIN_MAX_FRAME {
        return Err(ProtoError::Invalid(format!(
            "max_frame {peer_max} is below the minimum of {MIN_MAX_FRAME}"
        )));
    }
    Ok(ours.min(peer_max).clamp(MIN_MAX_FRAME, DEFAULT_MAX_FRAME))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exec() -> Exec {
        Exec {
            id: 1,
            argv: vec!["/bin/echo".into(), "hi".into()],
            ..Exec::default()
        }
    }

    #[test]
    fn messages_use_snake_case_type_tags() {
        let msg = Control::StdinClose { id: 4 };

        let json = String::from_utf8(msg.to_json().unwrap()).unwrap();

        assert_eq!(json, r#"{"type":"stdin_close","id":4}"#);
    }

    #[test]
    fn exec_entropy_is_bounded_and_left_out_when_empty() {
        let mut req = exec();
        let json = String::from_utf8(Control::Exec(req.clone()).to_json().unwrap()).unwrap();
        assert!(
            !json.contains("entropy") && !json.contains("wall_clock"),
            "{json}"
        );

        req.entropy = vec![1; MAX_EXEC_ENTROPY];
        req.wall_clock_ns = Some(1);
        assert!(req.validate().is_ok());
        req.entropy.push(1);
        let err = req.validate().unwrap_err().to_string();
        assert!(err.contains("exec.entropy has 65 bytes"), "{err}");
    }

    #[test]
    fn exec_round_trips_through_json() {
        let mut req = exec();
        req.env.insert("PATH".into(), "/bin".into());
        req.rlimits.nofile = Some(64);
        req.timeout_ms = Some(1000);
        let msg = Control::Exec(req);

        let back = Control::from_json(&msg.to_json().unwrap()).unwrap();

        assert_eq!(back, msg);
    }

    #[test]
    fn minimal_exec_json_fills_defaults() {
        let json = br#"{"type":"exec","id":2,"argv":["true"]}"#;

        let msg = Control::from_json(json).unwrap();

        assert_eq!(
            msg,
            Control::Exec(Exec {
                id: 2,
                argv: vec!["true".into()],
                ..Exec::default()
            })
        );
    }

    #[test]
    fn unknown_message_type_is_an_error() {
        let err = Control::from_json(br#"{"type":"format_disk"}"#).unwrap_err();

        assert!(matches!(err, ProtoError::Json(_)));
    }

    #[test]
    fn unknown_rlimit_is_refused() {
        let json = br#"{"type":"exec","id":2,"argv":["true"],"rlimits":{"stack":1}}"#;

        let err = Control::from_json(json).unwrap_err();

        assert!(matches!(err, ProtoError::Json(_)));
    }

    #[test]
    fn valid_exec_passes() {
        assert!(exec().validate().is_ok());
    }

    #[test]
    fn exec_with_id_zero_is_invalid() {
        let req = Exec { id: 0, ..exec() };

        assert!(matches!(req.validate(), Err(ProtoError::Invalid(_))));
    }

    #[test]
    fn exec_with_empty_argv_is_invalid() {
        let req = Exec {
            argv: vec![],
            ..exec()
        };

        assert!(matches!(req.validate(), Err(ProtoError::Invalid(_))));
    }

    #[test]
    fn exec_with_nul_in_argument_is_invalid() {
        let req = Exec {
            argv: vec!["/bin/echo".into(), "a\0b".into()],
            ..exec()
        };

        let err = req.validate().unwrap_err().to_string();

        assert_eq!(err, "invalid message: exec.argv[1] contains a NUL byte");
    }

    #[test]
    fn exec_with_equals_in_env_key_is_invalid() {
        let mut req = exec();
        req.env.insert("A=B".into(), "c".into());

        assert!(matches!(req.validate(), Err(ProtoError::Invalid(_))));
    }

    #[test]
    fn exec_with_relative_cwd_is_invalid() {
        let req = Exec {
            cwd: Some("tmp".into()),
            ..exec()
        };

        assert!(matches!(req.validate(), Err(ProtoError::Invalid(_))));
    }

    #[test]
    fn exec_with_pty_is_refused() {
        let req = Exec {
            pty: true,
            ..exec()
        };

        assert!(matches!(req.validate(), Err(ProtoError::Invalid(_))));
    }

    #[test]
    fn exit_with_code_has_code_status() {
        let exit = Exit {
            id: 1,
            code: Some(3),
            signal: None,
            timed_out: false,
            duration_ms: 5,
        };

        assert_eq!(exit.status().unwrap(), ExitStatus::Code(3));
    }

    #[test]
    fn exit_with_signal_maps_to_shell_code() {
        let exit = Exit {
            id: 1,
            code: None,
            signal: Some(9),
            timed_out: true,
            duration_ms: 5,
        };

        assert_eq!(exit.shell_code().unwrap(), 137);
    }

    #[test]
    fn exit_with_both_code_and_signal_is_invalid() {
        let exit = Exit {
            id: 1,
            code: Some(0),
            signal: Some(9),
            timed_out: false,
            duration_ms: 0,
        };

        assert!(exit.status().is_err());
    }

    #[test]
    fn negotiation_takes_the_smaller_maximum() {
        let max = negotiate_max_frame(DEFAULT_MAX_FRAME, PROTOCOL_VERSION, 64 << 10).unwrap();

        assert_eq!(max, 64 << 10);
    }

    #[test]
    fn negotiation_refuses_other_version() {
        let err = negotiate_max_frame(DEFAULT_MAX_FRAME, 99, DEFAULT_MAX_FRAME).unwrap_err();

        assert!(matches!(
            err,
            ProtoError::VersionMismatch {
                ours: 1,
                theirs: 99
            }
        ));
    }

    #[test]
    fn negotiation_refuses_tiny_maximum() {
        let err = negotiate_max_frame(DEFAULT_MAX_FRAME, PROTOCOL_VERSION, 10).unwrap_err();

        assert!(matches!(err, ProtoError::Invalid(_)));
    }
}
