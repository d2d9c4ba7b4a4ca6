//! `mxc-vm bench proxy`: the network policy proxy against a direct connection on
//! loopback, in one run. Latency: connect, (CONNECT and its 200,) one byte there and
//! back, per connection, the two series interleaved. Throughput: one stream of N bytes
//! from a local server to the client, directly and through a CONNECT tunnel.
//!
//! The proxy is the one `mxc-vm run` uses (same code, same audit log by default),
//! listening on TCP as it does inside a process-tier sandbox, with a policy that allows
//! 127.0.0.1 by an explicit IP rule.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use policy::{Action, Egress, Limits, NetRule, Network, Origin, Protocol};
use sandbox::proxy::{AuditLog, Proxy, ProxyConfig};

use super::stats::{summarize, table, Summary};
use crate::cli::BenchProxyArgs;
use crate::failure::Failure;

const PING: u8 = b'P';
const STREAM: u8 = b'S';
const BUF: usize = 256 * 1024;

fn fail(what: &str) -> impl Fn(std::io::Error) -> Failure + '_ {
    move |e| Failure::new(format!("{what}: {e}"))
}

/// Parses `1GiB`, `512MiB`, `64KiB`, `1G`, `100MB` or plain bytes.
fn parse_bytes(s: &str) -> Result<u64, Failure> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| Failure::new(format!("--bytes {s:?}: expected e.g. 1GiB or 512MiB")))?;
    let mult: u64 = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kib" => 1 << 10,
        "m" | "mib" => 1 << 20,
        "g" | "gib" => 1 << 30,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        _ => {
            return Err(Failure::new(format!(
                "--bytes {s:?}: unknown unit {unit:?}"
            )))
        }
    };
    n.checked_mul(mult)
        .filter(|b| *b > 0)
        .ok_or_else(|| Failure::new(format!("--bytes {s:?} is out of range")))
}

/// The local server: `P` → one byte back; `S` + u64 → that many bytes, then close.
fn start_server() -> Result<SocketAddr, Failure> {
    let listener = TcpListener::bind("127.0.0.1:0").map_err(fail("binding the test server"))?;
    let addr = listener.local_addr().map_err(fail("test server address"))?;
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut s) = stream else { continue };
            std::thread::spawn(move || {
                let _ = s.set_nodelay(true);
                let mut cmd = [0u8; 1];
                if s.read_exact(&mut cmd).is_err() {
                    return;
                }
                match cmd[0] {
                    PING => {
                        let _ = s.write_all(&[PING]);
                        let mut rest = [0u8; 1];
                        let _ = s.read(&mut rest);
                    }
                    STREAM => {
                        let mut len = [0u8; 8];
                        if s.read_exact(&mut len).is_err() {
                            return;
                        }
                        let mut left = u64::from_le_bytes(len);
                        let chunk = vec![0x5au8; BUF];
                        while left > 0 {
                            let n = (left as usize).min(chunk.len());
                            if s.write_all(&chunk[..n]).is_err() {
                                return;
                            }
                            left -= n as u64;
                        }
                    }
                    _ => {}
                }
            });
        }
    });
    Ok(addr)
}

/// Opens a stream to `server`, directly or through a CONNECT tunnel of `proxy`.
fn open(server: SocketAddr, proxy: Option<SocketAddr>) -> Result<TcpStream, Failure> {
    let mut s = TcpStream::connect(proxy.unwrap_or(server)).map_err(fail("connecting"))?;
    s.set_nodelay(true).map_err(fail("TCP_NODELAY"))?;
    if proxy.is_some() {
        write!(s, "CONNECT {server} HTTP/1.1\r\nHost: {server}\r\n\r\n")
            .map_err(fail("sending CONNECT"))?;
        let mut head = Vec::with_capacity(64);
        let mut b = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            s.read_exact(&mut b)
                .map_err(fail("reading the CONNECT reply"))?;
            head.push(b[0]);
            if head.len() > 4096 {
                return Err(Failure::new("CONNECT reply too long"));
            }
        }
        if !head.starts_with(b"HTTP/1.1 200") {
            return Err(Failure::new(format!(
                "the proxy refused the benchmark's CONNECT: {}",
                String::from_utf8_lossy(&head).trim()
            )));
        }
    }
    Ok(s)
}

