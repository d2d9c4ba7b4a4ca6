//! Policy errors: one line naming the file, line:column, the JSON path of the field,
//! what was expected, and (when we can guess) a hint.

use std::fmt;

/// Where a problem is and what it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    /// The policy file as the user named it; empty for CLI flags and library calls.
    pub file: String,
    /// 1-based line of the offending field, when it came from a file.
    pub line: Option<usize>,
    /// 1-based column of the offending field, when it came from a file.
    pub column: Option<usize>,
    /// JSON path of the field (`filesystem.readonly[2]`), a flag (`--rw`), or empty for
    /// the whole document.
    pub path: String,
    /// What was wrong and what was expected.
    pub message: String,
    /// A suggestion (`did you mean "readonly"?`).
    pub hint: Option<String>,
    /// Further problems of the same policy, after this one (the most fundamental).
    pub also: Vec<Diagnostic>,
}

/// `scheme://user:password@host` becomes `scheme://user:***@host` (and `scheme://token@`
/// becomes `scheme://***@`) wherever it appears in `text`: nothing that reports on a
/// policy -- errors, `explain`, logs -- may echo a secret the user put in a URL.
pub fn redact_credentials(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find("://") {
        let (head, tail) = rest.split_at(at + 3);
        out.push_str(head);
        let end = tail
            .find(|c: char| {
                c == '/' || c == '"' || c == '\'' || c == '?' || c == '#' || c.is_whitespace()
            })
            .unwrap_or(tail.len());
        let authority = &tail[..end];
        match authority.rfind('@') {
            Some(userinfo_end) => {
                let userinfo = &authority[..userinfo_end];
                match userinfo.split_once(':') {
                    Some((user, _)) => {
                        out.push_str(user);
                        out.push_str(":***");
                    }
                    None => out.push_str("***"),
                }
                out.push_str(&authority[userinfo_end..]);
            }
            None => out.push_str(authority),
        }
        rest = &tail[end..];
    }
    out.push_str(rest);
    out
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if !self.file.is_empty() {
            write!(f, "{}:", self.file)?;
            if let (Some(l), Some(c)) = (self.line, self.column) {
                write!(f, "{l}:{c}:")?;
            }
            write!(f, " ")?;
        }
        if !self.path.is_empty() {
            write!(f, "{}: ", self.path)?;
        }
        write!(f, "{}", redact_credentials(&self.message))?;
        if let Some(h) = &self.hint {
            write!(f, " (hint: {})", redact_credentials(h))?;
        }
        for more in &self.also {
            write!(f, "\n{more}")?;
        }
        Ok(())
    }
}

/// Everything that can go wrong while loading, composing or resolving a policy.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("{file}: cannot read the policy file: {source}")]
    Read {
        file: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Invalid(Box<Diagnostic>),
}

impl PolicyError {
    /// An error about the field (or flag) `path`, not yet located in a file.
    pub fn invalid(path: impl Into<String>, message: impl Into<String>) -> Self {
        Self::Invalid(Box::new(Diagnostic {
            file: String::new(),
            line: None,
            column: None,
            path: path.into(),
            message: message.into(),
            hint: None,
            also: Vec::new(),
        }))
    }

    /// Adds (or replaces) the hint.
    pub fn with_hint(mut self, hint: impl Into<String>) -> Self {
        if let Self::Invalid(d) = &mut self {
            d.hint = Some(hint.into());
        }
        self
    }

    pub(crate) fn with_file(mut self, file: &str) -> Self {
        if let Self::Invalid(d) = &mut self {
            d.file = file.to_string();
        }
        self
    }

    pub(crate) fn at(mut self, line: usize, column: usize) -> Self {
        if let Self::Invalid(d) = &mut self {
            d.line = Some(line);
            d.column = Some(column);
        }
        self
    }

    /// The diagnostic, for every error except an unreadable file.
    pub fn diagnostic(&self) -> Option<&Diagnostic> {
        match self {
            Self::Invalid(d) => Some(d),
            Self::Read { .. } => None,
        }
    }

    pub fn file(&self) -> &str {
        match self {
            Self::Invalid(d) => &d.file,
            Self::Read { file, .. } => file,
        }
    }

    pub fn line(&self) -> Option<usize> {
        self.diagnostic().and_then(|d| d.line)
    }

    pub fn column(&self) -> Option<usize> {
        self.diagnostic().and_then(|d| d.column)
    }

    /// JSON path of the field at fault (empty for the whole document or a read error).
    pub fn path(&self) -> &str {
        self.diagnostic().map_or("", |d| d.path.as_str())
    }

    pub fn message(&self) -> String {
        match self {
            Self::Invalid(d) => redact_credentials(&d.message),
            Self::Read { source, .. } => format!("cannot read the policy file: {source}"),
        }
    }

    pub fn hint(&self) -> Option<&str> {
        self.diagnostic().and_then(|d| d.hint.as_deref())
    }

