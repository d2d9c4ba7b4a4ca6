//! Routing and handlers of the `/v1` API. Every answer is JSON (errors as
//! `{"error": {"code", "message"}}`), except file contents, the exec stream (one JSON
//! object per line) and `/metrics`.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::io::{Read, Write};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::{Frame, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use sandbox::output::StreamKind;
use sandbox::ExecRequest;
use serde::Deserialize;
use tokio::sync::mpsc;

use super::error::ApiError;
use super::files;
use super::sandboxes::{exit_json, CreateRequest, ExecEvent, ExecJob, Registry};

pub type Body = BoxBody<Bytes, Infallible>;

/// The checked-in OpenAPI document, served at `/v1/openapi.json`.
pub const OPENAPI: &str = include_str!("openapi.json");

/// What every handler can reach.
pub struct Service {
    pub registry: Registry,
    /// Most bytes of a JSON request body.
    pub max_body: usize,
}

/// A response body fed by a channel: the exec stream and file downloads.
struct ChannelBody {
    rx: mpsc::Receiver<Bytes>,
}

impl hyper::body::Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.rx
            .poll_recv(cx)
            .map(|chunk| chunk.map(|b| Ok(Frame::data(b))))
    }
}

fn full(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Response<Body> {
    let mut r = Response::new(Full::new(body.into()).boxed());
    *r.status_mut() = status;
    if let Ok(v) = content_type.parse() {
        r.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    r
}

fn json(status: StatusCode, value: &serde_json::Value) -> Response<Body> {
    let mut text = serde_json::to_vec(value).unwrap_or_default();
    text.push(b'\n');
    full(status, "application/json", text)
}

pub fn error_response(e: &ApiError) -> Response<Body> {
    json(e.status, &e.to_json())
}

fn streaming(content_type: &str, rx: mpsc::Receiver<Bytes>) -> Response<Body> {
    let mut r = Response::new(ChannelBody { rx }.boxed());
    if let Ok(v) = content_type.parse() {
        r.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    r
}

/// Answer one request.
/// `token`: the bearer token this listener requires (TCP), None on the Unix socket.
pub async fn handle(
    svc: Arc<Service>,
    token: Option<Arc<str>>,
    req: Request<Incoming>,
) -> Response<Body> {
    let response = match route(&svc, token.as_deref(), req).await {
        Ok(r) => r,
        Err(e) => error_response(&e),
    };
    svc.registry.metrics.response(response.status().as_u16());
    response
}

fn authorized(token: Option<&str>, req: &Request<Incoming>) -> bool {
    let Some(token) = token else {
        return true;
    };
    let given = req
        .headers()
        .get(hyper::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    // Compare every byte whatever matches, so timing does not tell how much did.
    given.len() == token.len()
        && given
            .bytes()
            .zip(token.bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

fn query_param(req: &Request<Incoming>, name: &str) -> Option<String> {
    let query = req.uri().query()?;
    query.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (k == name).then(|| percent_decode(v))
    })
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
                match u8::from_str_radix(hex, 16) {
                    Ok(b) => {
                        out.push(b);
                        i += 3;
                    }
                    Err(_) => {
                        out.push(b'%');
                        i += 1;
                    }
                }
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn path_param(req: &Request<Incoming>) -> Result<String, ApiError> {
    query_param(req, "path")
        .filter(|p| !p.is_empty())
        .ok_or_else(|| {
            ApiError::bad_request("bad_request", "the query parameter `path` is missing")
        })
}

/// Read a JSON body of at most `max` bytes.
async fn read_json<T: serde::de::DeserializeOwned>(
    body: Incoming,
    max: usize,
) -> Result<T, ApiError> {
    let mut body = body;
    let mut data = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = frame
            .map_err(|e| ApiError::bad_request("bad_request", format!("reading the body: {e}")))?;
        if let Ok(chunk) = frame.into_data() {
            if data.len() + chunk.len() > max {
                return Err(ApiError::too_large(format!(
                    "the request body is larger than {max} bytes (--max-body)"
                )));
            }
            data.extend_from_slice(&chunk);
        }
    }
    let de = &mut serde_json::Deserializer::from_slice(&data);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let field = e.path().to_string();
        let at = if field == "." || field == "?" {
            String::new()
        } else {
            format!(" at `{field}`")
        };
        ApiError::bad_request(
            "malformed_request",
            format!("invalid request body{at}: {}", e.inner()),
        )
    })
}

async fn route(
    svc: &Arc<Service>,
    token: Option<&str>,
    req: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    if !authorized(token, &req) {
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "a valid `Authorization: Bearer <token>` header is required",
        ));
    }
    let path = req.uri().path().to_string();
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let method = req.method().clone();
    match (method.clone(), segments.as_slice()) {
        (Method::GET, ["v1", "health"]) => {
            Ok(json(StatusCode::OK, &serde_json::json!({"status": "ok"})))
        }
        (Method::GET, ["v1", "openapi.json"]) => {
            Ok(full(StatusCode::OK, "application/json", OPENAPI))
        }
        (Method::GET, ["metrics"]) => {
            let mut active: BTreeMap<String, u64> = BTreeMap::new();
            for e in svc.registry.list() {
                *active.entry(e.backend.as_str().to_string()).or_default() += 1;
            }
            let mut text = svc.registry.metrics.render(&active);
            if let Some(pool) = &svc.registry.pool {
                text.push_str(&super::metrics::render_pool(&pool.status()));
            }
            Ok(full(StatusCode::OK, "text/plain; version=0.0.4", text))
        }
        (Method::POST, ["v1", "sandboxes"]) => create(svc, req).await,
        (Method::GET, ["v1", "sandboxes"]) => {
            let all: Vec<_> = svc.registry.list().iter().map(|e| e.info()).collect();
            Ok(json(
                StatusCode::OK,
                &serde_json::json!({ "sandboxes": all }),
            ))
        }
        (Method::GET, ["v1", "sandboxes", id]) => {
            let e = svc.registry.get(id)?;
            Ok(json(
                StatusCode::OK,
                &serde_json::to_value(e.info()).unwrap_or_default(),
            ))
        }
        (Method::DELETE, ["v1", "sandboxes", id]) => {
            let e = svc.registry.delete(id)?;
            let mut info = serde_json::to_value(e.info()).unwrap_or_default();
            info["state"] = "deleted".into();
            Ok(json(StatusCode::OK, &info))
        }
        (Method::POST, ["v1", "sandboxes", id, "exec"]) => {
            let id = id.to_string();
            exec(svc, &id, req).await
        }
        (Method::GET, ["v1", "sandboxes", id, "execs"]) => {
            let entry = svc.registry.get(id)?;
            let execs: Vec<_> = entry
                .active()
                .into_iter()
                .map(|(id, a)| {
                    serde_json::json!({
                        "id": id,
                        "argv": a.argv,
                        "started_unix_ms": a.started
                            .duration_since(std::time::SystemTime::UNIX_EPOCH)
                            .map_or(0, |d| d.as_millis()),
                    })
                })
                .collect();
            Ok(json(StatusCode::OK, &serde_json::json!({ "execs": execs })))
        }
        (Method::POST, ["v1", "sandboxes", id, "execs", exec_id, "signal"]) => {
            let (id, exec_id) = (id.to_string(), exec_id.to_string());
            signal(svc, &id, &exec_id, req).await
        }
        (Method::GET, ["v1", "sandboxes", id, "files"]) => {
            let id = id.to_string();
            download(svc, &id, &req)
        }
        (Method::PUT, ["v1", "sandboxes", id, "files"]) => {
            let id = id.to_string();
            upload(svc, &id, req).await
        }
        (Method::GET, ["v1", "sandboxes", id, "list"]) => {
            let entry = svc.registry.get(id)?;
            let p = path_param(&req)?;
            let listing = files::list(&entry.view, &p).inspect_err(|e| denied(svc, e))?;
            Ok(json(
                StatusCode::OK,
                &serde_json::json!({ "path": p, "entries": listing }),
            ))
        }
        (_, ["v1", "health"] | ["v1", "openapi.json"] | ["metrics"] | ["v1", "sandboxes", ..]) => {
            Err(ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                format!("{method} is not allowed on {path}"),
            ))
        }
        _ => Err(ApiError::not_found(format!(
            "no route {path}; see /v1/openapi.json"
        ))),
    }
}

