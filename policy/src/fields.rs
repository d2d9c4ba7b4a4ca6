//! Validated string fields shared by both formats. Each is checked while serde reads
//! it, so a bad value is reported at its own line and column with its JSON path.

use std::borrow::Cow;
use std::fmt;
use std::marker::PhantomData;
use std::path::PathBuf;
use std::time::Duration;

use schemars::{JsonSchema, Schema, SchemaGenerator};
use serde::de::{self, Deserialize, Deserializer, Visitor};

use crate::duration::parse_duration;
use crate::error::HINT_SEP;
use crate::net_rules::{parse_rule, RuleSpec};

/// How one kind of string field is read, checked and described in the schema.
pub(crate) trait StrKind {
    type Out;
    /// Name of the definition in the JSON Schema.
    const NAME: &'static str;
    /// What the field holds, for "expected ..., found ..." messages.
    const EXPECTING: &'static str;
    fn parse(s: &str) -> Result<Self::Out, String>;
    /// The JSON Schema of the field (a string schema with a description).
    fn schema() -> serde_json::Value;
    /// A hint for a number written where the string belongs.
    fn number_hint(_n: &str) -> Option<String> {
        None
    }
}

/// A string field of kind `K`, holding the parsed value.
pub(crate) struct Str<K: StrKind>(pub K::Out);

impl<K: StrKind> fmt::Debug for Str<K>
where
    K::Out: fmt::Debug,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl<'de, K: StrKind> Deserialize<'de> for Str<K> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<K>(PhantomData<K>);
        impl<K: StrKind> V<K> {
            fn number<E: de::Error>(n: String) -> E {
                let base = format!("expected {}, found a number ({n})", K::EXPECTING);
                match K::number_hint(&n) {
                    Some(h) => E::custom(format!("{base}{HINT_SEP}{h}")),
                    None => E::custom(base),
                }
            }
        }
        impl<K: StrKind> Visitor<'_> for V<K> {
            type Value = Str<K>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(K::EXPECTING)
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Str<K>, E> {
                K::parse(s).map(Str).map_err(E::custom)
            }
            fn visit_u64<E: de::Error>(self, n: u64) -> Result<Str<K>, E> {
                Err(Self::number(n.to_string()))
            }
            fn visit_i64<E: de::Error>(self, n: i64) -> Result<Str<K>, E> {
                Err(Self::number(n.to_string()))
            }
            fn visit_f64<E: de::Error>(self, n: f64) -> Result<Str<K>, E> {
                Err(Self::number(n.to_string()))
            }
        }
        d.deserialize_any(V::<K>(PhantomData))
    }
}

impl<K: StrKind> JsonSchema for Str<K> {
    fn inline_schema() -> bool {
        true
    }
    fn schema_name() -> Cow<'static, str> {
        Cow::Borrowed(K::NAME)
    }
    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        match K::schema() {
            serde_json::Value::Object(map) => Schema::from(map),
            _ => Schema::default(),
        }
    }
}

fn no_nul(s: &str, what: &str) -> Result<(), String> {
    if s.contains('\0') {
        return Err(format!("{what} contains a NUL byte"));
    }
    Ok(())
}

/// A filesystem path, absolute or relative to the policy file.
#[derive(Debug)]
pub(crate) enum PathKind {}
impl StrKind for PathKind {
    type Out = PathBuf;
    const NAME: &'static str = "Path";
    const EXPECTING: &'static str = "an absolute or relative path string";
    fn parse(s: &str) -> Result<PathBuf, String> {
        check_path(s)?;
        Ok(PathBuf::from(s))
    }
    fn schema() -> serde_json::Value {
        serde_json::json!({
            "type": "string",
            "minLength": 1,
            "description": "A path; relative paths are relative to the policy file's directory."
        })
    }
}

/// Rejects empty paths, paths containing NUL, and Windows paths (`C:\…`, `\\server\…`),
/// which would otherwise become relative paths that name nothing.
pub(crate) fn check_path(s: &str) -> Result<(), String> {
    if s.is_empty() {
        return Err(format!(
            "empty path{HINT_SEP}write \".\" for the policy file's directory"
        ));
    }
    no_nul(s, "path")?;
    let b = s.as_bytes();
    let drive =
        b.len() >= 3 && b[0].is_ascii_alphabetic() && b[1] == b':' && matches!(b[2], b'\\' | b'/');
    if drive || s.starts_with("\\\\") {
        return Err(format!(
            "\"{s}\" is a Windows path{HINT_SEP}mxc-vm runs on Linux: give the Linux path"
        ));
    }
    Ok(())
}