    /// The error as a JSON object for `--json` output:
    /// `{file, line, column, path, message, hint}` (absent values are `null`).
    pub fn to_json(&self) -> serde_json::Value {
        let mut v = serde_json::json!({
            "file": self.file(),
            "line": self.line(),
            "column": self.column(),
            "path": self.path(),
            "message": self.message(),
            "hint": self.hint().map(redact_credentials),
        });
        if let Some(d) = self.diagnostic().filter(|d| !d.also.is_empty()) {
            v["also"] = d
                .also
                .iter()
                .map(|m| {
                    serde_json::json!({
                        "file": m.file,
                        "line": m.line,
                        "column": m.column,
                        "path": m.path,
                        "message": redact_credentials(&m.message),
                        "hint": m.hint.as_deref().map(redact_credentials),
                    })
                })
                .collect();
        }
        v
    }
}

/// Separator a validation message may use to carry a hint through serde's
/// string-only custom errors: `"message\nhint: the hint"`.
pub(crate) const HINT_SEP: &str = "\nhint: ";

/// Splits `message\nhint: hint` into its parts.
pub(crate) fn split_hint(msg: &str) -> (String, Option<String>) {
    match msg.split_once(HINT_SEP) {
        Some((m, h)) => (m.to_string(), Some(h.to_string())),
        None => (msg.to_string(), None),
    }
}

/// Levenshtein distance over chars (both strings are short field names).
pub fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    let mut cur = vec![0; b.len() + 1];
    for (i, ca) in a.chars().enumerate() {
        cur[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != *cb);
            cur[j + 1] = sub.min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        std::mem::swap(&mut prev, &mut cur);
    }
    prev[b.len()]
}

/// The candidate closest to `word`, if it is close enough to be a plausible typo
/// (case-insensitive; also a candidate that `word` extends or shortens, as in
/// `readonlyPaths` for `readonly`).
pub fn suggest<'a>(word: &str, candidates: &[&'a str]) -> Option<&'a str> {
    let w = word.to_ascii_lowercase();
    let mut best: Option<(usize, &'a str)> = None;
    for &c in candidates {
        let cl = c.to_ascii_lowercase();
        let d = edit_distance(&w, &cl);
        let limit = (w.chars().count().max(cl.chars().count()) / 3).max(1);
        let prefix = w.len() >= 4 && cl.len() >= 4 && (cl.starts_with(&w) || w.starts_with(&cl));
        if (d <= limit || prefix) && best.is_none_or(|(bd, _)| d < bd) {
            best = Some((d, c));
        }
    }
    best.map(|(_, c)| c)
}

/// The backquoted tokens of a serde message (serde writes
/// ``unknown field `x`, expected one of `a`, `b` ``).
fn backquoted(msg: &str) -> Vec<&str> {
    msg.split('`').skip(1).step_by(2).collect()
}

/// Rewrites a serde/serde_json message (position suffix already removed) into our
/// wording, with a did-you-mean hint for unknown fields and values.
pub(crate) fn rewrite_serde_message(msg: &str) -> (String, Option<String>) {
    let quoted = backquoted(msg);
    if let Some(rest) = msg.strip_prefix("unknown field ") {
        return unknown_name("field", rest, &quoted);
    }
    if let Some(rest) = msg.strip_prefix("unknown variant ") {
        return unknown_name("value", rest, &quoted);
    }
    if msg.starts_with("missing field ") {
        let name = quoted.first().copied().unwrap_or("?");
        return (format!("missing required field \"{name}\""), None);
    }
    if msg.starts_with("duplicate field ") {
        let name = quoted.first().copied().unwrap_or("?");
        return (format!("field \"{name}\" is given twice"), None);
    }
    for prefix in ["invalid type: ", "invalid value: "] {
        if let Some(rest) = msg.strip_prefix(prefix) {
            if let Some((found, expected)) = rest.split_once(", expected ") {
                let (expected, hint) = split_hint(expected);
                return (
                    format!(
                        "expected {}, found {}",
                        describe_expected(&expected),
                        describe_unexpected(found)
                    ),
                    hint,
                );
            }
        }
    }
    if let Some(rest) = msg.strip_prefix("invalid length ") {
        return (format!("invalid length: {rest}"), None);
    }
    split_hint(msg)
}

fn unknown_name(kind: &str, rest: &str, quoted: &[&str]) -> (String, Option<String>) {
    let Some((&name, known)) = quoted.split_first() else {
        return (format!("unknown {kind} {rest}"), None);
    };
    let message = format!("unknown {kind} \"{name}\"");
    if known.is_empty() {
        return (message, Some(format!("this object takes no {kind}s")));
    }
    let hint = match suggest(name, known) {
        Some(s) => format!("did you mean \"{s}\"?"),
        None => format!("expected one of {}", quote_list(known)),
    };
    (message, Some(hint))
}

/// `"a", "b", "c"`.
pub(crate) fn quote_list(items: &[&str]) -> String {
    items
        .iter()
        .map(|s| format!("\"{s}\""))
        .collect::<Vec<_>>()
        .join(", ")
}

