//! The JSON Schema of the native format, generated from the serde types that read it.
//! The committed copy lives at `policy/schema/mxc-vm-policy.v1.schema.json`; a test
//! fails when it drifts (`UPDATE_SCHEMA=1 cargo test -p policy` rewrites it).

use crate::native::NativePolicy;

/// Where the schema is published.
pub const SCHEMA_ID: &str =
    "https://github.com/mxc-vm/mxc-vm/blob/main/policy/schema/mxc-vm-policy.v1.schema.json";

/// JSON Schema (draft 2020-12) of the native policy format, version 1.
pub fn native_schema() -> serde_json::Value {
    let schema = schemars::schema_for!(NativePolicy);
    let mut value = schema.to_value();
    if let Some(obj) = value.as_object_mut() {
        obj.insert("$id".into(), serde_json::Value::String(SCHEMA_ID.into()));
    }
    value
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn committed_path() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("schema/mxc-vm-policy.v1.schema.json")
    }

    fn generated_text() -> String {
        let mut s = serde_json::to_string_pretty(&native_schema()).unwrap();
        s.push('\n');
        s
    }

    #[test]
    fn committed_schema_is_in_sync_with_the_types() {
        let path = committed_path();
        let generated = generated_text();
        if std::env::var_os("UPDATE_SCHEMA").is_some() {
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, &generated).unwrap();
        }

        let committed = std::fs::read_to_string(&path).unwrap_or_default();

        assert!(
            committed == generated,
            "{} is out of date with the native policy types; regenerate it with \
             `UPDATE_SCHEMA=1 cargo test -p policy committed_schema` and commit the result",
            path.display()
        );
    }

    #[test]
    fn schema_describes_the_top_level_fields() {
        let s = native_schema();

        let props = s["properties"].as_object().unwrap();

        let mut keys: Vec<&str> = props.keys().map(String::as_str).collect();
        keys.sort_unstable();
        assert_eq!(
            keys,
            [
                "containment",
                "filesystem",
                "limits",
                "name",
                "network",
                "process",
                "version"
            ]
        );
        assert_eq!(s["required"], serde_json::json!(["version"]));
        assert_eq!(s["additionalProperties"], serde_json::json!(false));
    }
}
