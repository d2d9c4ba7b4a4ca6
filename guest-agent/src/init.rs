//! The duties of PID 1: file systems, host name, loopback, boot-timer stages, power-off.
//! Nothing here runs in `--unix`/`--vsock` mode.

use std::path::Path;

use proto::BOOT_TIMER_ADDR;

use crate::{log, sys};

/// `MS_*` flags for the mounts below.
const NOSUID: u64 = libc::MS_NOSUID;
const NODEV: u64 = libc::MS_NODEV;
const NOEXEC: u64 = libc::MS_NOEXEC;

/// One file system PID 1 mounts.
struct MountSpec {
    source: &'static str,
    target: &'static str,
    fstype: &'static str,
    flags: u64,
    data: &'static str,
    required: bool,
}

/// `/dev` comes first so the boot timer (`/dev/mem`) and the console work early.
const DEV: MountSpec = MountSpec {
    source: "devtmpfs",
    target: "/dev",
    fstype: "devtmpfs",
    flags: NOSUID,
    data: "mode=0755",
    required: true,
};

const MOUNTS: &[MountSpec] = &[
    MountSpec {
        source: "proc",
        target: "/proc",
        fstype: "proc",
        flags: NOSUID | NODEV | NOEXEC,
        data: "",
        required: true,
    },
    // Our kernel has no sysfs (it cost seconds of every cold boot); another kernel's is
    // mounted. Without it `/sys` stays the initramfs's directory, which holds cgroup2.
    MountSpec {
        source: "sysfs",
        target: "/sys",
        fstype: "sysfs",
        flags: NOSUID | NODEV | NOEXEC,
        data: "",
        required: false,
    },
    MountSpec {
        source: "devpts",
        target: "/dev/pts",
        fstype: "devpts",
        flags: NOSUID | NOEXEC,
        data: "mode=0620,ptmxmode=0666",
        required: false,
    },
    MountSpec {
        source: "tmpfs",
        target: "/dev/shm",
        fstype: "tmpfs",
        flags: NOSUID | NODEV,
        data: "mode=1777",
        required: false,
    },
    MountSpec {
        source: "tmpfs",
        target: "/tmp",
        fstype: "tmpfs",
        flags: NOSUID | NODEV,
        data: "mode=1777",
        required: true,
    },
    MountSpec {
        source: "tmpfs",
        target: "/run",
        fstype: "tmpfs",
        flags: NOSUID | NODEV,
        data: "mode=0755",
        required: true,
    },
    MountSpec {
        source: "cgroup2",
        target: "/sys/fs/cgroup",
        fstype: "cgroup2",
        flags: NOSUID | NODEV | NOEXEC,
        data: "",
        required: false,
    },
];

/// Where cgroup2 is mounted as PID 1.
pub const CGROUP_ROOT: &str = "/sys/fs/cgroup";

fn mount_one(spec: &MountSpec) {
    let target = Path::new(spec.target);
    let _ = std::fs::create_dir_all(target);
    match sys::mount(spec.source, target, spec.fstype, spec.flags, spec.data) {
        Ok(()) => {}
        // Already mounted (e.g. the kernel's devtmpfs automount).
        Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {}
        Err(e) if spec.required => log!("cannot mount {} on {}: {e}", spec.fstype, spec.target),
        Err(_) => {}
    }
}

/// Mounts `/dev`, makes sure fds 0..2 are open (on the console when there is one), and
/// writes the `STAGE_AGENT_START` boot-timer mark.
pub fn early() {
    mount_one(&DEV);
    open_console();
    sys::ensure_std_fds();
    boot_stage(proto::STAGE_AGENT_START);
}

/// Mounts `/proc`, `/tmp`, `/run` and the optional others (`/sys` among them).
pub fn mount_all() {
    for spec in MOUNTS {
        mount_one(spec);
    }
}

/// Sets the host name, brings up loopback and protects the agent from the OOM killer.
pub fn configure(hostname: &str) {
    if let Err(e) = sys::sethostname(hostname) {
        log!("cannot set host name {hostname:?}: {e}");
    }
    if let Err(e) = sys::loopback_up() {
        log!("cannot bring up loopback: {e}");
    }
    let _ = std::fs::write("/proc/self/oom_score_adj", "-1000");
    // Ctrl-Alt-Del becomes SIGINT to us (a clean power-off) instead of a hard reboot.
    let _ = sys::ctrl_alt_del_to_signal();
}

/// Reads `/proc/cmdline` (empty if it cannot be read).
pub fn kernel_cmdline() -> String {
    std::fs::read_to_string("/proc/cmdline").unwrap_or_default()
}

/// Writes a stage byte to the boot-timer register; failure is quiet (no such device).
pub fn boot_stage(stage: u8) {
    let _ = sys::write_phys_byte(BOOT_TIMER_ADDR, stage);
}

/// If the kernel found no `/dev/console` for us (no node in the initramfs), open it now
/// that devtmpfs is mounted, so logs reach the console.
fn open_console() {
    if (0..3).all(sys::is_open) {
        return;
    }
    for fd in 0..3 {
        if sys::is_open(fd) {
            continue;
        }
        match sys::open(Path::new("/dev/console"), libc::O_RDWR | libc::O_NOCTTY) {
            Ok(console) => sys::install_at(console, fd),
            Err(_) => return,
        }
    }
}

/// Kills everything, syncs and ends the VM.
pub fn power_off() -> ! {
    log!("powering off");
    sys::power_off()
}
