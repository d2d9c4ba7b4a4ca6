//! `mxc-vm backends`.

use std::io::Write;

use crate::cli::BackendsArgs;
use crate::failure::Failure;

pub fn run(args: BackendsArgs) -> Result<i32, Failure> {
    let report = sandbox::host::probe();
    let auto = sandbox::select_backend(policy::Containment::Auto);
    let mut out = std::io::stdout().lock();
    if args.json {
        let value = serde_json::json!({
            "backends": report.all(),
            "auto": auto.as_str(),
        });
        let _ = writeln!(
            out,
            "{}",
            serde_json::to_string_pretty(&value).unwrap_or_default()
        );
        return Ok(0);
    }
    for b in report.all() {
        let state = if b.available {
            "available"
        } else {
            "unavailable"
        };
        let _ = writeln!(out, "{:<11} {state}", b.name);
        if let Some(reason) = &b.reason {
            let _ = writeln!(out, "            why: {reason}");
        }
        for d in &b.details {
            let _ = writeln!(out, "            {d}");
        }
    }
    let _ = writeln!(out, "auto        -> {}", auto.as_str());
    Ok(0)
}