fn denied(svc: &Service, e: &ApiError) {
    if e.status == StatusCode::FORBIDDEN {
        svc.registry
            .metrics
            .denials
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateBody {
    /// A policy in either format: a JSON object, or its text.
    #[serde(default)]
    policy: Option<serde_json::Value>,
    /// "process", "bubblewrap", "microvm" or "auto": overrides the policy's containment.
    #[serde(default)]
    backend: Option<String>,
    #[serde(default)]
    ttl_s: Option<u64>,
    #[serde(default)]
    idle_ttl_s: Option<u64>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
}

async fn create(svc: &Arc<Service>, req: Request<Incoming>) -> Result<Response<Body>, ApiError> {
    let body: CreateBody = read_json(req.into_body(), svc.max_body).await?;
    let mut policy = match body.policy {
        None => policy::Policy::empty(policy::PolicySource::Cli),
        Some(serde_json::Value::String(text)) => parse_policy(&text)?,
        Some(v @ serde_json::Value::Object(_)) => parse_policy(&v.to_string())?,
        Some(_) => {
            return Err(ApiError::bad_request(
                "malformed_request",
                "`policy` must be a JSON object or a string holding one",
            ))
        }
    };
    if let Some(b) = &body.backend {
        policy.containment = match b.as_str() {
            "process" => policy::Containment::Process,
            "bubblewrap" => policy::Containment::Bubblewrap,
            "microvm" => policy::Containment::Microvm,
            "auto" => policy::Containment::Auto,
            other => {
                return Err(ApiError::bad_request(
                    "unsupported_containment",
                    format!("`backend` {other:?} is not one of process, bubblewrap, microvm, auto"),
                ))
            }
        };
    }
    if policy.containment == policy::Containment::Hyperlight {
        return Err(ApiError::unprocessable(
            "unsupported_containment",
            "the hyperlight backend runs no commands yet; use process, bubblewrap or microvm",
        ));
    }
    let request = CreateRequest {
        policy,
        labels: body.labels,
        ttl: body.ttl_s.map(Duration::from_secs),
        idle_ttl: body.idle_ttl_s.map(Duration::from_secs),
    };
    let svc2 = Arc::clone(svc);
    let entry = tokio::task::spawn_blocking(move || svc2.registry.create(request))
        .await
        .map_err(|e| ApiError::internal(format!("sandbox creation failed: {e}")))??;
    Ok(json(
        StatusCode::CREATED,
        &serde_json::to_value(entry.info()).unwrap_or_default(),
    ))
}

fn parse_policy(text: &str) -> Result<policy::Policy, ApiError> {
    let base = std::env::current_dir().unwrap_or_else(|_| "/".into());
    policy::parse_with_base(text, "request.policy", &base)
        .map_err(|e| ApiError::bad_policy(super::error::chain(&e)))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ExecBody {
    argv: Vec<String>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    #[serde(default)]
    cwd: Option<String>,
    /// Standard input, base64.
    #[serde(default)]
    stdin_b64: Option<String>,
    #[serde(default)]
    timeout_ms: Option<u64>,
}

async fn exec(
    svc: &Arc<Service>,
    id: &str,
    req: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    // The body first: a client still sending it would not see an earlier answer.
    let body: ExecBody = read_json(req.into_body(), svc.max_body).await?;
    let entry = svc.registry.get(id)?;
    if body.argv.is_empty() {
        return Err(ApiError::bad_request(
            "malformed_request",
            "`argv` is empty",
        ));
    }
    let stdin = body
        .stdin_b64
        .as_deref()
        .map(|s| base64::engine::general_purpose::STANDARD.decode(s))
        .transpose()
        .map_err(|e| {
            ApiError::bad_request(
                "malformed_request",
                format!("`stdin_b64` is not base64: {e}"),
            )
        })?;
    let running = svc.registry.running_execs();
    if running >= svc.registry.limits.max_execs {
        return Err(ApiError::too_many(format!(
            "{running} execs are running (--max-execs {})",
            svc.registry.limits.max_execs
        )));
    }
    // The policy's limit is a ceiling a request can only lower.
    let timeout = policy::tighter_timeout(
        body.timeout_ms.map(Duration::from_millis),
        entry.policy_timeout,
    )
    .unwrap_or(svc.registry.limits.default_exec_timeout);
    let request = ExecRequest {
        argv: body.argv,
        env: body.env.into_iter().collect(),
        cwd: body.cwd.map(Into::into),
        timeout: Some(timeout),
    };
    let (events_tx, mut events_rx) = mpsc::channel::<ExecEvent>(64);
    let exec_id = entry.submit(
        ExecJob {
            req: request,
            stdin,
            events: events_tx,
        },
        sandbox::ExecSignals::new(),
    )?;
    let (out_tx, out_rx) = mpsc::channel::<Bytes>(64);
    let sandbox_id = entry.id.clone();
    tokio::spawn(async move {
        let b64 = base64::engine::general_purpose::STANDARD;
        let mut ended = false;
        while let Some(event) = events_rx.recv().await {
            let value = match event {
                ExecEvent::Output(kind, data) => serde_json::json!({
                    "type": match kind { StreamKind::Stdout => "stdout", StreamKind::Stderr => "stderr" },
                    "data_b64": b64.encode(&data),
                }),
                ExecEvent::Exit(outcome) => {
                    ended = true;
                    exit_json(&outcome)
                }
                ExecEvent::Failed(e) => {
                    ended = true;
                    let mut v = e.to_json();
                    v["type"] = "error".into();
                    v
                }
            };
            let mut line = serde_json::to_vec(&value).unwrap_or_default();
            line.push(b'\n');
            if out_tx.send(Bytes::from(line)).await.is_err() {
                // The client left; the exec runs on to its end, its output is dropped.
                break;
            }
        }
        if !ended {
            let e = ApiError::gone(&sandbox_id);
            let mut v = e.to_json();
            v["type"] = "error".into();
            let mut line = serde_json::to_vec(&v).unwrap_or_default();
            line.push(b'\n');
            let _ = out_tx.send(Bytes::from(line)).await;
        }
    });
    let mut response = streaming("application/x-ndjson", out_rx);
    response
        .headers_mut()
        .insert(EXEC_ID_HEADER, hyper::header::HeaderValue::from(exec_id));
    Ok(response)
}

/// The response header of `POST …/exec` that names the exec (for `…/execs/{exec}/signal`).
pub const EXEC_ID_HEADER: &str = "x-exec-id";

/// How long a signal waits for an exec's command to start.
const SIGNAL_PATIENCE: Duration = Duration::from_secs(5);

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct SignalBody {
    /// A number (15) or a name (`"TERM"`, `"SIGTERM"`).
    signal: serde_json::Value,
}

async fn signal(
    svc: &Arc<Service>,
    id: &str,
    exec_id: &str,
    req: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    let body: SignalBody = read_json(req.into_body(), svc.max_body).await?;
    let entry = svc.registry.get(id)?;
    let signo = match &body.signal {
        serde_json::Value::Number(n) => n.as_i64().and_then(|n| {
            i32::try_from(n)
                .ok()
                .and_then(|n| sandbox::signals::parse_signal(&n.to_string()))
        }),
        serde_json::Value::String(name) => sandbox::signals::parse_signal(name),
        _ => None,
    }
    .ok_or_else(|| {
        ApiError::bad_request(
            "malformed_request",
            format!(
                "`signal` {} is not a signal: give a number 1..=64 or a name such as \"TERM\"",
                body.signal
            ),
        )
    })?;
    let signals = exec_id
        .parse::<u64>()
        .ok()
        .and_then(|n| entry.signals(n))
        .ok_or_else(|| {
            ApiError::not_found(format!(
                "no running exec {exec_id:?} in sandbox {id:?} (it may have ended)"
            ))
        })?;
    let sent = tokio::task::spawn_blocking(move || signals.send(signo, SIGNAL_PATIENCE))
        .await
        .map_err(|e| ApiError::internal(format!("the signal task failed: {e}")))?;
    use sandbox::signals::SignalError;
    match sent {
        Ok(()) => Ok(json(
            StatusCode::OK,
            &serde_json::json!({ "exec_id": exec_id, "signal": signo }),
        )),
        Err(e @ SignalError::NotASignal(_)) => {
            Err(ApiError::bad_request("malformed_request", e.to_string()))
        }
        Err(e @ SignalError::Ended) => Err(ApiError::not_found(format!(
            "exec {exec_id} in sandbox {id:?}: {e}"
        ))),
        Err(e) => Err(ApiError::new(
            StatusCode::CONFLICT,
            "signal_refused",
            format!("exec {exec_id} in sandbox {id:?}: {e}"),
        )),
    }
}

fn download(
    svc: &Arc<Service>,
    id: &str,
    req: &Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    let entry = svc.registry.get(id)?;
    entry.touch();
    let p = path_param(req)?;
    let (mut file, len) = files::open_read(&entry.view, &p).inspect_err(|e| denied(svc, e))?;
    let (tx, rx) = mpsc::channel::<Bytes>(8);
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 256 * 1024];
        loop {
            match file.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if tx.blocking_send(Bytes::copy_from_slice(&buf[..n])).is_err() {
                        break;
                    }
                }
            }
        }
    });
    let mut r = streaming("application/octet-stream", rx);
    if let Ok(v) = len.to_string().parse() {
        r.headers_mut().insert(hyper::header::CONTENT_LENGTH, v);
    }
    Ok(r)
}