/// One program argument.
#[derive(Debug)]
pub(crate) enum ArgKind {}
impl StrKind for ArgKind {
    type Out = String;
    const NAME: &'static str = "Argument";
    const EXPECTING: &'static str = "a program argument string";
    fn parse(s: &str) -> Result<String, String> {
        no_nul(s, "argument")?;
        Ok(s.to_string())
    }
    fn schema() -> serde_json::Value {
        serde_json::json!({"type": "string"})
    }
}

/// A shell command line, run as `/bin/sh -c LINE`.
#[derive(Debug)]
pub(crate) enum ShellKind {}
impl StrKind for ShellKind {
    type Out = String;
    const NAME: &'static str = "ShellLine";
    const EXPECTING: &'static str = "a shell command line string";
    fn parse(s: &str) -> Result<String, String> {
        if s.trim().is_empty() {
            return Err("empty command line".into());
        }
        no_nul(s, "command line")?;
        Ok(s.to_string())
    }
    fn schema() -> serde_json::Value {
        serde_json::json!({
            "type": "string",
            "minLength": 1,
            "description": "A shell command line, run as /bin/sh -c LINE."
        })
    }
}

/// A `KEY=VALUE` environment entry.
#[derive(Debug)]
pub(crate) enum EnvKind {}
impl StrKind for EnvKind {
    type Out = (String, String);
    const NAME: &'static str = "EnvEntry";
    const EXPECTING: &'static str = "a \"KEY=VALUE\" string";
    fn parse(s: &str) -> Result<(String, String), String> {
        parse_env_entry(s)
    }
    fn schema() -> serde_json::Value {
        serde_json::json!({
            "type": "string",
            "pattern": "^[A-Za-z_][A-Za-z0-9_]*=",
            "description": "KEY=VALUE; KEY is a letter or '_' followed by letters, digits or '_'."
        })
    }
}

/// Splits and checks `KEY=VALUE`.
pub(crate) fn parse_env_entry(s: &str) -> Result<(String, String), String> {
    let Some((k, v)) = s.split_once('=') else {
        return Err(format!(
            "\"{s}\" is not KEY=VALUE (no '='){HINT_SEP}write \"{s}=value\""
        ));
    };
    check_env_name(k)?;
    no_nul(v, "value")?;
    Ok((k.to_string(), v.to_string()))
}

/// A variable name: a letter or `_`, then letters, digits or `_`.
pub(crate) fn check_env_name(k: &str) -> Result<(), String> {
    let mut chars = k.chars();
    let ok = chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_');
    if !ok {
        return Err(format!(
            "\"{k}\" is not a valid variable name{HINT_SEP}names start with a letter or '_' \
             and hold only letters, digits and '_'"
        ));
    }
    Ok(())
}

/// A duration string (`500ms`, `2s`, `1m30s`).
#[derive(Debug)]
pub(crate) enum DurationKind {}
impl StrKind for DurationKind {
    type Out = Duration;
    const NAME: &'static str = "Duration";
    const EXPECTING: &'static str = "a duration string such as \"30s\", \"500ms\" or \"1m30s\"";
    fn parse(s: &str) -> Result<Duration, String> {
        parse_duration(s).map_err(|e| match e.hint() {
            Some(h) => format!("{e}{HINT_SEP}{h}"),
            None => e.to_string(),
        })
    }
    fn schema() -> serde_json::Value {
        serde_json::json!({
            "type": "string",
            "pattern": "^([0-9]+h)?([0-9]+m)?([0-9]+s)?([0-9]+ms)?$",
            "minLength": 2,
            "description": "A duration such as \"500ms\", \"2s\", \"1m\", \"1h\" or \"1m30s\"."
        })
    }
    fn number_hint(n: &str) -> Option<String> {
        Some(format!("write \"{n}s\" (or \"{n}ms\")"))
    }
}

/// A network rule string.
#[derive(Debug)]
pub(crate) enum RuleKind {}
impl StrKind for RuleKind {
    type Out = RuleSpec;
    const NAME: &'static str = "NetRule";
    const EXPECTING: &'static str =
        "a rule string such as \"example.com\", \"*.example.com:443\" or \"10.0.0.0/8:80-90\"";
    fn parse(s: &str) -> Result<RuleSpec, String> {
        parse_rule(s).map_err(|e| e.serde_message())
    }
    fn schema() -> serde_json::Value {
        serde_json::json!({
            "type": "string",
            "minLength": 1,
            "description": "A domain (example.com), a wildcard domain (*.example.com: any depth \
                below, not the apex), or an IPv4/IPv6 address or CIDR; each with an optional \
                :port or :first-last (IPv6 with a port in brackets: [2001:db8::1]:443)."
        })
    }
}

