//! The audit log: one JSON line per proxy decision (time, sandbox id, host, port,
//! resolved address, the rule that decided, allow/deny, bytes up/down), appended to a
//! file. An allowed connection's line is written when it closes, so it carries the byte
//! counts; a refused one's at once. The log is bounded ([`MAX_AUDIT_BYTES`]): a sandbox
//! that opens connections in a loop cannot fill the disk.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;

/// Most bytes one sandbox writes to its audit log; one last line says when it stopped.
pub const MAX_AUDIT_BYTES: u64 = 256 << 20;

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("cannot open the audit log {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// One decision.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct AuditRecord {
    /// When the decision was made, RFC 3339 UTC with milliseconds.
    pub time: String,
    pub sandbox: String,
    /// `connect` (a CONNECT tunnel), `http` (a forwarded plain-HTTP request), or
    /// `unknown` when the request could not be read.
    pub kind: String,
    /// The requested host (name or address), empty when unknown.
    pub host: String,
    pub port: u16,
    /// The address connected to (`ip:port`), or the upstream proxy it went through.
    pub resolved: Option<String>,
    /// The rule that decided: `network.egress.allow[0] pypi.org`, `default deny`,
    /// `private-address 10.0.0.5`, `sni-mismatch evil.test`, `limits.maxConnections`...
    pub rule: String,
    /// The IP rule that opted a special address in, when one did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub address_rule: Option<String>,
    /// `allow` or `deny`.
    pub action: String,
    /// The HTTP status the proxy answered with (200 for an established tunnel; for a
    /// forwarded request, 0: the origin's status is not inspected).
    pub status: u16,
    /// Why a connection was refused or failed, in words.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub bytes_up: u64,
    pub bytes_down: u64,
    pub duration_ms: u64,
}

/// An append-only audit log file shared by every connection of a sandbox.
#[derive(Debug)]
pub struct AuditLog {
    path: PathBuf,
    file: Mutex<File>,
    written: AtomicU64,
    stopped: AtomicBool,
}

impl AuditLog {
    /// Opens (creating it with mode 0600 if needed) `path` for appending.
    pub fn open(path: &Path) -> Result<Self, AuditError> {
        use std::os::unix::fs::OpenOptionsExt;
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(path)
            .map_err(|source| AuditError::Open {
                path: path.to_path_buf(),
                source,
            })?;
        Ok(Self {
            path: path.to_path_buf(),
            file: Mutex::new(file),
            written: AtomicU64::new(0),
            stopped: AtomicBool::new(false),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends one line. Errors are not fatal to the connection: a full disk must not
    /// turn into an open network; they are reported once on stderr.
    pub(crate) fn write(&self, record: &AuditRecord) {
        if self.stopped.load(Ordering::Relaxed) {
            return;
        }
        let Ok(mut line) = serde_json::to_vec(record) else {
            return;
        };
        line.push(b'\n');
        let Ok(mut file) = self.file.lock() else {
            return;
        };
        let so_far = self.written.load(Ordering::Relaxed);
        if so_far + line.len() as u64 > MAX_AUDIT_BYTES {
            self.stopped.store(true, Ordering::Relaxed);
            let last = serde_json::json!({
                "time": now_rfc3339(),
                "sandbox": record.sandbox,
                "kind": "audit",
                "action": "truncated",
                "reason": format!("audit log limit of {MAX_AUDIT_BYTES} bytes reached; \
                                   later decisions are not logged"),
            });
            let _ = writeln!(file, "{last}");
            return;
        }
        if let Err(e) = file.write_all(&line) {
            self.stopped.store(true, Ordering::Relaxed);
            let _ = writeln!(
                std::io::stderr(),
                "mxc-vm: warning: writing the audit log {} failed ({e}); later decisions \
                 are not logged",
                self.path.display()
            );
            return;
        }
        self.written.fetch_add(line.len() as u64, Ordering::Relaxed);
    }
}

/// The current time as RFC 3339 UTC with milliseconds (`2026-05-09T12:34:56.789Z`).
pub fn now_rfc3339() -> String {
    rfc3339(SystemTime::now())
}

/// `t` as RFC 3339 UTC with milliseconds.
pub fn rfc3339(t: SystemTime) -> String {
    let since = t.duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO);
    let secs = since.as_secs();
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60,
        since.subsec_millis()
    )
}

/// Days since 1970-01-01 to a (year, month, day) date in the proleptic Gregorian
/// calendar (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_rfc3339_utc() {
        let cases = [
            (0u64, 0u32, "1970-01-01T00:00:00.000Z"),
            (951_782_400, 5, "2000-02-29T00:00:00.005Z"),
            (1_778_329_245, 123, "2026-05-09T12:20:45.123Z"),
            (4_102_444_799, 999, "2099-12-31T23:59:59.999Z"),
        ];

        for (secs, millis, want) in cases {
            let t = UNIX_EPOCH + Duration::from_secs(secs) + Duration::from_millis(millis.into());
            assert_eq!(rfc3339(t), want);
        }
    }

    #[test]
    fn records_are_appended_one_per_line() {
        let path = std::env::temp_dir().join(format!("mxc-audit-unit-{}", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let log = AuditLog::open(&path).unwrap();
        let rec = AuditRecord {
            host: "allowed.test".into(),
            action: "allow".into(),
            ..AuditRecord::default()
        };

        log.write(&rec);
        log.write(&rec);
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::remove_file(&path).unwrap();

        let lines: Vec<AuditRecord> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines, vec![rec.clone(), rec]);
    }
}
