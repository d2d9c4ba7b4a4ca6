#!/usr/bin/env python3
"""The nested hardware-KVM test lane's driver (called by tests/hwkvm/run.sh).

Builds the nested host's initramfs under target/hwkvm/ (busybox, the kernel modules
kvm_amd, 9p, virtio_pci, veth and their dependencies, /init from init.sh and a
generated /hwkvm.conf), boots Debian's kernel in QEMU's TCG with an emulated AMD SVM
CPU, streams its console, and judges the HWKVM- marker lines /init prints.

Exit status: 0 only when every test executable exited 0 and the nested host finished.
"""

import argparse
import ctypes
import gzip
import json
import lzma
import os
import queue
import re
import shlex
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

# Modules the nested host loads (dependencies are added from each module's .modinfo).
MODULES = [
    "kvm_amd",  # /dev/kvm on the emulated SVM (deps: kvm, irqbypass, ccp)
    "virtio_pci",  # the 9p device (virtio_pci_modern_dev, virtio, virtio_ring, ...)
    "9pnet_virtio",
    "9p",  # deps: 9pnet, netfs, fscache
    "veth",  # the network lab of the egress tests (tests/src/net.rs)
]

# Terminal control sequences (SeaBIOS and the kernel reset the terminal: ESC c).
ANSI = re.compile(r"\x1b(\[[0-9;?]*[A-Za-z]|[@-Z\\^_`a-z{|}~])")
# QEMU's notes about EPYC features TCG lacks: the log keeps them, the stream does not.
QUIET = re.compile(r"^qemu-system-x86_64: warning: TCG doesn't support requested feature")
# libtest's lines: one per test (its result on the same line unless --nocapture), and a
# summary per executable, which the counts come from.
# The nested host's own kernel stalled: QEMU's TCG emulation of the host (both of its
# CPUs stuck with interrupts pending, seen after many nested VMs), not a test's doing.
STALL = re.compile(r"soft lockup - CPU#|rcu_preempt self-detected stall|rcu: INFO: rcu_preempt detected stalls")
# Exit status for a stalled nested host: run.sh runs the lane once more.
EXIT_STALLED = 75
# A stall message alone is not a stall: on a loaded machine QEMU's TCG may not run the
# nested host's CPU for seconds, and its kernel warns, then goes on. The host counts as
# stalled only when its console also stays silent this long after such a message.
STALL_SILENCE = 180
# The nested host's CPU stopped: QEMU used no CPU time at all for this long while a test
# ran. A live nested host never idles that long (its init script wakes every second to
# time the test); seen as a lane hang, with QEMU's vCPU thread asleep in the host kernel
# and the nested kernel's console silent: the TCG left the emulated CPU halted with
# nothing to wake it (in nested guest mode), not a test's doing. Treated as a stall.
FROZEN_AFTER = 120
TEST_LINE = re.compile(r"^test (\S+) \.\.\. ?(ok|FAILED|ignored)?")
SUMMARY = re.compile(r"^test result: \w+\. (\d+) passed; (\d+) failed")


# Everything said, kept for target/hwkvm/summary.txt: scripts/test.sh prints it again at
# the very end of a failed run, where a CI log's tail shows it.
SAID = []
SUMMARY_PATH = None


def say(msg):
    SAID.append(f"hwkvm: {msg}")
    print(f"hwkvm: {msg}", flush=True)


# --- kernel modules -------------------------------------------------------------


def read_module(path):
    data = path.read_bytes()
    if path.name.endswith(".xz"):
        data = lzma.decompress(data)
    elif path.name.endswith(".gz"):
        data = gzip.decompress(data)
    elif path.name.endswith(".zst"):
        data = subprocess.run(["zstd", "-dc", str(path)], check=True, capture_output=True).stdout
    return data


