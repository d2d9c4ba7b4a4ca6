//! Waiting for a VMM process (ours or QEMU) with a deadline, noting the moment it
//! exited and its peak RSS.

use std::path::Path;
use std::process::Child;
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// A child that has exited and been reaped.
#[derive(Debug, Clone, Copy)]
pub struct Reaped {
    /// When `waitid` saw it exit (before reaping).
    pub exited_at: Instant,
    /// Exit code, or `None` when a signal ended it.
    pub code: Option<i32>,
    /// Whether our deadline killed it.
    pub timed_out: bool,
    /// Peak resident set size (`ru_maxrss`), KiB.
    pub max_rss_kib: u64,
}

/// Wait for `child` to exit, killing it after `timeout`. The exit is observed with
/// `waitid(WNOWAIT)` first, so the pid stays ours (a zombie) until the deadline thread
/// knows it must not kill anymore; `wait4` then reaps it and reads its rusage.
pub fn wait_with_deadline(child: Child, timeout: Duration) -> std::io::Result<Reaped> {
    let pid = child.id();
    let pid_t =
        libc::pid_t::try_from(pid).map_err(|_| std::io::Error::other("pid out of range"))?;
    let (done_tx, done_rx) = mpsc::channel::<()>();
    let killer = std::thread::spawn(move || {
        if let Err(mpsc::RecvTimeoutError::Timeout) = done_rx.recv_timeout(timeout) {
            // SAFETY: kill() has no memory effects; the pid is our unreaped child.
            unsafe { libc::kill(pid_t, libc::SIGKILL) };
            return true;
        }
        false
    });
    loop {
        // SAFETY: an all-zero siginfo_t is a valid value for waitid to overwrite.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: `info` is a live siginfo_t; WNOWAIT leaves the child unreaped.
        let rc =
            unsafe { libc::waitid(libc::P_PID, pid, &mut info, libc::WEXITED | libc::WNOWAIT) };
        if rc == 0 {
            break;
        }
        let err = std::io::Error::last_os_error();
        if err.kind() != std::io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
    let exited_at = Instant::now();
    drop(done_tx);
    let timed_out = killer.join().unwrap_or(false);
    let mut status = 0;
    // SAFETY: an all-zero rusage is a valid value for wait4 to overwrite.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `status` and `usage` are live; the child has exited, so this does not block.
    let rc = unsafe { libc::wait4(pid_t, &mut status, 0, &mut usage) };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // `child` is reaped now; dropping it neither waits nor kills.
    drop(child);
    Ok(Reaped {
        exited_at,
        code: libc::WIFEXITED(status).then(|| libc::WEXITSTATUS(status)),
        timed_out,
        max_rss_kib: u64::try_from(usage.ru_maxrss).unwrap_or(0),
    })
}

/// `VmHWM` (peak RSS, KiB) of a running process, from `/proc/<pid>/status`.
pub fn vm_hwm_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    parse_vm_hwm(&status)
}

fn parse_vm_hwm(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// The last `n` lines of a log file, joined with " | " (empty if unreadable).
pub fn log_tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    lines
        .iter()
        .skip(lines.len().saturating_sub(n))
        .copied()
        .collect::<Vec<_>>()
        .join(" | ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vm_hwm_is_read_in_kib() {
        let status = "Name:\tmxc-vm\nVmPeak:\t  99 kB\nVmHWM:\t   12345 kB\nVmRSS:\t 1 kB\n";

        assert_eq!(parse_vm_hwm(status), Some(12_345));
        assert_eq!(parse_vm_hwm("Name: x\n"), None);
    }

    #[test]
    fn a_quick_child_is_reaped_with_its_code() {
        let child = std::process::Command::new("sh")
            .args(["-c", "exit 3"])
            .spawn()
            .unwrap();

        let reaped = wait_with_deadline(child, Duration::from_secs(30)).unwrap();

        assert_eq!((reaped.code, reaped.timed_out), (Some(3), false));
        assert!(reaped.max_rss_kib > 0);
    }

    #[test]
    fn a_slow_child_is_killed_at_the_deadline() {
        let child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();

        let reaped = wait_with_deadline(child, Duration::from_millis(50)).unwrap();

        assert_eq!((reaped.code, reaped.timed_out), (None, true));
    }

    #[test]
    fn the_log_tail_keeps_the_last_lines() {
        let path = std::env::temp_dir().join(format!("mxc-bench-tail-{}", std::process::id()));
        std::fs::write(&path, "a\nb\n\nc\nd\n").unwrap();

        let tail = log_tail(&path, 2);
        let _ = std::fs::remove_file(&path);

        assert_eq!(tail, "c | d");
    }
}
