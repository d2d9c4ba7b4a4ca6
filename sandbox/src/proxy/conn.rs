//! One connection from the sandbox, start to end: read the request head, decide, resolve
//! (after the decision), check the addresses, connect, answer, relay, and write the
//! audit line.

use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::time::Instant;

use super::audit::{now_rfc3339, AuditRecord};
use super::decide::{self, Refusal, Target};
use super::http::{self, Host, HttpError, Request};
use super::relay::{End, Gate, Relay};
use super::upstream::{self, UpstreamError};
use super::{sys, tls, Shared};

/// A connection that ends with an HTTP refusal (status 0: nothing can be sent).
#[derive(Debug)]
struct Fail {
    status: u16,
    /// `X-Mxc-Deny` for policy refusals, `X-Mxc-Error` for failures.
    header: &'static str,
    rule: String,
    message: String,
}

impl Fail {
    fn deny(status: u16, rule: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            status,
            header: "X-Mxc-Deny",
            rule: rule.into(),
            message: message.into(),
        }
    }

    fn error(status: u16, rule: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            status,
            header: "X-Mxc-Error",
            rule: rule.into(),
            message: message.into(),
        }
    }
}

impl From<Refusal> for Fail {
    fn from(r: Refusal) -> Self {
        Fail::deny(r.status, r.rule, r.message)
    }
}

fn bad_request(e: HttpError) -> Fail {
    match e {
        HttpError::HostMismatch { .. } => Fail::deny(400, "host-mismatch", e.to_string()),
        HttpError::TransferEncoding(_) => Fail::deny(501, "bad-request", e.to_string()),
        _ => Fail::deny(400, "bad-request", e.to_string()),
    }
}

/// Serves one accepted connection and writes its audit line.
pub(crate) fn handle(shared: &Shared, client: OwnedFd) {
    let started = Instant::now();
    let mut rec = AuditRecord {
        time: now_rfc3339(),
        sandbox: shared.config.sandbox_id.clone(),
        kind: "unknown".into(),
        action: "deny".into(),
        ..AuditRecord::default()
    };
    let fd = client.as_raw_fd();
    sys::set_nodelay(fd);
    let result = match sys::set_nonblocking(fd, true) {
        Ok(()) => serve(shared, fd, &mut rec),
        Err(e) => Err(Fail::error(0, "socket-error", e.to_string())),
    };
    if let Err(fail) = result {
        if fail.status != 0 {
            let reply = http::refusal(fail.status, fail.header, &fail.rule, &fail.message);
            let deadline = Instant::now() + std::time::Duration::from_secs(2);
            let _ = sys::send_all(fd, &reply, deadline, shared.stop.fd());
            rec.status = fail.status;
        }
        rec.action = "deny".into();
        rec.rule = fail.rule;
        rec.reason = Some(fail.message);
    }
    drop(client);
    rec.duration_ms = started.elapsed().as_millis() as u64;
    shared.record(&rec);
}

/// How long a refused connection's request may take to arrive (it is read and dropped,
/// so that closing the socket sends the refusal with a FIN, not a reset that would
/// discard it at the client).
const REFUSAL_LINGER: std::time::Duration = std::time::Duration::from_millis(20);

/// Refuses a connection the proxy cannot take (too many open) without parsing it.
pub(crate) fn refuse_busy(shared: &Shared, client: OwnedFd, limit: usize) {
    let fd = client.as_raw_fd();
    let message = format!("more than {limit} connections are open (limits.maxConnections)");
    let reply = http::refusal(503, "X-Mxc-Deny", "limits.maxConnections", &message);
    let _ = sys::set_nonblocking(fd, true);
    let _ = sys::send(fd, &reply);
    sys::shutdown_write(fd);
    // Drop what the client sends until it closes, at most 64 KiB or REFUSAL_LINGER.
    let deadline = Instant::now() + REFUSAL_LINGER;
    let mut scratch = [0u8; 4096];
    for _ in 0..16 {
        let left = deadline.saturating_duration_since(Instant::now());
        let mut fds = [sys::pollfd(fd, libc::POLLIN)];
        if left.is_zero() || !matches!(sys::poll(&mut fds, Some(left)), Ok(n) if n > 0) {
            break;
        }
        if !matches!(sys::recv(fd, &mut scratch), Ok(n) if n > 0) {
            break;
        }
    }
    drop(client);
    shared.record(&AuditRecord {
        time: now_rfc3339(),
        sandbox: shared.config.sandbox_id.clone(),
        kind: "unknown".into(),
        rule: "limits.maxConnections".into(),
        action: "deny".into(),
        status: 503,
        reason: Some(message),
        ..AuditRecord::default()
    });
}

