//! Why a boot failed, told so a user can act on it: what went wrong, the last boot stage
//! the guest reached (from the VMM's timeline), the last error seen while connecting to
//! the agent, and the last lines of the guest's console (all of it with `verbose`).
//!
//! The console is the VMM's capped log of the guest's serial port, kept in the VM's
//! runtime directory. The guest writes it, so every line is treated as untrusted text:
//! control characters are replaced and each line is cut to a bounded length.

use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

/// Console lines shown in the one-line message.
const TAIL_LINES: usize = 6;
/// Longest console line shown (in characters).
const MAX_LINE_CHARS: usize = 200;
/// Most console bytes read for the tail.
const TAIL_BYTES: u64 = 16 << 10;
/// Most console bytes read with `verbose`.
const VERBOSE_BYTES: u64 = 1 << 20;

/// What the host knows when a boot fails.
#[derive(Debug)]
pub(crate) struct BootFailure<'a> {
    /// What went wrong, e.g. "the VM ended before the agent answered (guest reset)".
    pub what: String,
    /// The VMM's report, when it wrote one.
    pub report: Option<&'a vmm::VmExitReport>,
    /// The last error seen while connecting to the agent, if any try was made.
    pub last_error: Option<&'a str>,
    /// The guest console log.
    pub console: Option<&'a Path>,
    /// Include the whole console (on following lines) instead of its tail.
    pub verbose: bool,
}

impl BootFailure<'_> {
    /// The message: one line, or with `verbose` one line plus the whole console.
    pub fn message(&self) -> String {
        let mut text = self.what.clone();
        text.push_str("; ");
        text.push_str(&stage_reached(self.report));
        if let Some(e) = self.last_error.filter(|e| !e.is_empty()) {
            text.push_str("; last try to reach the agent: ");
            text.push_str(&clean(e));
        }
        let Some(console) = self.console else {
            return text;
        };
        if self.verbose {
            let lines = read_lines(console, VERBOSE_BYTES);
            text.push_str("; guest console:\n");
            text.push_str(&lines.join("\n"));
            return text;
        }
        let tail = summary(&read_lines(console, TAIL_BYTES));
        if tail.is_empty() {
            text.push_str("; the guest console is empty");
        } else {
            text.push_str("; guest console (last lines, --verbose for all): ");
            text.push_str(&tail.join(" | "));
        }
        text
    }
}

/// "boot reached <stage> at <ms> ms", from the VMM's timeline.
fn stage_reached(report: Option<&vmm::VmExitReport>) -> String {
    let Some(report) = report else {
        return "the VMM wrote no report of its boot stages".into();
    };
    let last = report
        .boot_timeline
        .iter()
        .filter(|(stage, _)| *stage != vmm::Stage::VmGone)
        .max_by_key(|(_, ns)| *ns);
    match last {
        Some((stage, ns)) => format!(
            "boot reached {} ({}) {} ms after the VMM started",
            stage_name(*stage),
            stage_meaning(*stage),
            ns / 1_000_000
        ),
        None => "the VM never started".into(),
    }
}

fn stage_name(stage: vmm::Stage) -> String {
    serde_json::to_value(stage)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_else(|| format!("{stage:?}"))
}

fn stage_meaning(stage: vmm::Stage) -> &'static str {
    use vmm::Stage;
    match stage {
        Stage::ProcessStart | Stage::SetupStart => "the VMM was setting up",
        Stage::VmCreated | Stage::KernelLoaded => "the VM existed, no guest code ran",
        Stage::FirstVcpuEntry => "the first guest instruction ran",
        Stage::FirstGuestExit => "the guest kernel was running, the agent never started",
        Stage::AgentStarted => "the agent started but never became ready",
        Stage::AgentReady => "the agent was listening",
        Stage::Other(_) => "a guest boot-timer mark",
        Stage::SnapshotLoaded => "the VM was restored from a snapshot, no guest code ran",
        Stage::SnapshotSaved => "the VM was saved",
        Stage::VmGone => "the VM was gone",
    }
}

/// Console lines that explain a failure wherever they are in the log.
const NOTABLE: &[&str] = &[
    "Kernel panic",
    "APIC timer disabled",
    "BUG:",
    "Oops",
    "Unable to",
    "guest-agent:",
];
/// Most notable lines shown before the tail.
const NOTABLE_LINES: usize = 3;

/// What the one-line message shows of the console: the last lines that name a known
/// failure (a panic, the timer, the agent's own words), then the last lines, without
/// kernel stack-trace frames.
fn summary(lines: &[String]) -> Vec<String> {
    let frame = |l: &str| {
        let t = l.trim_start();
        t.starts_with("? ") || t.starts_with("<TASK>") || t.starts_with("</TASK>")
    };
    let plain: Vec<&String> = lines.iter().filter(|l| !frame(l)).collect();
    let tail = &plain[plain.len().saturating_sub(TAIL_LINES)..];
    let notable: Vec<&String> = plain
        .iter()
        .filter(|l| NOTABLE.iter().any(|n| l.contains(n)) && !tail.contains(l))
        .copied()
        .collect();
    let notable = &notable[notable.len().saturating_sub(NOTABLE_LINES)..];
    notable.iter().chain(tail).map(|l| (*l).clone()).collect()
}

