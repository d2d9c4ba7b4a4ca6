//! The escape suite: attacks on the process tiers (`process`, `bubblewrap`), each run in
//! its own sandbox through the real `mxc-vm` binary, as an attacker's code would run.
//!
//! Every attack is a Python program. It first prints `MARKER-RAN` (proof that the sandbox
//! ran it), then tries its escape and prints `ESCAPED: ...` when the escape worked or
//! `CONTAINED: ...` when it did not. A case passes when the marker is there, no line says
//! ESCAPED, at least one says CONTAINED (unless the sandbox is expected to kill the
//! program), and its host-side check (nothing left behind, host unchanged) holds.
//! SECURITY.md lists the attacks, the tiers they run on and what stops each.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use tests::escape::{attacks, judge, shown, Ctx};
use tests::stderr;

fn run_suite(backend: &str) {
    // One tier at a time: the host-side checks look for the attacks' processes by name.
    static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let ctx = Ctx::new(backend);
    let attacks = attacks();
    assert!(
        attacks.len() >= 40,
        "the suite has {} attacks",
        attacks.len()
    );
    let mut failures = Vec::new();
    for a in &attacks {
        let out = ctx.run(backend, a);
        let verdict = judge(&ctx, a, &out.stdout);
        eprintln!(
            "{backend}: {:<45} {} {}",
            a.name,
            if verdict.is_ok() {
                "contained"
            } else {
                "ESCAPED"
            },
            shown(&out.stdout)
        );
        if let Err(why) = verdict {
            let err = stderr(&out);
            failures.push(format!("{}: {why}\n    stderr: {}", a.name, err.trim()));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} attacks escaped on {backend}:\n{}",
        failures.len(),
        attacks.len(),
        failures.join("\n")
    );
}

#[test]
fn process_tier_contains_every_attack() {
    run_suite("process");
}

#[test]
fn bubblewrap_tier_contains_every_attack() {
    run_suite("bubblewrap");
}