fn serve(shared: &Shared, client: RawFd, rec: &mut AuditRecord) -> Result<(), Fail> {
    let cfg = &shared.config;
    let stop = shared.stop.fd();
    let head_deadline = Instant::now() + cfg.header_timeout;
    let Some((head_bytes, early)) = upstream::read_head(client, head_deadline, stop) else {
        return Err(Fail::deny(
            400,
            "incomplete-request",
            "no complete request head arrived (closed, too large or too slow)",
        ));
    };
    let head = http::parse_head(&head_bytes).map_err(bad_request)?;
    let request = http::classify(&head).map_err(bad_request)?;
    let target = match &request {
        Request::Connect(a) => a,
        Request::Forward { target, .. } => target,
    };
    rec.kind = match &request {
        Request::Connect(_) => "connect",
        Request::Forward { .. } => "http",
    }
    .into();
    rec.host = match &target.host {
        Host::Name(n) => n.clone(),
        Host::Ip(a) => a.to_string(),
    };
    rec.port = target.port;

    let decision_target = match &target.host {
        Host::Name(n) => Target::Name(n),
        Host::Ip(a) => Target::Ip(*a),
    };
    rec.rule = decide::decide(&cfg.egress, decision_target, target.port)?;

    let connect_deadline = Instant::now() + cfg.connect_timeout;
    // The addresses of the target, resolved only after the allow decision.
    let addresses = |why: &str| match &target.host {
        Host::Ip(a) => Ok(vec![*a]),
        Host::Name(n) => cfg
            .resolver
            .resolve(n)
            .map_err(|e| Fail::error(502, "resolve-failed", format!("{e} ({why})"))),
    };
    let (server, mut server_early) = match &shared.upstream {
        Some(up) => {
            // The upstream proxy resolves the name again, but every address it could
            // reach is checked here first: a name may resolve to a private, loopback or
            // metadata address. A name that does not resolve here cannot be checked, so
            // it is refused (fail closed).
            let addrs = addresses(
                "its addresses must be checked before the request goes to the upstream proxy",
            )?;
            for a in addrs {
                if let Some(rule) = decide::check_address(&cfg.egress, a, target.port)? {
                    rec.address_rule = Some(rule);
                }
            }
            rec.resolved = Some(format!("via {}", up.url));
            let fd = up
                .connect(cfg.resolver.as_ref(), connect_deadline, stop)
                .map_err(upstream_fail)?;
            (fd, Vec::new())
        }
        None => {
            let addrs = addresses("after the allow decision")?;
            let (fd, addr, address_rule) =
                connect_checked(shared, &addrs, target.port, connect_deadline)?;
            rec.resolved = Some(addr.to_string());
            rec.address_rule = address_rule;
            (fd, Vec::new())
        }
    };

    let server_fd = server.as_raw_fd();
    let mut head_sent = 0u64;
    let (gate, request_mode, client_early) = match &request {
        Request::Connect(auth) => {
            if let Some(up) = &shared.upstream {
                server_early = up
                    .open_tunnel(&server, auth, connect_deadline, stop)
                    .map_err(upstream_fail)?;
            }
            let deadline = Instant::now() + cfg.header_timeout;
            sys::send_all(client, http::CONNECT_OK, deadline, stop)
                .map_err(|e| Fail::error(0, "client-gone", e.to_string()))?;
            rec.status = 200;
            let gate = match &auth.host {
                Host::Name(n) => Gate::Sni { host: n.clone() },
                Host::Ip(_) => Gate::Open,
            };
            (gate, false, early)
        }
        Request::Forward {
            origin_head,
            proxy_head,
            body,
            ..
        } => {
            let head = if shared.upstream.is_some() {
                proxy_head
            } else {
                origin_head
            };
            sys::set_nonblocking(server_fd, true)
                .map_err(|e| Fail::error(502, "connect-failed", e.to_string()))?;
            sys::send_all(server_fd, head, connect_deadline, stop).map_err(|e| {
                Fail::error(502, "connect-failed", format!("sending the request: {e}"))
            })?;
            head_sent = head.len() as u64;
            (Gate::Body(http::BodyLimit::new(body)), true, early)
        }
    };
    rec.action = "allow".into();

    let outcome = Relay {
        client,
        server: server_fd,
        stop,
        idle: cfg.idle_timeout,
        bucket: shared.bucket.as_ref(),
        client_initial: client_early,
        server_initial: server_early,
        gate,
        request_mode,
    }
    .run();
    rec.bytes_up = outcome.up + head_sent;
    rec.bytes_down = outcome.down;
    if request_mode {
        // The origin's status, for the audit line (the response itself is not parsed).
        rec.status = http::status_prefix(&outcome.down_head).unwrap_or(0);
    }
    match outcome.end {
        End::Closed => {}
        End::Idle => rec.reason = Some(format!("closed after {:?} idle", cfg.idle_timeout)),
        End::Stopped => rec.reason = Some("the sandbox stopped".into()),
        End::Error(e) => rec.reason = Some(format!("connection error: {e}")),
        End::BadBody(e) => rec.reason = Some(format!("request body: {e}")),
        End::SniMismatch { sni } => {
            let _ = sys::send(client, &tls::ACCESS_DENIED_ALERT);
            let host = rec.host.clone();
            return Err(Fail::deny(
                0,
                format!("sni-mismatch {sni}"),
                format!(
                    "the TLS server name \"{sni}\" differs from the CONNECT host \"{host}\" \
                     (domain fronting)"
                ),
            ));
        }
        End::BadHello(why) => {
            let _ = sys::send(client, &tls::ACCESS_DENIED_ALERT);
            return Err(Fail::deny(0, "tls-hello", why));
        }
        End::Unchecked { rule, why, http } => {
            if http {
                let _ = sys::send(client, &http::refusal(403, "X-Mxc-Deny", rule, &why));
            } else if rule.starts_with("tls") {
                let _ = sys::send(client, &tls::ACCESS_DENIED_ALERT);
            }
            return Err(Fail::deny(0, rule, why));
        }
    }
    Ok(())
}