def modinfo(data):
    """The key=value strings of an ELF64 module's .modinfo section."""
    if data[:4] != b"\x7fELF" or data[4] != 2:
        raise ValueError("not an ELF64 object")
    shoff = struct.unpack_from("<Q", data, 0x28)[0]
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)

    def section(i):
        base = shoff + i * shentsize
        name, = struct.unpack_from("<I", data, base)
        offset, size = struct.unpack_from("<QQ", data, base + 0x18)
        return name, offset, size

    _, stroff, _ = section(shstrndx)
    info = {}
    for i in range(shnum):
        name, offset, size = section(i)
        end = data.index(b"\0", stroff + name)
        if data[stroff + name : end] == b".modinfo":
            for entry in data[offset : offset + size].split(b"\0"):
                if b"=" in entry:
                    k, v = entry.decode(errors="replace").split("=", 1)
                    info.setdefault(k, v)
    return info


def norm(name):
    return name.replace("-", "_")


def resolve_modules(moddir, wanted):
    """[(name, bytes)] for `wanted` and their dependencies, dependencies first."""
    files = {}
    for p in (moddir / "kernel").rglob("*.ko*"):
        files[norm(p.name.split(".ko")[0])] = p
    builtin = set()
    bfile = moddir / "modules.builtin"
    if bfile.exists():
        for line in bfile.read_text().split():
            builtin.add(norm(Path(line).name.split(".ko")[0]))
    order, seen = [], set()

    def visit(name, chain):
        if name in seen:
            return
        seen.add(name)
        if name not in files:
            if name in builtin:
                return
            raise SystemExit(f"hwkvm: module {name} (needed by {' <- '.join(chain) or 'the lane'}) "
                             f"is neither in {moddir} nor built in")
        data = read_module(files[name])
        deps = [d for d in modinfo(data).get("depends", "").split(",") if d]
        for d in deps:
            visit(norm(d), [name] + chain)
        order.append((name, data))

    for w in wanted:
        visit(norm(w), [])
    return order


# --- initramfs (cpio newc) --------------------------------------------------------


class Cpio:
    def __init__(self):
        self.out = bytearray()
        self.ino = 1

    def _entry(self, name, mode, data=b"", rdev=(0, 0)):
        name_b = name.encode() + b"\0"
        hdr = "070701" + "".join(
            f"{v:08x}"
            for v in (self.ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(name_b), 0)
        )
        self.ino += 1
        self.out += hdr.encode() + name_b
        self.out += b"\0" * (-len(self.out) % 4)
        self.out += data
        self.out += b"\0" * (-len(self.out) % 4)

    def dir(self, name):
        self._entry(name, 0o040755)

    def file(self, name, data, mode=0o644):
        self._entry(name, 0o100000 | mode, data)

    def chardev(self, name, major, minor):
        self._entry(name, 0o020600, rdev=(major, minor))

    def finish(self):
        self._entry("TRAILER!!!", 0)
        self.out += b"\0" * (-len(self.out) % 512)
        return bytes(self.out)


def build_initramfs(out, moddir, busybox, init_sh, conf):
    c = Cpio()
    for d in ("bin", "dev", "proc", "sys", "mnt", "tmp", "lib", "lib/modules"):
        c.dir(d)
    c.chardev("dev/console", 5, 1)
    c.chardev("dev/ttyS0", 4, 64)
    c.chardev("dev/null", 1, 3)
    c.file("bin/busybox", busybox.read_bytes(), 0o755)
    c.file("init", init_sh.read_bytes(), 0o755)
    mods = resolve_modules(moddir, MODULES)
    for name, data in mods:
        c.file(f"lib/modules/{name}.ko", data)
    conf = f"HWKVM_MODULES={shlex.quote(' '.join(n for n, _ in mods))}\n" + conf
    c.file("hwkvm.conf", conf.encode())
    tmp = out.with_suffix(".tmp")
    tmp.write_bytes(c.finish())
    tmp.replace(out)
    return [n for n, _ in mods]