/// A JSON value's kind in plain words (`a number (5)`, `an object`).
pub(crate) fn describe_value(v: &serde_json::Value) -> String {
    use serde_json::Value;
    match v {
        Value::Null => "null".into(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => format!("a number ({n})"),
        Value::String(s) => format!("the string {s:?}"),
        Value::Array(_) => "an array".into(),
        Value::Object(_) => "an object".into(),
    }
}

/// serde's names for what it wanted (`struct NativeProcess`, `u64`) in plain words.
fn describe_expected(expected: &str) -> String {
    if expected.starts_with("struct ") || expected == "a map" {
        return "an object".into();
    }
    if expected.starts_with("enum ") {
        return "one of the documented names (a string)".into();
    }
    match expected {
        "a sequence" => "an array".into(),
        "u8" => "a whole number from 0 to 255".into(),
        "u16" => "a whole number from 0 to 65535".into(),
        "u32" => "a whole number from 0 to 4294967295".into(),
        "u64" | "usize" => "a whole number, 0 or more".into(),
        "i32" | "i64" => "a whole number".into(),
        other => other.to_string(),
    }
}

/// serde's `Unexpected` display (`integer `5``, `string "x"`, `map`) in plain words.
fn describe_unexpected(found: &str) -> String {
    let inner = backquoted(found).first().map(|s| s.to_string());
    if found.starts_with("integer") || found.starts_with("floating point") {
        return match inner {
            Some(v) => format!("a number ({v})"),
            None => "a number".into(),
        };
    }
    if found.starts_with("boolean") {
        return match inner {
            Some(v) => v,
            None => "a boolean".into(),
        };
    }
    if let Some(s) = found.strip_prefix("string ") {
        return format!("the string {s}");
    }
    match found {
        "map" => "an object".into(),
        "sequence" => "an array".into(),
        "unit value" | "null" => "null".into(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_in_urls_are_never_echoed() {
        assert_eq!(
            redact_credentials("\"http://alice:s3cret@proxy:8080/x\" and ftp://tok@h"),
            "\"http://alice:***@proxy:8080/x\" and ftp://***@h"
        );
        assert_eq!(redact_credentials("http://host:1/a@b"), "http://host:1/a@b");
        let e = PolicyError::invalid("network.proxy.url", "\"http://alice:s3cret@p:1\": bad")
            .with_file("p.json");
        assert!(!e.to_string().contains("s3cret"), "{e}");
        assert!(!e.message().contains("s3cret"));
        assert!(!e.to_json().to_string().contains("s3cret"));
    }

    #[test]
    fn display_is_one_line_with_position_path_and_hint() {
        let e = PolicyError::invalid("filesystem.readonly[2]", "expected a path string")
            .with_file("policy.json")
            .at(12, 5)
            .with_hint("quote it");

        let s = e.to_string();

        assert_eq!(
            s,
            "policy.json:12:5: filesystem.readonly[2]: expected a path string (hint: quote it)"
        );
    }

    #[test]
    fn display_without_file_starts_with_path() {
        let e = PolicyError::invalid("--rw", "bad");

        assert_eq!(e.to_string(), "--rw: bad");
    }

    #[test]
    fn to_json_has_all_keys() {
        let e = PolicyError::invalid("process.env[0]", "bad")
            .with_file("p.json")
            .at(3, 7);

        let j = e.to_json();

        assert_eq!(
            j,
            serde_json::json!({"file":"p.json","line":3,"column":7,
                "path":"process.env[0]","message":"bad","hint":null})
        );
    }

    #[test]
    fn edit_distance_counts_edits() {
        assert_eq!(edit_distance("readonly", "readonly"), 0);
        assert_eq!(edit_distance("readonyl", "readonly"), 2);
        assert_eq!(edit_distance("", "abc"), 3);
        assert_eq!(edit_distance("kitten", "sitting"), 3);
    }

    #[test]
    fn suggest_finds_typos_case_and_suffix_variants() {
        let known = ["readwrite", "readonly", "denied"];

        assert_eq!(suggest("readonyl", &known), Some("readonly"));
        assert_eq!(suggest("ReadOnly", &known), Some("readonly"));
        assert_eq!(suggest("readonlyPaths", &known), Some("readonly"));
        assert_eq!(suggest("network", &known), None);
    }

    #[test]
    fn rewrites_unknown_field_with_hint() {
        let (m, h) = rewrite_serde_message(
            "unknown field `readonlyPath`, expected one of `readwritePaths`, `readonlyPaths`",
        );

        assert_eq!(m, "unknown field \"readonlyPath\"");
        assert_eq!(h.as_deref(), Some("did you mean \"readonlyPaths\"?"));
    }

    #[test]
    fn rewrites_invalid_type_as_expected_found() {
        let (m, h) = rewrite_serde_message("invalid type: integer `5`, expected a path string");

        assert_eq!(m, "expected a path string, found a number (5)");
        assert_eq!(h, None);
    }

    #[test]
    fn unknown_field_without_close_match_lists_fields() {
        let (m, h) = rewrite_serde_message("unknown field `zzz`, expected `a` or `b`");

        assert_eq!(m, "unknown field \"zzz\"");
        assert_eq!(h.as_deref(), Some("expected one of \"a\", \"b\""));
    }
}