fn upstream_fail(e: UpstreamError) -> Fail {
    let rule = match e {
        UpstreamError::Refused { .. } => "upstream-refused",
        _ => "upstream-failed",
    };
    Fail::error(502, rule, crate::error_chain(&e))
}

/// Checks every address again and connects to the first allowed one that answers.
fn connect_checked(
    shared: &Shared,
    addrs: &[IpAddr],
    port: u16,
    deadline: Instant,
) -> Result<(OwnedFd, SocketAddr, Option<String>), Fail> {
    let mut refused: Option<Refusal> = None;
    let mut last_error: Option<(SocketAddr, std::io::Error)> = None;
    for &a in addrs {
        let a = decide::canonical(a);
        let address_rule = match decide::check_address(&shared.config.egress, a, port) {
            Ok(r) => r,
            Err(r) => {
                refused.get_or_insert(r);
                continue;
            }
        };
        let sa = SocketAddr::new(a, port);
        match sys::connect(sa, deadline, shared.stop.fd()) {
            Ok(fd) => return Ok((fd, sa, address_rule)),
            Err(e) => last_error = Some((sa, e)),
        }
    }
    match (last_error, refused) {
        (Some((sa, e)), _) => Err(Fail::error(
            if e.kind() == std::io::ErrorKind::TimedOut {
                504
            } else {
                502
            },
            "connect-failed",
            format!("cannot connect to {sa}: {e}"),
        )),
        (None, Some(r)) => Err(r.into()),
        (None, None) => Err(Fail::error(502, "resolve-failed", "no address")),
    }
}