def link_or_copy(src, dst):
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def snapshot(out, repo, bins):
    """Hard links (else copies) of the test executables, target/debug/mxc-vm and the
    mxc-vmm beside it (which the tests look for next to their deps/ directory) and the
    guest agent under
    out/bin/, so that a cargo build running meanwhile cannot change them under the
    nested host. Returns the new [(name, path)] and the agent's path (or None)."""
    root = out / "bin"
    shutil.rmtree(root, ignore_errors=True)
    (root / "deps").mkdir(parents=True)
    for exe in ("mxc-vm", "mxc-vmm"):
        link_or_copy(Path(repo) / "target/debug" / exe, root / exe)
    new = []
    for name, exe in bins:
        dst = root / "deps" / Path(exe).name
        link_or_copy(exe, dst)
        new.append((name, str(dst)))
    agent = os.environ.get("MXC_VM_GUEST_AGENT")
    if agent:
        link_or_copy(agent, root / "guest-agent")
        agent = str(root / "guest-agent")
    return new, agent


def snapshot_bench(out, binary):
    """The release mxc-vm the boot benchmark runs and the mxc-vmm beside it, frozen like
    the rest (in a directory of their own: mxc-vm starts the mxc-vmm beside it)."""
    if not binary:
        return None
    release = out / "bin" / "release"
    release.mkdir(parents=True, exist_ok=True)
    dst = release / "mxc-vm"
    link_or_copy(binary, dst)
    vmm = Path(binary).with_name("mxc-vmm")
    if vmm.is_file():
        link_or_copy(str(vmm), release / "mxc-vmm")
    return str(dst)


def make_conf(args, bins, agent):
    """The shell fragment /init sources: hwkvm_tests runs each executable."""
    env = [
        "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "HOME=/root",
        "MXC_VM_LANE=hwkvm",
        "RUST_BACKTRACE=1",
    ]
    if agent:
        env.append(f"MXC_VM_GUEST_AGENT={agent}")
    if os.environ.get("MXC_VM_CACHE_DIR"):
        env.append(f"MXC_VM_CACHE_DIR={os.environ['MXC_VM_CACHE_DIR']}")
    q = shlex.quote
    base = ["env", "-i"] + env
    mxc = str(args.out / "bin/mxc-vm")
    # Paths outside the repository the tests read (the nested host's /init puts back
    # whichever of these, and the repository, lie under its fresh /tmp or /run).
    repo = os.path.realpath(args.repo)
    keep = []
    for p in [str(args.out), os.path.dirname(agent) if agent else None,
              os.environ.get("MXC_VM_CACHE_DIR")]:
        if p and not os.path.realpath(p).startswith(repo + os.sep) and p not in keep:
            keep.append(os.path.realpath(p))
    lines = [f"HWKVM_REPO={q(args.repo)}", f"HWKVM_KEEP={q(' '.join(keep))}",
             f"HWKVM_BINARY_LIMIT={args.binary_limit}", "hwkvm_tests() {"]
    lines.append('  echo "HWKVM-BACKENDS (mxc-vm backends inside the nested host):"')
    lines.append("  " + " ".join(q(w) for w in base + [mxc, "backends"]) + " < /dev/null")
    for name, exe in bins:
        cmd = base + [exe, "--test-threads=1", "--color=never"] + args.libtest_args
        lines.append(f"  hwkvm_run {q(name)} " + " ".join(q(w) for w in cmd))
    if args.bench_binary:
        # A measurement, not a test: its lines are shown and kept, never counted. Its
        # ready snapshot lives in a cache on the nested host's own /tmp (the image linked
        # from the shared one): restored guest memory is mapped from that file, and
        # through 9p every page the guest touches would cross to the outer host.
        cmd = [args.bench_binary, "bench", "boot", "--until", "output", "--runs",
               str(args.bench_runs), "--vs-qemu", "--snapshot"]
        shared = os.environ.get("MXC_VM_CACHE_DIR") or "/root/.cache/mxc-vm"
        lines.append('  echo "HWKVM-BENCH-START"')
        lines.append("  bench_cache=$(mktemp -d /tmp/hwkvm-bench-cache.XXXXXX)")
        for sub in ("kernel", "initramfs"):
            lines.append(f'  ln -s {q(shared + "/" + sub)} "$bench_cache/{sub}"')
        lines.append("  (cd \"$HWKVM_REPO\" && " + " ".join(q(w) for w in base)
                     + ' MXC_VM_CACHE_DIR="$bench_cache" '
                     + " ".join(q(w) for w in cmd) + ") < /dev/null 2>&1")
        lines.append('  echo "HWKVM-BENCH-END rc=$?"')
    lines.append("}")
    return "\n".join(lines) + "\n"


