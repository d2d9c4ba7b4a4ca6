//! The environment a command runs with, on every tier: a small base below the
//! request's own variables, and the proxy variables on top where the policy proxy
//! carries the sandbox's egress.

use crate::proxy;
use crate::view::NetMode;

/// The default environment below the policy's own: enough for programs to find each other.
pub const BASE_ENV: &[(&str, &str)] = &[
    (
        "PATH",
        "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    ),
    ("HOME", "/tmp"),
];

/// Compose the environment: base variables, then the request's (which win).
pub fn compose_env(req: &[(String, String)]) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = BASE_ENV
        .iter()
        .filter(|(k, _)| !req.iter().any(|(rk, _)| rk == k))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    env.extend(req.iter().cloned());
    env
}

/// The environment with the proxy variables of `net` set (they replace any the
/// request gave: nothing else is reachable).
pub fn with_proxy_env(mut env: Vec<(String, String)>, net: NetMode) -> Vec<(String, String)> {
    let NetMode::Proxied { port } = net else {
        return env;
    };
    let vars = proxy::proxy_env(port);
    env.retain(|(k, _)| !vars.iter().any(|(v, _)| v == k));
    env.extend(vars);
    env
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proxy_variables_replace_the_requests_own() {
        let env = vec![
            ("HTTP_PROXY".to_string(), "http://elsewhere:1".to_string()),
            ("A".to_string(), "1".to_string()),
        ];

        let out = with_proxy_env(env, NetMode::Proxied { port: 3128 });

        assert_eq!(out.iter().filter(|(k, _)| k == "HTTP_PROXY").count(), 1);
        assert!(out.contains(&("HTTP_PROXY".into(), "http://127.0.0.1:3128".into())));
        assert!(out.contains(&("A".into(), "1".into())));
    }

    #[test]
    fn request_env_overrides_the_base() {
        let env = compose_env(&[("PATH".into(), "/x".into()), ("A".into(), "1".into())]);
        assert_eq!(
            env,
            vec![
                ("HOME".to_string(), "/tmp".to_string()),
                ("PATH".to_string(), "/x".to_string()),
                ("A".to_string(), "1".to_string()),
            ]
        );
    }
}
