//! The policy text being parsed: builds located errors and runs the typed pass.

use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;

use crate::error::{describe_value, rewrite_serde_message, split_hint, PolicyError};
use crate::locate::{locate, parse_path, value_at};

/// A policy file's label, text and base directory.
pub(crate) struct Source<'a> {
    pub file: &'a str,
    pub text: &'a str,
    pub base_dir: PathBuf,
}

impl<'a> Source<'a> {
    pub fn new(file: &'a str, text: &'a str, base_dir: &Path) -> Self {
        let base_dir = if base_dir.is_absolute() {
            base_dir.to_path_buf()
        } else {
            std::env::current_dir()
                .map(|c| c.join(base_dir))
                .unwrap_or_else(|_| base_dir.to_path_buf())
        };
        Self {
            file,
            text,
            base_dir,
        }
    }

    /// An error about the value at `path`, located in the text. A `\nhint: ` part of
    /// the message becomes the hint.
    pub fn err(&self, path: &str, message: impl Into<String>) -> PolicyError {
        self.place(with_split_hint(path, &message.into()), path, false)
    }

    /// An error about the key at `path` (e.g. a field that must not be there).
    pub fn err_key(&self, path: &str, message: impl Into<String>) -> PolicyError {
        self.place(with_split_hint(path, &message.into()), path, true)
    }

    fn place(&self, e: PolicyError, path: &str, on_key: bool) -> PolicyError {
        let e = e.with_file(self.file);
        match locate(self.text, &parse_path(path)) {
            Some(l) => {
                let p = if on_key {
                    l.key.unwrap_or(l.value)
                } else {
                    l.value
                };
                e.at(p.line, p.column)
            }
            None => e,
        }
    }

    /// A JSON syntax error.
    pub fn syntax_error(&self, e: &serde_json::Error) -> PolicyError {
        let msg = strip_position(e);
        PolicyError::invalid("", format!("invalid JSON: {msg}"))
            .with_file(self.file)
            .at(e.line().max(1), e.column().max(1))
    }

    /// Deserializes the whole text into `T`, reporting the failing field's path,
    /// position and a did-you-mean hint for unknown names.
    pub fn deserialize<T: DeserializeOwned>(&self) -> Result<T, PolicyError> {
        let mut de = serde_json::Deserializer::from_str(self.text);
        let value: T = serde_path_to_error::deserialize(&mut de).map_err(|e| {
            let path = match e.path().to_string() {
                p if p == "." => String::new(),
                p => p,
            };
            let inner = e.into_inner();
            if inner.is_eof() || (inner.is_syntax() && path.is_empty()) {
                return self.syntax_error(&inner);
            }
            if inner.is_syntax() {
                // The text parsed as JSON before, so this is serde_json refusing a value
                // of the wrong type for a name field (an enum).
                let found = serde_json::from_str::<serde_json::Value>(self.text)
                    .ok()
                    .and_then(|v| value_at(&v, &parse_path(&path)).map(describe_value))
                    .unwrap_or_else(|| "something else".into());
                let err = PolicyError::invalid(
                    path.clone(),
                    format!("expected a name (a string), found {found}"),
                );
                return self.place(err, &path, false);
            }
            let raw = strip_position(&inner);
            let (message, hint) = rewrite_serde_message(&raw);
            let mut err = PolicyError::invalid(path.clone(), message);
            if let Some(h) = hint {
                err = err.with_hint(h);
            }
            if raw.starts_with("duplicate field") || path.is_empty() {
                err.with_file(self.file)
                    .at(inner.line().max(1), inner.column().max(1))
            } else {
                self.place(err, &path, raw.starts_with("unknown field"))
            }
        })?;
        de.end().map_err(|e| self.syntax_error(&e))?;
        Ok(value)
    }

    /// `p` made absolute against the policy's base directory.
    pub fn abs(&self, p: PathBuf) -> PathBuf {
        if p.is_absolute() {
            p
        } else {
            self.base_dir.join(p)
        }
    }
}

fn with_split_hint(path: &str, message: &str) -> PolicyError {
    let (m, h) = split_hint(message);
    let e = PolicyError::invalid(path, m);
    match h {
        Some(h) => e.with_hint(h),
        None => e,
    }
}

/// serde_json's message without its " at line L column C" suffix.
fn strip_position(e: &serde_json::Error) -> String {
    let s = e.to_string();
    let suffix = format!(" at line {} column {}", e.line(), e.column());
    s.strip_suffix(&suffix).map(str::to_string).unwrap_or(s)
}