# --- QEMU ---------------------------------------------------------------------------


def test_executables(cargo_json, wanted, repo):
    """[(target name, executable)] of the `tests` package's test targets, from cargo's
    JSON messages, in `wanted`'s order."""
    manifest = str(Path(repo) / "tests" / "Cargo.toml")
    found = {}
    for line in cargo_json.read_text().splitlines():
        if not line.startswith("{"):
            continue
        m = json.loads(line)
        t = m.get("target") or {}
        if (m.get("reason") == "compiler-artifact" and m.get("executable")
                and "test" in t.get("kind", []) and t.get("name") in wanted
                and m.get("manifest_path") == manifest):
            found[t["name"]] = m["executable"]
    missing = [w for w in wanted if w not in found]
    if missing:
        raise SystemExit("hwkvm: cargo built no test executable for: " + ", ".join(missing))
    return [(w, found[w]) for w in wanted]


def kernel_log_tail(path, n=15):
    """The last `n` lines of the nested kernel's log, with the first 'BUG'/'Oops' line."""
    try:
        text = path.read_bytes().decode("utf-8", "replace")
    except OSError:
        return []
    lines = [ANSI.sub("", l).rstrip("\r") for l in text.splitlines()]
    first_bug = next((l for l in lines if re.search(r"BUG|Oops|panic|WARNING", l)), None)
    tail = lines[-n:]
    if first_bug and first_bug not in tail:
        tail = [first_bug, "..."] + tail
    return tail


