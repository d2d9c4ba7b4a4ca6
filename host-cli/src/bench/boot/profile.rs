//! `mxc-vm bench boot --profile`: where a cold boot's time goes inside the guest kernel.
//!
//! The profiled boot runs with `initcall_debug` and the kernel log on the serial console
//! (kept in a file); this module reads that log back: the slowest initcalls, the time
//! spent between the kernel's start and /init, and the largest silent gaps. Console
//! output costs VM exits (every byte under kvm_pvm), so a profiled boot is slower than a
//! plain one: read the shares, not the absolute times.

/// Kernel arguments of a profiled boot (after the usual ones, so they win over `quiet`).
pub const PROFILE_CMDLINE: &str =
    "console=ttyS0 8250.nr_uarts=1 ignore_loglevel printk.time=1 initcall_debug";

/// One line of the kernel log: its timestamp (seconds) and text.
fn parse_line(line: &str) -> Option<(f64, &str)> {
    let rest = line.trim_start().strip_prefix('[')?;
    let (stamp, text) = rest.split_once(']')?;
    Some((stamp.trim().parse().ok()?, text.trim()))
}

/// `initcall NAME+0x…/0x… returned R after N usecs` → (NAME, N µs).
fn parse_initcall(text: &str) -> Option<(String, u64)> {
    let rest = text.strip_prefix("initcall ")?;
    let (name, rest) = rest.split_once(' ')?;
    let usecs = rest
        .split_once(" after ")?
        .1
        .strip_suffix(" usecs")?
        .trim()
        .parse()
        .ok()?;
    let name = name.split('+').next().unwrap_or(name).to_string();
    Some((name, usecs))
}

/// What a profiled boot's kernel log says.
#[derive(Debug, Default, serde::Serialize)]
pub struct Profile {
    /// Kernel time when /init was started (s).
    pub init_started_s: Option<f64>,
    /// Sum of all initcalls (s).
    pub initcalls_s: f64,
    /// The slowest initcalls, slowest first: (name, ms).
    pub slowest: Vec<(String, f64)>,
    /// The largest gaps between consecutive log lines: (ms, the line after the gap).
    pub gaps: Vec<(f64, String)>,
}

/// Read a kernel log; keep the `top` slowest initcalls and gaps.
pub fn analyse(log: &str, top: usize) -> Profile {
    let mut calls: Vec<(String, u64)> = Vec::new();
    let mut gaps: Vec<(f64, String)> = Vec::new();
    let mut init_started_s = None;
    let mut before: Option<f64> = None;
    for (at, text) in log.lines().filter_map(parse_line) {
        if let Some(call) = parse_initcall(text) {
            calls.push(call);
        }
        if init_started_s.is_none() && text.starts_with("Run /init") {
            init_started_s = Some(at);
        }
        if let Some(b) = before {
            gaps.push(((at - b) * 1000.0, text.chars().take(100).collect()));
        }
        before = Some(at);
    }
    let initcalls_s = calls.iter().map(|(_, us)| *us as f64).sum::<f64>() / 1e6;
    calls.sort_by_key(|c| std::cmp::Reverse(c.1));
    gaps.sort_by(|a, b| b.0.total_cmp(&a.0));
    Profile {
        init_started_s,
        initcalls_s,
        slowest: calls
            .into_iter()
            .take(top)
            .map(|(n, us)| (n, us as f64 / 1000.0))
            .collect(),
        gaps: gaps.into_iter().take(top).collect(),
    }
}

/// Name the initcalls of a kernel built without kallsyms (the log shows addresses)
/// from the symbol table of its vmlinux, read with `nm` where binutils is installed;
/// without it the addresses stay.
pub fn name_addresses(p: &mut Profile, vmlinux: &std::path::Path) {
    if !p.slowest.iter().any(|(n, _)| n.starts_with("0x")) {
        return;
    }
    let Ok(out) = std::process::Command::new("nm").arg(vmlinux).output() else {
        return;
    };
    let text = String::from_utf8_lossy(&out.stdout);
    let symbols: std::collections::HashMap<u64, &str> = text
        .lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            let addr = u64::from_str_radix(w.next()?, 16).ok()?;
            let _kind = w.next()?;
            Some((addr, w.next()?))
        })
        .collect();
    for (name, _) in &mut p.slowest {
        let addr = name
            .strip_prefix("0x")
            .and_then(|h| u64::from_str_radix(h, 16).ok());
        if let Some(sym) = addr.and_then(|a| symbols.get(&a)) {
            *name = (*sym).to_string();
        }
    }
    for (_, line) in &mut p.gaps {
        let Some(addr) = line
            .strip_prefix("initcall 0x")
            .and_then(|r| r.split_whitespace().next())
            .and_then(|h| u64::from_str_radix(h, 16).ok())
        else {
            continue;
        };
        if let Some(sym) = symbols.get(&addr) {
            *line = line.replacen(&format!("0x{addr:x}"), sym, 1);
        }
    }
}

/// The profile as text.
pub fn render(p: &Profile) -> String {
    let mut out = String::from("\nProfiled boot (initcall_debug, kernel log on the console):\n");
    if let Some(s) = p.init_started_s {
        out.push_str(&format!(
            "  kernel start to /init: {s:.2} s (kernel clock)\n"
        ));
    }
    out.push_str(&format!(
        "  all initcalls together: {:.2} s\n",
        p.initcalls_s
    ));
    out.push_str("  slowest initcalls:\n");
    for (name, ms) in &p.slowest {
        out.push_str(&format!("    {ms:>10.1} ms  {name}\n"));
    }
    out.push_str("  largest gaps between kernel log lines (the line after the gap):\n");
    for (ms, line) in &p.gaps {
        out.push_str(&format!("    {ms:>10.1} ms  {line}\n"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOG: &str = "\
[    0.000000] Linux version 6.12
[    0.500000] calling  pci_init+0x0/0x40 @ 1
[    0.900000] initcall pci_init+0x0/0x40 returned 0 after 400000 usecs
[    1.000000] initcall acpi_init+0x0/0x50 returned -19 after 20 usecs
[    4.000000] Trying to unpack rootfs image as initramfs...
[    4.100000] initcall populate_rootfs+0x0/0x30 returned 0 after 3100000 usecs
[    4.200000] Run /init as init process
garbage line
";

    #[test]
    fn reads_initcalls_init_and_gaps() {
        let p = analyse(LOG, 2);

        assert_eq!(p.init_started_s, Some(4.2));
        assert_eq!(
            p.slowest,
            vec![
                ("populate_rootfs".to_string(), 3100.0),
                ("pci_init".to_string(), 400.0)
            ]
        );
        assert!((p.initcalls_s - 3.50002).abs() < 1e-9);
        assert_eq!(p.gaps.len(), 2);
        assert!((p.gaps[0].0 - 3000.0).abs() < 1e-6);
        assert!(p.gaps[0].1.starts_with("Trying to unpack"));
        assert!(render(&p).contains("populate_rootfs"));
    }

    #[test]
    fn lines_without_a_timestamp_are_ignored() {
        assert_eq!(parse_line("no stamp"), None);
        assert_eq!(parse_line("[ x ] bad"), None);
        assert_eq!(
            parse_initcall("initcall foo returned 0 after x usecs"),
            None
        );
    }
}
