//! `mxc-vm run -- /bin/true` (process tier) against fork+exec of /bin/true, same run.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::process::{Command, Stdio};

use criterion::{criterion_group, criterion_main, Criterion};

fn mxc_vm() -> PathBuf {
    if let Some(p) = std::env::var_os("MXC_VM_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().and_then(|p| p.parent()).unwrap();
    dir.join("mxc-vm")
}

fn run(prog: &std::path::Path, args: &[&str]) {
    let ok = Command::new(prog)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap()
        .success();
    assert!(ok);
}

fn bench(c: &mut Criterion) {
    let bin = mxc_vm();
    if !bin.is_file() {
        eprintln!(
            "exec bench: {} not built; run `cargo build --release -p host-cli` first",
            bin.display()
        );
        return;
    }
    let mut g = c.benchmark_group("exec /bin/true");
    g.sample_size(50);
    g.bench_function("fork+exec", |b| b.iter(|| run("/bin/true".as_ref(), &[])));
    g.bench_function("mxc-vm run --backend process", |b| {
        b.iter(|| run(&bin, &["run", "--backend", "process", "--", "/bin/true"]))
    });
    g.bench_function("mxc-vm run --backend bubblewrap", |b| {
        b.iter(|| run(&bin, &["run", "--backend", "bubblewrap", "--", "/bin/true"]))
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
