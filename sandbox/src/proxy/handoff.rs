//! How a process-tier sandbox reaches the host proxy without any route out.
//!
//! The sandbox keeps its private network namespace with only `lo`. Before the command
//! starts, code of ours that runs inside that namespace (the native backend's PID 1, or
//! the exec helper bubblewrap runs in front of the command, `bubblewrap::helper`) binds
//! `127.0.0.1:`[`SANDBOX_PROXY_PORT`] there and sends the listening socket to the host
//! over a Unix socket pair (SCM_RIGHTS), then closes its own copy. The host proxy
//! accepts from that socket directly: connections the command makes to
//! 127.0.0.1:3128 inside its namespace arrive at the host proxy, and nothing else leaves.
//!
//! This replaces a forwarder process inside the sandbox: there is no extra process the
//! command could signal or inspect, no host socket path in the sandbox's view, and no
//! second copy of every byte.

use std::net::TcpListener;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

use super::{sys, ProxyError};

/// The port the proxy listens on inside a sandbox's network namespace.
pub const SANDBOX_PROXY_PORT: u16 = 3128;

/// The proxy variables a sandboxed command gets (upper- and lower-case).
pub fn proxy_env(port: u16) -> Vec<(String, String)> {
    let url = format!("http://127.0.0.1:{port}");
    let no_proxy = "localhost,127.0.0.1,::1".to_string();
    let mut env = Vec::new();
    for (name, value) in [
        ("HTTP_PROXY", &url),
        ("HTTPS_PROXY", &url),
        ("ALL_PROXY", &url),
        ("NO_PROXY", &no_proxy),
    ] {
        env.push((name.to_string(), value.clone()));
        env.push((name.to_ascii_lowercase(), value.clone()));
    }
    env
}

/// A socket pair for one handoff: `(host end, sandbox end)`, both close-on-exec.
pub fn pair() -> std::io::Result<(OwnedFd, OwnedFd)> {
    sys::seqpacket_pair()
}

/// Inside the sandbox's namespace: binds 127.0.0.1:`port` and sends the listening socket
/// over `sock`. The caller closes `sock` afterwards.
pub fn bind_and_send(port: u16, sock: RawFd) -> std::io::Result<()> {
    let listener = sys::listen_loopback(port)?;
    sys::send_fd(sock, listener.as_raw_fd())
}

/// On the host: waits for the listening socket (until `stop` fires or the sandbox end
/// closes without sending one) and checks what it is.
pub(crate) fn receive(sock: &OwnedFd, stop: RawFd) -> Result<Option<TcpListener>, ProxyError> {
    let io = |source| ProxyError::Io {
        context: "receiving the sandbox's proxy socket".into(),
        source,
    };
    let mut fds = [
        sys::pollfd(sock.as_raw_fd(), libc::POLLIN),
        sys::pollfd(stop, libc::POLLIN),
    ];
    sys::poll(&mut fds, None).map_err(io)?;
    if fds[1].revents != 0 {
        return Ok(None);
    }
    let Some(fd) = sys::recv_fd(sock.as_raw_fd()).map_err(io)? else {
        return Ok(None);
    };
    let (domain, listening) = sys::socket_kind(fd.as_raw_fd()).map_err(io)?;
    if !listening || (domain != libc::AF_INET && domain != libc::AF_INET6) {
        return Err(ProxyError::BadHandoff);
    }
    Ok(Some(TcpListener::from(fd)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proxy_env_has_both_cases() {
        let env = proxy_env(3128);

        assert_eq!(env.len(), 8);
        assert!(env.contains(&("https_proxy".into(), "http://127.0.0.1:3128".into())));
        assert!(env.contains(&("NO_PROXY".into(), "localhost,127.0.0.1,::1".into())));
    }

    #[test]
    fn a_listener_passes_between_processes_sockets() {
        let (host, sandbox) = pair().unwrap();
        let stop = sys::StopPipe::new().unwrap();

        bind_and_send(0, sandbox.as_raw_fd()).unwrap();
        drop(sandbox);
        let listener = receive(&host, stop.fd()).unwrap().unwrap();

        assert!(listener.local_addr().unwrap().ip().is_loopback());
    }

    #[test]
    fn a_closed_peer_sends_nothing() {
        let (host, sandbox) = pair().unwrap();
        let stop = sys::StopPipe::new().unwrap();

        drop(sandbox);

        assert!(receive(&host, stop.fd()).unwrap().is_none());
    }

    #[test]
    fn a_non_listening_socket_is_refused() {
        let (host, sandbox) = pair().unwrap();
        let (a, _b) = pair().unwrap();
        let stop = sys::StopPipe::new().unwrap();

        sys::send_fd(sandbox.as_raw_fd(), a.as_raw_fd()).unwrap();

        assert!(matches!(
            receive(&host, stop.fd()),
            Err(ProxyError::BadHandoff)
        ));
    }
}
