//! Smoke test of `mxc-vm bench boot`: the VMM-setup mode (no guest code runs, so it is
//! fast even under kvm_pvm) on /dev/kvm with the built guest image. It checks the shape
//! of the JSON, never the timings (performance is shown by the benchmark itself).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use tests::{code, mxc_vm, stderr, stdout, TempDir};

#[test]
fn until_first_entry_reports_the_vmm_setup_stages_as_json() {
    let dir = TempDir::new("bench-boot");
    let svg = dir.s("boot.svg");

    let out = mxc_vm(&[
        "bench",
        "boot",
        "--until",
        "first-entry",
        "--runs",
        "3",
        "--json",
        "--svg",
        &svg,
    ]);

    assert_eq!(
        code(&out),
        0,
        "stdout: {}\nstderr: {} (is /dev/kvm usable and the guest image built?)",
        stdout(&out),
        stderr(&out)
    );
    let report: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(report["benchmark"], "boot");
    assert_eq!(report["until"], "first-entry");
    let series = report["series"].as_array().unwrap();
    assert_eq!(series.len(), 1);
    assert_eq!(
        stage_names(&series[0]),
        [
            "setup_start",
            "vm_created",
            "kernel_loaded",
            "first_vcpu_entry",
            "vm_gone",
            "process_exit"
        ]
    );
    let entry = &series[0]["stages"][3];
    assert_eq!(entry["cumulative"]["runs"], 3);
    assert!(entry["cumulative"]["p50_ms"].as_f64().unwrap() > 0.0);
    let runs = series[0]["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 3);
    assert!(runs
        .iter()
        .all(|r| r["exit_reason"] == "killed" && r["peak_rss_kib"].as_u64().unwrap() > 0));
    assert!(report["goals"][0]["p50_ms"].as_f64().is_some());
    let picture = std::fs::read_to_string(&svg).unwrap();
    assert!(picture.starts_with("<svg") && picture.contains("first_vcpu_entry"));
}

#[test]
fn zero_runs_is_refused() {
    let out = mxc_vm(&["bench", "boot", "--runs", "0"]);

    assert_eq!(code(&out), 125);
    assert!(stderr(&out).contains("--runs must be at least 1"));
}

#[test]
fn snapshot_until_first_entry_times_the_restore_alone() {
    // The ready snapshot is made first when missing (a boot to Ready, not measured).
    let out = mxc_vm(&[
        "bench",
        "boot",
        "--snapshot",
        "--until",
        "first-entry",
        "--runs",
        "2",
        "--json",
    ]);

    assert_eq!(
        code(&out),
        0,
        "stdout: {}\nstderr: {}",
        stdout(&out),
        stderr(&out)
    );
    let report: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    let series = report["series"].as_array().unwrap();
    assert_eq!(series.len(), 2, "{report}");
    let restored = &series[1];
    assert_eq!(
        stage_names(restored),
        [
            "setup_start",
            "vm_created",
            "first_vcpu_entry",
            "vm_gone",
            "process_exit"
        ],
        "{restored}"
    );
    let runs = restored["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 2);
    assert!(
        runs.iter().all(|r| r["exit_reason"] == "killed"),
        "{restored}"
    );
    let goal = report["goals"]
        .as_array()
        .unwrap()
        .iter()
        .find(|g| g["goal"].as_str().unwrap().starts_with("restore_setup"))
        .unwrap();
    assert!(goal["p50_ms"].as_f64().unwrap() > 0.0, "{goal}");
}

#[test]
fn snapshot_until_ready_is_refused() {
    let out = mxc_vm(&["bench", "boot", "--snapshot", "--until", "ready"]);

    assert_eq!(code(&out), 125);
    assert!(
        stderr(&out).contains("not --until ready"),
        "{}",
        stderr(&out)
    );
}

/// The stage names of one series of a `bench boot --json` report, in order.
fn stage_names(series: &serde_json::Value) -> Vec<&str> {
    series["stages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["stage"].as_str().unwrap())
        .collect()
}