/// The console's last `max` bytes as cleaned lines (the first, partial, line dropped
/// when the read starts mid-file).
fn read_lines(path: &Path, max: u64) -> Vec<String> {
    let Ok(mut file) = std::fs::File::open(path) else {
        return Vec::new();
    };
    let len = file.metadata().map_or(0, |m| m.len());
    let start = len.saturating_sub(max);
    if file.seek(SeekFrom::Start(start)).is_err() {
        return Vec::new();
    }
    let mut bytes = Vec::new();
    if file.take(max).read_to_end(&mut bytes).is_err() {
        return Vec::new();
    }
    let text = String::from_utf8_lossy(&bytes);
    let mut lines: Vec<&str> = text.lines().collect();
    if start > 0 && !lines.is_empty() {
        lines.remove(0);
    }
    lines
        .into_iter()
        .map(clean)
        .filter(|l| !l.trim().is_empty())
        .collect()
}

/// A guest-written line made safe to print: no control characters, bounded length.
fn clean(line: &str) -> String {
    let mut out: String = line
        .trim_end()
        .chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .take(MAX_LINE_CHARS)
        .collect();
    if line.trim_end().chars().count() > MAX_LINE_CHARS {
        out.push('…');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(stages: &[(vmm::Stage, u64)]) -> vmm::VmExitReport {
        vmm::VmExitReport {
            reason: vmm::ExitReason::GuestReset,
            boot_timeline: stages.to_vec(),
            process_start_monotonic_ns: 0,
            vcpu_exits: 0,
            boot_timer_dropped: 0,
            cmdline: String::new(),
        }
    }

    fn console(lines: &str) -> (std::path::PathBuf, impl Drop) {
        struct Gone(std::path::PathBuf);
        impl Drop for Gone {
            fn drop(&mut self) {
                let _ = std::fs::remove_file(&self.0);
            }
        }
        let path = std::env::temp_dir().join(format!(
            "mxc-boot-failure-{}-{:?}.log",
            std::process::id(),
            std::thread::current().id()
        ));
        std::fs::write(&path, lines).unwrap();
        (path.clone(), Gone(path))
    }

    #[test]
    fn names_the_last_stage_and_the_console_tail_on_one_line() {
        let (path, _gone) = console(
            "line 1\nline 2\nline 3\nline 4\nline 5\nAPIC timer disabled due to \
             verification failure\nguest-agent: ready on vsock:1024\n",
        );
        let r = report(&[
            (vmm::Stage::FirstVcpuEntry, 3_000_000),
            (vmm::Stage::AgentReady, 2_100_000_000),
            (vmm::Stage::VmGone, 2_200_000_000),
        ]);

        let text = BootFailure {
            what: "no Ready frame from the guest agent within 60s".into(),
            report: Some(&r),
            last_error: Some("handshake timed out"),
            console: Some(&path),
            verbose: false,
        }
        .message();

        assert!(!text.contains('\n'), "{text}");
        assert!(text.starts_with("no Ready frame"), "{text}");
        assert!(text.contains("boot reached agent_ready"), "{text}");
        assert!(text.contains("2100 ms"), "{text}");
        assert!(text.contains("handshake timed out"), "{text}");
        assert!(text.contains("APIC timer disabled"), "{text}");
        assert!(!text.contains("line 1"), "only the tail: {text}");
    }

    /// The message of a failure that has only a console log.
    fn console_only(path: &Path, verbose: bool) -> String {
        BootFailure {
            what: "x".into(),
            report: None,
            last_error: None,
            console: Some(path),
            verbose,
        }
        .message()
    }

    #[test]
    fn a_panic_line_above_its_stack_trace_is_shown() {
        let mut log = String::from("Kernel panic - not syncing: No working init found\n");
        for i in 0..20 {
            log.push_str(&format!(" ? 0xffffffff812d47{i:02x}\n"));
        }
        log.push_str(" </TASK>\nKernel Offset: disabled\n");
        let (path, _gone) = console(&log);

        let text = console_only(&path, false);

        assert!(
            text.contains("Kernel panic - not syncing: No working init found | Kernel Offset"),
            "{text}"
        );
        assert!(!text.contains("0xffffffff"), "{text}");
    }

    #[test]
    fn verbose_gives_the_whole_console() {
        let (path, _gone) = console("first\nsecond\n");

        let text = console_only(&path, true);

        assert!(text.ends_with("guest console:\nfirst\nsecond"), "{text}");
        assert!(text.contains("no report"), "{text}");
    }

    #[test]
    fn guest_text_cannot_inject_control_characters_or_flood() {
        let long = "A".repeat(10_000);
        let (path, _gone) = console(&format!("\x1b[2Jevil\r\n{long}\n"));

        let text = console_only(&path, false);

        assert!(!text.contains('\x1b'), "{text}");
        assert!(text.len() < 1_000, "{}", text.len());
    }
}
