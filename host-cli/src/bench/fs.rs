//! `mxc-vm bench fs`: file I/O in a microVM guest on a virtio-fs share against the same
//! operations on the host, in one run.
//!
//! The same Python script (the host's `python3`, which the guest runs from the shared
//! `/usr`) does sequential writes (1 MiB each, then `fsync`), sequential reads, and
//! create/stat/unlink of many empty files, once in a host directory and once in the
//! guest on a read-write share of a sibling directory. The guest drops its own page cache
//! before reading, so its reads cross the share (the host serves them from its page
//! cache); the host reads from its page cache (dropping it would disturb the machine).
//! Under the nested `kvm_pvm` hypervisor the guest kernel's work is emulated, so the
//! guest figures there say more about that hypervisor than about virtio-fs.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use policy::{Access, FsView, Origin, Policy, PolicySource, ViewEntry};
use sandbox::microvm::{MicrovmBackend, MicrovmOptions};
use sandbox::output::{Collect, StdinMode};
use sandbox::{Backend, ExecIo, ExecRequest, SandboxSpec};
use serde::Deserialize;

use super::stats::table;
use crate::cli::BenchFsArgs;
use crate::failure::Failure;

/// The measurement, identical on both sides. argv: DIR MIB FILES DROP_CACHES.
const SCRIPT: &str = r#"
import json, os, sys, time
d, mib, n, drop = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1"
chunk = os.urandom(1 << 20)
res = {}
path = os.path.join(d, "seq.bin")
t = time.perf_counter()
fd = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644)
for _ in range(mib):
    os.write(fd, chunk)
os.fsync(fd)
os.close(fd)
res["write_mib_s"] = mib / (time.perf_counter() - t)
if drop:
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3")
t = time.perf_counter()
fd = os.open(path, os.O_RDONLY)
while os.read(fd, 1 << 20):
    pass
os.close(fd)
res["read_mib_s"] = mib / (time.perf_counter() - t)
os.unlink(path)
names = [os.path.join(d, "m%06d" % i) for i in range(n)]
t = time.perf_counter()
for name in names:
    os.close(os.open(name, os.O_CREAT | os.O_WRONLY | os.O_EXCL, 0o644))
res["create_us"] = (time.perf_counter() - t) / n * 1e6
t = time.perf_counter()
for name in names:
    os.stat(name)
res["stat_us"] = (time.perf_counter() - t) / n * 1e6
t = time.perf_counter()
for name in names:
    os.unlink(name)
res["unlink_us"] = (time.perf_counter() - t) / n * 1e6
print(json.dumps(res))
"#;

/// One side's figures.
#[derive(Debug, Clone, Copy, Deserialize, serde::Serialize)]
struct Figures {
    write_mib_s: f64,
    read_mib_s: f64,
    create_us: f64,
    stat_us: f64,
    unlink_us: f64,
}

/// A directory removed on drop.
struct WorkDir(PathBuf);

impl Drop for WorkDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn parse(what: &str, out: &[u8]) -> Result<Figures, Failure> {
    let text = String::from_utf8_lossy(out);
    let line = text.lines().last().unwrap_or_default();
    serde_json::from_str(line)
        .map_err(|e| Failure::new(format!("{what}: unexpected output {line:?}: {e}")))
}