fn ping_once(server: SocketAddr, proxy: Option<SocketAddr>) -> Result<Duration, Failure> {
    let start = Instant::now();
    let mut s = open(server, proxy)?;
    s.write_all(&[PING]).map_err(fail("ping"))?;
    let mut b = [0u8; 1];
    s.read_exact(&mut b).map_err(fail("pong"))?;
    let took = start.elapsed();
    drop(s);
    Ok(took)
}

fn stream_once(server: SocketAddr, proxy: Option<SocketAddr>, bytes: u64) -> Result<f64, Failure> {
    let mut s = open(server, proxy)?;
    let start = Instant::now();
    let mut cmd = vec![STREAM];
    cmd.extend_from_slice(&bytes.to_le_bytes());
    s.write_all(&cmd).map_err(fail("stream request"))?;
    let mut buf = vec![0u8; BUF];
    let mut got = 0u64;
    while got < bytes {
        let n = s.read(&mut buf).map_err(fail("stream"))?;
        if n == 0 {
            return Err(Failure::new(format!(
                "stream ended after {got} of {bytes} bytes"
            )));
        }
        got += n as u64;
    }
    Ok(bytes as f64 / start.elapsed().as_secs_f64() / 1e6)
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

pub fn run(args: BenchProxyArgs) -> Result<i32, Failure> {
    let bytes = parse_bytes(&args.bytes)?;
    let server = start_server()?;
    let audit_dir = std::env::temp_dir().join(format!("mxc-vm-bench-proxy-{}", std::process::id()));
    let audit_path = audit_dir.join("audit.jsonl");
    let loopback =
        policy::parse_rule("127.0.0.1").map_err(|e| Failure::new(crate::failure::chain(&e)))?;
    let egress = Egress {
        default: Action::Deny,
        allow: vec![NetRule {
            target: loopback.target,
            ports: loopback.ports,
            protocol: Protocol::Tcp,
            origin: Origin::Flag("bench".into()),
        }],
        deny: Vec::new(),
    };
    let mut config = ProxyConfig::from_policy(
        "bench",
        &Network {
            egress,
            ..Network::default()
        },
        &Limits::default(),
    );
    if args.audit {
        std::fs::create_dir_all(&audit_dir).map_err(fail("creating the audit dir"))?;
        config.audit = Some(Arc::new(
            AuditLog::open(&audit_path).map_err(|e| Failure::new(crate::failure::chain(&e)))?,
        ));
    }
    let proxy = Proxy::new(config).map_err(|e| Failure::new(crate::failure::chain(&e)))?;
    let listener = TcpListener::bind("127.0.0.1:0").map_err(fail("binding the proxy"))?;
    let proxy_addr = listener.local_addr().map_err(fail("proxy address"))?;
    let server_handle = proxy
        .serve(listener)
        .map_err(|e| Failure::new(crate::failure::chain(&e)))?;
    let result = measure(&args, server, proxy_addr, bytes);
    server_handle.stop();
    proxy.shutdown();
    let _ = std::fs::remove_dir_all(&audit_dir);
    let report = result?;
    print(&args, &report, bytes);
    Ok(0)
}

struct Report {
    direct: Summary,
    proxied: Summary,
    direct_mbps: Vec<f64>,
    proxied_mbps: Vec<f64>,
}

fn measure(
    args: &BenchProxyArgs,
    server: SocketAddr,
    proxy: SocketAddr,
    bytes: u64,
) -> Result<Report, Failure> {
    for _ in 0..args.warmup {
        ping_once(server, None)?;
        ping_once(server, Some(proxy))?;
    }
    let mut direct = Vec::with_capacity(args.connections);
    let mut proxied = Vec::with_capacity(args.connections);
    let mut progress = std::io::stderr().lock();
    for i in 0..args.connections {
        direct.push(ping_once(server, None)?);
        proxied.push(ping_once(server, Some(proxy))?);
        if !args.json && (i + 1) % 500 == 0 {
            let _ = write!(progress, "\r{}/{} connections", i + 1, args.connections);
        }
    }
    let mut direct_mbps = Vec::new();
    let mut proxied_mbps = Vec::new();
    for r in 0..args.rounds {
        if !args.json {
            let _ = write!(
                progress,
                "\rthroughput round {}/{}      ",
                r + 1,
                args.rounds
            );
        }
        direct_mbps.push(stream_once(server, None, bytes)?);
        proxied_mbps.push(stream_once(server, Some(proxy), bytes)?);
    }
    if !args.json {
        let _ = writeln!(progress);
    }
    Ok(Report {
        direct: summarize(&direct),
        proxied: summarize(&proxied),
        direct_mbps,
        proxied_mbps,
    })
}

fn print(args: &BenchProxyArgs, r: &Report, bytes: u64) {
    let added_p50 = r.proxied.p50_ms - r.direct.p50_ms;
    let added_p99 = r.proxied.p99_ms - r.direct.p99_ms;
    let best = |v: &[f64]| v.iter().copied().fold(f64::NAN, f64::max);
    let (mut d, mut p) = (r.direct_mbps.clone(), r.proxied_mbps.clone());
    let (d_med, p_med) = (median(&mut d), median(&mut p));
    let mut out = std::io::stdout().lock();
    if args.json {
        let value = serde_json::json!({
            "benchmark": "proxy",
            "connections": args.connections,
            "bytes": bytes,
            "rounds": args.rounds,
            "audit": args.audit,
            "latency": {"direct": r.direct, "proxied": r.proxied,
                        "added_p50_ms": added_p50, "added_p99_ms": added_p99},
            "throughput_mb_s": {"direct": r.direct_mbps, "proxied": r.proxied_mbps,
                                "direct_median": d_med, "proxied_median": p_med},
        });
        let _ = writeln!(
            out,
            "{}",
            serde_json::to_string_pretty(&value).unwrap_or_default()
        );
        return;
    }
    let rows: Vec<Vec<String>> = [
        ("direct TCP (baseline)", &r.direct),
        ("through the proxy (CONNECT)", &r.proxied),
    ]
    .iter()
    .map(|(n, s)| {
        vec![
            n.to_string(),
            format!("{:.3}", s.p50_ms),
            format!("{:.3}", s.p90_ms),
            format!("{:.3}", s.p99_ms),
            format!("{:.3}", s.mean_ms),
        ]
    })
    .collect();
    let _ = write!(
        out,
        "{}",
        table(
            &[
                "connect + 1-byte round trip",
                "p50 ms",
                "p90 ms",
                "p99 ms",
                "mean ms"
            ],
            &rows
        )
    );
    let _ = writeln!(
        out,
        "added per connection: p50 {added_p50:.3} ms, p99 {added_p99:.3} ms (goal <= 1 ms)"
    );
    let rows = vec![
        vec![
            "direct TCP (baseline)".to_string(),
            format!("{:.0}", best(&r.direct_mbps)),
            format!("{d_med:.0}"),
        ],
        vec![
            "through the proxy (CONNECT)".to_string(),
            format!("{:.0}", best(&r.proxied_mbps)),
            format!("{p_med:.0}"),
        ],
    ];
    let _ = write!(
        out,
        "{}",
        table(
            &[
                &format!("stream of {} MiB", bytes >> 20),
                "best MB/s",
                "median MB/s"
            ],
            &rows
        )
    );
    let _ = writeln!(
        out,
        "proxied median throughput: {p_med:.0} MB/s (goal >= 1000 MB/s)"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_sizes_parse() {
        assert_eq!(parse_bytes("1GiB").unwrap(), 1 << 30);
        assert_eq!(parse_bytes("512mib").unwrap(), 512 << 20);
        assert_eq!(parse_bytes("100MB").unwrap(), 100_000_000);
        assert_eq!(parse_bytes("4096").unwrap(), 4096);
        assert!(parse_bytes("0").is_err());
        assert!(parse_bytes("1XB").is_err());
    }
}