/// An upstream proxy URL (`http://host:port`).
#[derive(Debug)]
pub(crate) enum ProxyUrlKind {}
impl StrKind for ProxyUrlKind {
    type Out = String;
    const NAME: &'static str = "ProxyUrl";
    const EXPECTING: &'static str = "a proxy URL such as \"http://proxy.example.com:3128\"";
    fn parse(s: &str) -> Result<String, String> {
        parse_proxy_url(s)
    }
    fn schema() -> serde_json::Value {
        serde_json::json!({
            "type": "string",
            "pattern": "^http://",
            "description": "An HTTP proxy to chain egress through: http://host[:port]."
        })
    }
}

/// Checks and normalises `http://host[:port][/]` to `http://host:port`.
pub(crate) fn parse_proxy_url(s: &str) -> Result<String, String> {
    let Some(rest) = s.strip_prefix("http://") else {
        return Err(format!(
            "\"{s}\" is not an http:// proxy URL{HINT_SEP}only plain HTTP proxies \
             (http://host:port) can be chained"
        ));
    };
    let authority = rest.strip_suffix('/').unwrap_or(rest);
    if authority.contains('@') {
        return Err(format!(
            "\"{s}\": credentials in the proxy URL are not supported"
        ));
    }
    if authority.contains(['/', '?', '#']) {
        return Err(format!("\"{s}\": a proxy URL has no path"));
    }
    let bad = || format!("\"{s}\" does not name a valid host and port");
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (h, after) = v6.split_once(']').ok_or_else(bad)?;
        h.parse::<std::net::Ipv6Addr>().map_err(|_| bad())?;
        (format!("[{h}]"), after.strip_prefix(':'))
    } else {
        let (h, p) = match authority.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        };
        let h = if h.parse::<std::net::Ipv4Addr>().is_ok() {
            h.to_string()
        } else {
            crate::net_rules::parse_domain(h).map_err(|e| e.to_string())?
        };
        (h, p)
    };
    let port = match port {
        None => {
            return Err(format!(
                "\"{s}\" has no port{HINT_SEP}give the proxy's port, e.g. \
                 http://proxy.example.com:3128 (MXC refuses it too)"
            ))
        }
        Some(p) => crate::net_rules::parse_ports(p)
            .ok()
            .filter(|r| r.first == r.last)
            .map(|r| r.first)
            .ok_or_else(bad)?,
    };
    Ok(format!("http://{host}:{port}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_entries_split_at_the_first_equals() {
        assert_eq!(
            parse_env_entry("A=b=c"),
            Ok(("A".to_string(), "b=c".to_string()))
        );
        assert_eq!(parse_env_entry("_X1="), Ok(("_X1".into(), String::new())));
    }

    #[test]
    fn env_entries_refuse_bad_names_and_missing_equals() {
        for s in ["NOEQ", "1A=x", "A-B=x", "=x", "A B=x", "A=\0"] {
            assert!(parse_env_entry(s).is_err(), "{s:?}");
        }
    }

    #[test]
    fn proxy_urls_are_normalised() {
        assert_eq!(
            parse_proxy_url("http://Proxy.Corp:3128/"),
            Ok("http://proxy.corp:3128".into())
        );
        assert_eq!(
            parse_proxy_url("http://127.0.0.1:80"),
            Ok("http://127.0.0.1:80".into())
        );
        assert_eq!(
            parse_proxy_url("http://[::1]:8080"),
            Ok("http://[::1]:8080".into())
        );
    }

    #[test]
    fn proxy_urls_refuse_other_schemes_credentials_and_paths() {
        for s in [
            "https://p:1",
            "socks5://p:1",
            "http://u:pw@p:1",
            "http://p:1/x",
            "http://p:0",
            "http://p:1-2",
            "http://",
            "http://[zz]:1",
            "http://proxy.example",
            "http://[::1]",
        ] {
            assert!(parse_proxy_url(s).is_err(), "{s}");
        }
    }

    #[test]
    fn paths_must_be_non_empty_without_nul() {
        assert!(check_path("").is_err());
        assert!(check_path("a\0b").is_err());
        assert!(check_path("./x").is_ok());
        assert!(check_path("C:\\Users\\me").is_err());
        assert!(check_path("c:/x").is_err());
        assert!(check_path("\\\\server\\share").is_err());
        assert!(check_path("a:b").is_ok());
    }
}
