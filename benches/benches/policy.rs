//! In-process costs on every `mxc-vm run`: policy parsing, seccomp compilation, the view.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use criterion::{criterion_group, criterion_main, Criterion};

const NATIVE: &str = r#"{
  "version": "1",
  "process": { "argv": ["python3", "main.py"], "env": ["LANG=C.UTF-8"], "timeout": "30s" },
  "filesystem": { "readwrite": ["/tmp"], "readonly": ["/usr/share"], "denied": ["/tmp/x"] },
  "network": { "egress": { "default": "deny", "allow": ["pypi.org", "*.pythonhosted.org:443"] } },
  "limits": { "memoryMiB": 512, "pids": 256 }
}"#;

fn bench(c: &mut Criterion) {
    c.bench_function("policy parse (native)", |b| {
        b.iter(|| policy::parse_with_base(NATIVE, "p.json", "/".as_ref()).unwrap())
    });
    let p = policy::parse_with_base(NATIVE, "p.json", "/".as_ref()).unwrap();
    c.bench_function("policy resolve_fs", |b| {
        b.iter(|| policy::resolve_fs(&p.filesystem, "/".as_ref()).unwrap())
    });
    c.bench_function("seccomp filters compile", |b| {
        b.iter(|| sandbox::seccomp::filters().unwrap())
    });
    let view = policy::resolve_fs(&p.filesystem, "/".as_ref()).unwrap();
    c.bench_function("sandbox view build", |b| {
        b.iter(|| {
            sandbox::view::SandboxView::build(&view, sandbox::view::NetMode::LoopbackOnly, None)
        })
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