fn host_run(dir: &Path, args: &BenchFsArgs) -> Result<Figures, Failure> {
    let out = std::process::Command::new("python3")
        .arg("-c")
        .arg(SCRIPT)
        .arg(dir)
        .arg(args.mib.to_string())
        .arg(args.files.to_string())
        .arg("0")
        .output()
        .map_err(|e| Failure::new(format!("cannot run the host's python3: {e}")))?;
    if !out.status.success() {
        return Err(Failure::new(format!(
            "host run failed: {}",
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    parse("host run", &out.stdout)
}

fn guest_run(dir: &Path, args: &BenchFsArgs) -> Result<(Figures, Duration), Failure> {
    let view = FsView {
        entries: vec![ViewEntry {
            path: dir.to_path_buf(),
            access: Access::ReadWrite,
            exists: true,
            is_dir: true,
            origins: vec![Origin::Flag("bench".into())],
        }],
        warnings: vec![],
    };
    let spec = SandboxSpec {
        policy: Policy::empty(PolicySource::Cli),
        view,
        id: format!("bench-fs-{}", std::process::id()),
        net: Default::default(),
    };
    let boot_timeout = args
        .boot_timeout
        .as_deref()
        .map(|t| {
            policy::parse_duration(t)
                .map_err(|e| Failure::new(format!("--boot-timeout {t:?}: {e}")))
        })
        .transpose()?;
    let mut vm = MicrovmBackend::new(MicrovmOptions {
        boot_timeout,
        ..MicrovmOptions::default()
    });
    vm.provision(&spec)?;
    let start = Instant::now();
    let result = vm.start().and_then(|()| {
        let booted = start.elapsed();
        let req = ExecRequest {
            argv: [
                "python3",
                "-c",
                SCRIPT,
                &dir.display().to_string(),
                &args.mib.to_string(),
                &args.files.to_string(),
                "1",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect(),
            env: vec![],
            cwd: None,
            timeout: Some(Duration::from_secs(3600)),
        };
        let mut out = Collect::default();
        let outcome = {
            let mut io = ExecIo {
                stdin: StdinMode::Null,
                sink: Some(&mut out),
                output_limit: None,
                signals: None,
            };
            vm.exec(&req, &mut io)?
        };
        Ok((outcome, out, booted))
    });
    let _ = vm.stop();
    let _ = vm.deprovision();
    let (outcome, out, booted) = result?;
    if outcome.shell_code() != 0 {
        return Err(Failure::new(format!(
            "guest run failed ({}): {}",
            outcome.shell_code(),
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    Ok((parse("guest run", &out.stdout)?, booted))
}

pub fn run(args: BenchFsArgs) -> Result<i32, Failure> {
    let base = args.dir.clone().unwrap_or_else(std::env::temp_dir);
    // Not `mxc-vm-<id>`: that is the microVM runtime directory of sandbox `bench-fs-<pid>`.
    let work = WorkDir(base.join(format!("mxc-vm-fsbench-data-{}", std::process::id())));
    let (host_dir, guest_dir) = (work.0.join("host"), work.0.join("guest"));
    for d in [&host_dir, &guest_dir] {
        std::fs::create_dir_all(d)
            .map_err(|e| Failure::new(format!("cannot create {}: {e}", d.display())))?;
    }
    let guest_dir = std::fs::canonicalize(&guest_dir)
        .map_err(|e| Failure::new(format!("{}: {e}", guest_dir.display())))?;
    let mut progress = std::io::stderr().lock();
    let _ = writeln!(progress, "host: {} MiB, {} files", args.mib, args.files);
    let host = host_run(&host_dir, &args)?;
    let _ = writeln!(progress, "guest: booting a microVM (minutes under kvm_pvm)");
    let (guest, booted) = guest_run(&guest_dir, &args)?;
    let host_kind = sandbox::host::kvm_kind().unwrap_or_else(|e| e);
    let mut out = std::io::stdout().lock();
    if args.json {
        let value = serde_json::json!({
            "benchmark": "fs",
            "mib": args.mib,
            "files": args.files,
            "hypervisor": host_kind,
            "boot_s": booted.as_secs_f64(),
            "host": host,
            "guest": guest,
        });
        let _ = writeln!(
            out,
            "{}",
            serde_json::to_string_pretty(&value).unwrap_or_default()
        );
        return Ok(0);
    }
    let pct = |g: f64, h: f64| format!("{:.1} %", g / h * 100.0);
    let rows = vec![
        vec![
            format!("sequential write ({} MiB + fsync)", args.mib),
            format!("{:.1} MiB/s", host.write_mib_s),
            format!("{:.1} MiB/s", guest.write_mib_s),
            pct(guest.write_mib_s, host.write_mib_s),
        ],
        vec![
            format!("sequential read ({} MiB)", args.mib),
            format!("{:.1} MiB/s", host.read_mib_s),
            format!("{:.1} MiB/s", guest.read_mib_s),
            pct(guest.read_mib_s, host.read_mib_s),
        ],
        vec![
            format!("create ({} files)", args.files),
            format!("{:.1} µs", host.create_us),
            format!("{:.1} µs", guest.create_us),
            pct(host.create_us, guest.create_us),
        ],
        vec![
            "stat".into(),
            format!("{:.1} µs", host.stat_us),
            format!("{:.1} µs", guest.stat_us),
            pct(host.stat_us, guest.stat_us),
        ],
        vec![
            "unlink".into(),
            format!("{:.1} µs", host.unlink_us),
            format!("{:.1} µs", guest.unlink_us),
            pct(host.unlink_us, guest.unlink_us),
        ],
    ];
    let _ = write!(
        out,
        "{}",
        table(
            &["operation", "host", "guest (virtio-fs)", "guest/host"],
            &rows
        )
    );
    let _ = writeln!(
        out,
        "hypervisor: {host_kind}; guest booted in {:.0} s. Guest reads cross the share \
         (guest cache dropped), host reads come from its page cache.",
        booted.as_secs_f64()
    );
    Ok(0)
}
