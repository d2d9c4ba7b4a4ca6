//! `mxc-vm serve`: a long-running service with an HTTP/JSON API for code-execution
//! services — long-lived sandboxes, many execs each, files in and out.
//!
//! One current-thread tokio runtime serves HTTP/1.1 (hyper) on a Unix socket (mode 0600)
//! and, optionally, on TCP behind a bearer token. Sandbox work blocks (a boot, an exec),
//! so each sandbox has a thread of its own ([`sandboxes`]); the runtime only moves bytes.
//! SIGTERM, SIGINT and SIGHUP kill every running command (the handler of
//! `sandbox::interrupt`), stop every sandbox and remove the socket.

mod api;
mod error;
mod files;
mod metrics;
mod sandboxes;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;

use crate::cli::ServeArgs;
use crate::failure::Failure;
use api::Service;
use sandboxes::{Limits, Registry};

/// The socket when `--socket` is not given: `$XDG_RUNTIME_DIR/mxc-vm/serve.sock`, else
/// `/tmp/mxc-vm-<uid>/serve.sock`.
pub fn default_socket() -> PathBuf {
    let dir = match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(d) if !d.is_empty() => PathBuf::from(d).join("mxc-vm"),
        // SAFETY: getuid cannot fail.
        _ => PathBuf::from(format!("/tmp/mxc-vm-{}", unsafe { libc::getuid() })),
    };
    dir.join("serve.sock")
}

fn bind_unix(path: &Path) -> Result<tokio::net::UnixListener, Failure> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    if let Some(dir) = path.parent() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| Failure::new(format!("cannot create {}: {e}", dir.display())))?;
    }
    // A socket left by a service that died: remove it only if nobody answers on it.
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(Failure::new(format!(
                "another service already listens on {}",
                path.display()
            )));
        }
        let meta = std::fs::symlink_metadata(path)
            .map_err(|e| Failure::new(format!("{}: {e}", path.display())))?;
        if !std::os::unix::fs::FileTypeExt::is_socket(&meta.file_type()) {
            return Err(Failure::new(format!(
                "{} exists and is not a socket; not removing it",
                path.display()
            )));
        }
        let _ = std::fs::remove_file(path);
    }
    // The socket is private to its owner from the start: no window with a wider mode.
    // SAFETY: umask only changes this process's file creation mask.
    let old = unsafe { libc::umask(0o177) };
    let bound = tokio::net::UnixListener::bind(path);
    // SAFETY: as above, restoring the previous mask.
    unsafe { libc::umask(old) };
    let listener =
        bound.map_err(|e| Failure::new(format!("cannot listen on {}: {e}", path.display())))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| Failure::new(format!("{}: {e}", path.display())))?;
    Ok(listener)
}

fn read_token(args: &ServeArgs) -> Result<Option<String>, Failure> {
    let Some(file) = &args.token_file else {
        return Ok(None);
    };
    let text = std::fs::read_to_string(file)
        .map_err(|e| Failure::new(format!("--token-file {}: {e}", file.display())))?;
    let token = text.trim().to_string();
    if token.len() < 16 || !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(Failure::new(format!(
            "--token-file {}: the token must be at least 16 printable characters without spaces",
            file.display()
        )));
    }
    Ok(Some(token))
}

/// Validate the TCP address: only loopback without a token.
fn tcp_address(args: &ServeArgs, token: &Option<String>) -> Result<Option<SocketAddr>, Failure> {
    let Some(listen) = &args.listen else {
        if token.is_some() {
            return Err(Failure::new(
                "--token-file applies to --listen; the Unix socket is protected by its mode (0600)",
            ));
        }
        return Ok(None);
    };
    let addr: SocketAddr = listen
        .parse()
        .map_err(|e| Failure::new(format!("--listen {listen:?}: not an ADDRESS:PORT ({e})")))?;
    if token.is_none() {
        return Err(Failure::new(format!(
            "--listen {addr} needs --token-file: a TCP port is reachable by every local user{}",
            if addr.ip().is_loopback() {
                ""
            } else {
                " and, on this address, by other machines"
            }
        )));
    }
    Ok(Some(addr))
}