def parse_limit(text):
    m = re.fullmatch(r"(\d+)([smh]?)", text.strip())
    if not m:
        raise SystemExit(f"hwkvm: bad time limit {text!r} (e.g. 2400, 40m, 1h)")
    return int(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[m.group(2)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--kernel-dir", required=True, type=Path)
    ap.add_argument("--repo", required=True)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--cargo-json", required=True, type=Path,
                    help="output of cargo test --no-run --message-format=json")
    ap.add_argument("--targets", required=True, help="test targets to run, space-separated")
    ap.add_argument("--busybox", default="/bin/busybox", type=Path)
    ap.add_argument("--limit", default="40m", help="for the whole run")
    ap.add_argument("--binary-limit", default="15m", help="for each test executable")
    ap.add_argument("--smp", default="2")
    ap.add_argument("--mem", default="4G")
    ap.add_argument("--bench", default=None, help="a release mxc-vm: run bench boot --vs-qemu")
    ap.add_argument("--bench-runs", default="5")
    ap.add_argument("libtest_args", nargs="*")
    args = ap.parse_args()
    global SUMMARY_PATH
    SUMMARY_PATH = args.out / "summary.txt"
    bins = test_executables(args.cargo_json, args.targets.split(), args.repo)
    limit = parse_limit(args.limit)
    args.binary_limit = parse_limit(args.binary_limit)

    kdir = args.kernel_dir
    vmlinuz = sorted((kdir / "boot").glob("vmlinuz-*"))
    if not vmlinuz:
        raise SystemExit(f"hwkvm: no boot/vmlinuz-* in {kdir}")
    vmlinuz = vmlinuz[-1]
    release = vmlinuz.name[len("vmlinuz-"):]
    moddir = kdir / "lib/modules" / release

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "summary.txt").unlink(missing_ok=True)
    initrd = args.out / "initrd.cpio"
    log_path = args.out / "console.log"
    klog_path = args.out / "kernel.log"
    klog_path.unlink(missing_ok=True)
    t0 = time.monotonic()
    bins, agent = snapshot(args.out, args.repo, bins)
    args.bench_binary = snapshot_bench(args.out, args.bench)
    args.bench_runs = int(args.bench_runs)
    mods = build_initramfs(initrd, moddir, args.busybox, Path(__file__).with_name("init.sh"),
                           make_conf(args, bins, agent))
    say(f"initramfs {initrd} ({initrd.stat().st_size >> 10} KiB; modules: {' '.join(mods)}) "
        f"in {time.monotonic() - t0:.1f}s")

    cmd = [
        "qemu-system-x86_64",
        "-accel", "tcg,thread=multi",
        "-cpu", "EPYC,+svm,+npt",
        "-smp", args.smp,
        "-m", args.mem,
        "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot", "-nic", "none",
        # ttyS0: what /init prints (streamed); ttyS1: the kernel's console, to a file, so
        # that kernel messages never break up the tests' lines.
        "-serial", "stdio",
        "-serial", f"file:{klog_path}",
        "-kernel", str(vmlinuz),
        "-initrd", str(initrd),
        # Stall warnings only after a minute (see STALL_SILENCE).
        "-append", "console=ttyS1 panic=-1 loglevel=7 nokaslr rcupdate.rcu_cpu_stall_timeout=60 "
                   "watchdog_thresh=30",
        "-virtfs", "local,path=/,mount_tag=hostroot,security_model=passthrough,"
                   "multidevs=remap,id=hostroot",
    ]
    say(f"booting the nested host: Linux {release} in QEMU TCG, emulated AMD SVM "
        f"(-smp {args.smp} -m {args.mem}); time limit {limit}s; logs {log_path}, {klog_path}")

    libc = ctypes.CDLL(None, use_errno=True)

    def die_with_us():
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: QEMU dies when we do

    qemu = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True,
                            preexec_fn=die_with_us)

    def kill_qemu(*_):
        if qemu.poll() is None:
            try:
                os.killpg(qemu.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            qemu.wait()

    def on_signal(signum, _frame):
        kill_qemu()
        say(f"interrupted (signal {signum}); QEMU killed")
        sys.exit(128 + signum)

    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, on_signal)

    lines = queue.Queue()

    def reader():
        for raw in qemu.stdout:
            lines.put(raw)
        lines.put(None)

    threading.Thread(target=reader, daemon=True).start()

    start = time.monotonic()
    deadline = start + limit
    tail = []
    results = {}  # name -> rc
    durations = {}
    started = {}
    counts = {}  # name -> (passed, failed) from libtest's summary
    failed_tests = []
    pending = None  # the test whose result has not been printed yet

    def unfinished(name):
        """An executable that ended (or was stopped) without its summary: the test it
        was running, or the executable itself, counts as one failure."""
        if name not in counts:
            failed_tests.append(f"{name}::{pending or '(no libtest summary)'} (did not finish)")
            counts[name] = (0, 1)

    def qemu_cpu_ticks():
        """QEMU's CPU time so far, all threads: nanoseconds from schedstat where the
        kernel keeps it, else user + system clock ticks (10 ms each)."""
        try:
            total = 0
            for task in os.listdir(f"/proc/{qemu.pid}/task"):
                with open(f"/proc/{qemu.pid}/task/{task}/schedstat", encoding="ascii") as f:
                    total += int(f.read().split()[0])
            if total:
                return total
            with open(f"/proc/{qemu.pid}/stat", encoding="ascii") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            return int(fields[11]) + int(fields[12])
        except (OSError, IndexError, ValueError):
            return None

    cpu_ticks = qemu_cpu_ticks()
    cpu_moved = time.monotonic()  # when QEMU's CPU time last grew
    bench_lines = None  # the boot benchmark's output while it runs
    stalled = None  # the stall message of a nested host that then fell silent
    stall_seen = None  # (the first stall message, when it was seen)
    last_line = time.monotonic()  # when the console last printed a line
    klog_seen = 0  # bytes of kernel.log already searched for one
    done = booted = False
    fail_line = None
    timed_out = False
    current = None
    timeouts = []
    try:
        with open(log_path, "w", encoding="utf-8") as log:
            while True:
                try:
                    raw = lines.get(timeout=max(0.1, min(5.0, deadline - time.monotonic())))
                except queue.Empty:
                    raw = b""
                    if time.monotonic() >= deadline:
                        timed_out = True
                        break
                try:
                    with open(klog_path, "rb") as k:
                        k.seek(klog_seen)
                        fresh = k.read()
                except OSError:
                    fresh = b""
                klog_seen += len(fresh)
                hit = STALL.search(fresh.decode("utf-8", "replace"))
                if hit and stall_seen is None:
                    stall_seen = (hit.group(0), time.monotonic())
                    say(f"the nested host's kernel warns {hit.group(0)!r} ({klog_path.name}); "
                        f"stalled if its console stays silent for {STALL_SILENCE}s")
                if (stall_seen and time.monotonic() - max(stall_seen[1], last_line)
                        >= STALL_SILENCE):
                    stalled = stall_seen[0]
                    break
                ticks = qemu_cpu_ticks()
                if ticks != cpu_ticks:
                    cpu_ticks, cpu_moved = ticks, time.monotonic()
                elif booted and time.monotonic() - cpu_moved >= FROZEN_AFTER:
                    stalled = f"QEMU used no CPU time for {FROZEN_AFTER}s: the nested CPU stopped"
                    say(f"the nested host's CPU stopped: QEMU used no CPU time for "
                        f"{FROZEN_AFTER}s ({'in ' + current if current else 'no test running'})")
                    break
                if raw == b"":
                    continue
                last_line = time.monotonic()
                if raw is None:
                    break
                line = ANSI.sub("", raw.decode("utf-8", "replace")).rstrip("\r\n").replace("\r", "")
                log.write(line + "\n")
                log.flush()
                if QUIET.match(line):
                    continue
                print(line, flush=True)
                tail = (tail + [line])[-8:]
                now = time.monotonic() - start
                m = TEST_LINE.match(line)
                sm = SUMMARY.match(line)
                if m and current:
                    pending = None if m.group(2) else m.group(1)
                    if m.group(2) == "FAILED":
                        failed_tests.append(f"{current}::{m.group(1)}")
                elif line in ("ok", "FAILED", "ignored") and pending:
                    if line == "FAILED":  # --nocapture: the result after the output
                        failed_tests.append(f"{current}::{pending}")
                    pending = None
                elif sm and current:
                    counts[current] = (int(sm.group(1)), int(sm.group(2)))
                    pending = None
                elif "HWKVM-BOOTED" in line:
                    booted = True
                    say(f"nested host up after {now:.1f}s (wall clock since QEMU start)")
                elif "HWKVM-START " in line:
                    current = line.split("HWKVM-START ", 1)[1].split()[0]
                    started[current] = now
                    pending = None
                elif "HWKVM-RESULT " in line:
                    parts = line[line.index("HWKVM-RESULT "):].split()
                    name, rc = parts[1], int(parts[2].split("=", 1)[1])
                    results[name] = rc
                    durations[name] = now - started.get(name, now)
                    unfinished(name)
                    p, f = counts[name]
                    say(f"{name}: rc={rc}, {p} passed, {f} failed, in {durations[name]:.1f}s")
                    current = None
                elif "HWKVM-TIMEOUT " in line:
                    timeouts.append(line.split("HWKVM-TIMEOUT ", 1)[1].split()[0])
                elif "HWKVM-FAIL " in line:
                    fail_line = line.split("HWKVM-FAIL ", 1)[1]
                elif "HWKVM-BENCH-START" in line:
                    bench_lines = []
                elif "HWKVM-BENCH-END" in line and bench_lines is not None:
                    (args.out / "bench.txt").write_text("\n".join(bench_lines) + "\n")
                    say(f"boot benchmark: {line.split('HWKVM-BENCH-END ', 1)[-1]}, "
                        f"kept in {args.out / 'bench.txt'}")
                    bench_lines = None
                elif bench_lines is not None:
                    bench_lines.append(line)
                elif "HWKVM-DONE" in line:
                    done = True
    finally:
        kill_qemu()
        shutil.rmtree(args.out / "bin", ignore_errors=True)

    if current:
        unfinished(current)
    passed = sum(p for p, _ in counts.values())
    failed = sum(f for _, f in counts.values())
    total = time.monotonic() - start
    reason = None
    bad = [f"{n} rc={results[n]}" + (f" (killed after {args.binary_limit}s)" if n in timeouts else "")
           for n, _ in bins if n in results and results[n] != 0]
    missing = [n for n, _ in bins if n not in results]
    if stalled and stalled.startswith("QEMU used no CPU time"):
        reason = (f"the nested host's CPU stopped ({stalled}; "
                  f"{'in ' + current if current else 'no test running'}): QEMU killed")
    elif stalled:
        reason = (f"the nested host's kernel stalled ({stalled!r} in {klog_path.name}; "
                  f"{'in ' + current if current else 'no test running'}): QEMU killed")
    elif fail_line:
        reason = f"nested host setup failed: {fail_line}"
    elif timed_out:
        reason = (f"time limit of {limit}s reached ({'in ' + current if current else 'no test running'}); "
                  f"QEMU killed; last console lines: " + " | ".join(tail[-4:]))
    elif not done:
        reason = "nested host never finished: " + " | ".join(tail[-4:])
    if reason or timeouts:
        ktail = kernel_log_tail(klog_path)
        if ktail:
            say(f"last kernel messages ({klog_path}):")
            for kl in ktail:
                SAID.append("  " + kl)
                print("  " + kl, flush=True)
    if bad:
        reason = (reason + "; " if reason else "") + "failed: " + ", ".join(bad)
    elif missing and not reason:
        reason = "no result from: " + ", ".join(missing)
    if failed_tests:
        say("failed tests: " + ", ".join(failed_tests))
    say(f"{len(results)} test executable(s) finished in {total:.0f}s of QEMU "
        f"(nested host {'booted' if booted else 'did not boot'}; timings are TCG-inflated)")
    if reason:
        say("FAILED: " + reason)
    say(f"{passed} passed, {failed} failed")
    if reason:
        SAID.append(f"hwkvm: the last lines of the nested host's console ({log_path}):")
        try:
            lines = log_path.read_text(errors="replace").splitlines()[-25:]
        except OSError:
            lines = []
        SAID.extend("  " + l for l in lines)
    write_summary()
    if stalled:
        return EXIT_STALLED
    return 1 if reason else 0


def write_summary():
    if SUMMARY_PATH:
        SUMMARY_PATH.parent.mkdir(parents=True, exist_ok=True)
        SUMMARY_PATH.write_text("\n".join(SAID) + "\n")


if __name__ == "__main__":
    try:
        sys.exit(main())
    except SystemExit as e:
        if isinstance(e.code, str):  # raise SystemExit("hwkvm: ..."): a setup error
            SAID.append(e.code)
            write_summary()
        raise
    except Exception:
        import traceback
        SAID.append("hwkvm: lane.py failed:\n" + traceback.format_exc())
        write_summary()
        raise