/// Most bytes of a refused upload read before answering: a client that sends its whole
/// body before reading (most do) then sees the answer, not a closed connection.
const DRAIN_LIMIT: u64 = 64 << 20;

async fn drain(body: &mut Incoming) {
    let mut seen = 0u64;
    while let Some(Ok(frame)) = body.frame().await {
        if let Ok(chunk) = frame.into_data() {
            seen += chunk.len() as u64;
            if seen > DRAIN_LIMIT {
                break;
            }
        }
    }
}

async fn upload(
    svc: &Arc<Service>,
    id: &str,
    req: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    let p = path_param(&req);
    let mut body = req.into_body();
    let opened = p.and_then(|p| {
        let entry = svc.registry.get(id)?;
        entry.touch();
        let upload = files::open_write(&entry.view, &p).inspect_err(|e| denied(svc, e))?;
        Ok((p, upload))
    });
    let (p, upload) = match opened {
        Ok(o) => o,
        Err(e) => {
            drain(&mut body).await;
            return Err(e);
        }
    };
    // The body goes to a new file beside the target as it arrives, on a thread of its
    // own (any size, little memory), and replaces the target only when all of it came:
    // a failed upload leaves the old file as it was.
    let (tx, mut rx) = mpsc::channel::<Bytes>(8);
    let writer = std::thread::spawn(move || -> std::io::Result<(files::Upload, u64)> {
        let mut upload = upload;
        let mut total = 0u64;
        while let Some(chunk) = rx.blocking_recv() {
            upload.file.write_all(&chunk)?;
            total += chunk.len() as u64;
        }
        Ok((upload, total))
    });
    let mut failed = None;
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(f) => {
                if let Ok(chunk) = f.into_data() {
                    if tx.send(chunk).await.is_err() {
                        break;
                    }
                }
            }
            Err(e) => {
                failed = Some(format!("reading the body: {e}"));
                break;
            }
        }
    }
    drop(tx);
    let (upload, written) = tokio::task::spawn_blocking(move || writer.join())
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?
        .map_err(|_| ApiError::internal("the file writer failed"))?
        .map_err(|e| ApiError::internal(format!("writing {p}: {e}")))?;
    if let Some(message) = failed {
        // Dropping the upload removes its new file; the target is untouched.
        return Err(ApiError::bad_request("bad_request", message));
    }
    upload
        .commit()
        .map_err(|e| ApiError::internal(format!("replacing {p}: {e}")))?;
    Ok(json(
        StatusCode::CREATED,
        &serde_json::json!({ "path": p, "bytes": written }),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percent_decoding() {
        assert_eq!(percent_decode("/a%20b/c%2Fd"), "/a b/c/d");
        assert_eq!(percent_decode("%zz%4"), "%zz%4");
        assert_eq!(percent_decode("a+b"), "a b");
    }

    #[test]
    fn the_openapi_document_is_json_with_every_route() {
        let v: serde_json::Value = serde_json::from_str(OPENAPI).unwrap();
        let paths = v["paths"].as_object().unwrap();
        for p in [
            "/v1/health",
            "/v1/sandboxes",
            "/v1/sandboxes/{id}",
            "/v1/sandboxes/{id}/exec",
            "/v1/sandboxes/{id}/execs",
            "/v1/sandboxes/{id}/execs/{exec}/signal",
            "/v1/sandboxes/{id}/files",
            "/v1/sandboxes/{id}/list",
            "/metrics",
        ] {
            assert!(paths.contains_key(p), "{p}");
        }
    }
}