pub fn run(args: ServeArgs) -> Result<i32, Failure> {
    let token = read_token(&args)?;
    let tcp = tcp_address(&args, &token)?;
    let socket = args.socket.clone().unwrap_or_else(default_socket);
    sandbox::interrupt::install()
        .map_err(|e| Failure::new(format!("installing the signal handlers: {e}")))?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Failure::new(format!("cannot start the runtime: {e}")))?;
    let limits = Limits {
        max_sandboxes: args.max_sandboxes,
        max_execs: args.max_execs,
        default_exec_timeout: policy::parse_duration(&args.exec_timeout)
            .map_err(|e| Failure::new(format!("--exec-timeout {:?}: {e}", args.exec_timeout)))?,
    };
    let pool = (args.warm_pool > 0)
        .then(|| {
            sandbox::microvm::WarmPool::new(sandbox::microvm::PoolOptions {
                size: args.warm_pool,
                memory_budget_mib: args.warm_pool_memory,
                ..Default::default()
            })
        })
        .transpose()
        .map_err(|e| Failure::new(format!("--warm-pool: {}", sandbox::error_chain(&e))))?;
    let mut registry = Registry::new(limits, Default::default());
    registry.pool = pool;
    let svc = Arc::new(Service {
        registry,
        max_body: args.max_body,
    });
    let token: Option<Arc<str>> = token.map(Arc::from);
    let result = runtime.block_on(async {
        let unix = bind_unix(&socket)?;
        let tcp_listener = match tcp {
            Some(addr) => Some(
                tokio::net::TcpListener::bind(addr)
                    .await
                    .map_err(|e| Failure::new(format!("cannot listen on {addr}: {e}")))?,
            ),
            None => None,
        };
        // One line for whoever started us (a test, a supervisor): where we listen.
        let ready = serde_json::json!({
            "type": "listening",
            "socket": socket,
            "tcp": tcp_listener.as_ref().and_then(|l| l.local_addr().ok()).map(|a| a.to_string()),
            "pid": std::process::id(),
        });
        println!("{ready}");
        serve_loop(&svc, unix, tcp_listener, token).await;
        Ok::<(), Failure>(())
    });
    // Whatever ended the loop: every sandbox stops, nothing is left behind.
    let registry_svc = Arc::clone(&svc);
    registry_svc.registry.shutdown();
    let _ = std::fs::remove_file(&socket);
    drop(runtime);
    result?;
    Ok(sandbox::interrupt::taken().map_or(0, |s| 128 + s))
}

/// Accept on both listeners until a signal; reap expired sandboxes on the way.
async fn serve_loop(
    svc: &Arc<Service>,
    unix: tokio::net::UnixListener,
    tcp: Option<tokio::net::TcpListener>,
    token: Option<Arc<str>>,
) {
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    loop {
        tokio::select! {
            accepted = unix.accept() => {
                if let Ok((stream, _)) = accepted {
                    spawn_connection(Arc::clone(svc), None, TokioIo::new(stream));
                }
            }
            accepted = async {
                match &tcp {
                    Some(l) => l.accept().await.map(|(s, _)| s),
                    None => std::future::pending().await,
                }
            } => {
                if let Ok(stream) = accepted {
                    let _ = stream.set_nodelay(true);
                    spawn_connection(Arc::clone(svc), token.clone(), TokioIo::new(stream));
                }
            }
            _ = tick.tick() => {
                if sandbox::interrupt::taken().is_some() {
                    return;
                }
                let svc = Arc::clone(svc);
                // Deleting waits for nothing (a sandbox stops on its own thread).
                let _ = tokio::task::spawn_blocking(move || svc.registry.reap_expired()).await;
            }
        }
    }
}

fn spawn_connection<I>(svc: Arc<Service>, token: Option<Arc<str>>, io: I)
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    tokio::spawn(async move {
        let service = service_fn(move |req| {
            let svc = Arc::clone(&svc);
            let token = token.clone();
            async move { Ok::<_, std::convert::Infallible>(api::handle(svc, token, req).await) }
        });
        // A client has this long to send a request's head (slow-header clients).
        let _ = http1::Builder::new()
            .keep_alive(true)
            .timer(hyper_util::rt::TokioTimer::new())
            .header_read_timeout(Duration::from_secs(30))
            .serve_connection(io, service)
            .await;
    });
}
