//! Builds the guest kernel from Debian's `linux-source-6.1` tarball: extract, apply our
//! patch series, `make tinyconfig` + our fragment + `make olddefconfig` (checked), then
//! `make vmlinux bzImage`. One extracted tree is kept in the cache and reused while the
//! source tarball and the patches are unchanged, so a config change rebuilds
//! incrementally.

use std::fs::{self, File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::UNIX_EPOCH;

use thiserror::Error;

use crate::hash::KeyHasher;
use crate::kconfig::{self, KconfigError};
use crate::{Progress, Stage};

/// Our config fragment, applied on top of `make tinyconfig`.
pub(crate) const CONFIG_FRAGMENT: &str = include_str!("../kernel/config.fragment");

/// Our patch series, in the order it is applied (`patch -p1`).
pub(crate) const PATCHES: &[(&str, &[u8])] = &[
    (
        "0001-x86-entry-finish-syscall-from-pvm-page-fault.patch",
        include_bytes!("../kernel/patches/0001-x86-entry-finish-syscall-from-pvm-page-fault.patch"),
    ),
    (
        "0002-x86-fpu-skip-fwait-in-fpu-drop.patch",
        include_bytes!("../kernel/patches/0002-x86-fpu-skip-fwait-in-fpu-drop.patch"),
    ),
    (
        "0003-x86-alternative-skip-int3-selftest.patch",
        include_bytes!("../kernel/patches/0003-x86-alternative-skip-int3-selftest.patch"),
    ),
    (
        "0004-x86-reboot-power-off-through-keyboard-controller.patch",
        include_bytes!(
            "../kernel/patches/0004-x86-reboot-power-off-through-keyboard-controller.patch"
        ),
    ),
];

/// Where Debian's `linux-source-6.1` package puts the kernel source.
pub const DEFAULT_KERNEL_SOURCE: &str = "/usr/src/linux-source-6.1.tar.xz";

/// Environment variable that overrides [`DEFAULT_KERNEL_SOURCE`].
pub const KERNEL_SOURCE_ENV: &str = "MXC_VM_KERNEL_SOURCE";

/// Compile steps (`CC`/`LD`/`AS`/`AR` lines) of a full build with our config; the
/// compile progress is the count so far against this.
const EXPECTED_COMPILE_STEPS: u64 = 1160;

/// Lines of the log quoted in an error.
const LOG_TAIL_LINES: usize = 25;

/// Errors of the kernel build.
#[derive(Debug, Error)]
pub enum KernelError {
    /// The source tarball is not there.
    #[error("kernel source {0} not found; install it with `apt-get install linux-source-6.1` (or set MXC_VM_KERNEL_SOURCE)")]
    SourceMissing(PathBuf),
    /// A file or directory operation failed.
    #[error("cannot access {path}")]
    Io {
        /// The path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A tool could not be started.
    #[error("cannot run {tool}")]
    Spawn {
        /// The program.
        tool: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A build step failed; the log holds its output.
    #[error("{step} failed ({status}); full log: {}\n{tail}", log.display())]
    Step {
        /// What was being done.
        step: String,
        /// How it ended.
        status: ExitStatus,
        /// The build log.
        log: PathBuf,
        /// Its last lines.
        tail: String,
    },
    /// The extracted tarball did not hold exactly one top directory.
    #[error("{0} does not unpack to a single directory")]
    Layout(PathBuf),
    /// The configuration did not come out as the fragment asks.
    #[error("kernel configuration failed; full log: {}", log.display())]
    Config {
        /// The build log.
        log: PathBuf,
        /// What went wrong.
        #[source]
        source: KconfigError,
    },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> KernelError + '_ {
    move |source| KernelError::Io {
        path: path.to_owned(),
        source,
    }
}

/// The kernel source to use: `explicit`, else `$MXC_VM_KERNEL_SOURCE`, else Debian's.
pub(crate) fn source_path(explicit: Option<&Path>) -> PathBuf {
    explicit
        .map(Path::to_owned)
        .or_else(|| std::env::var_os(KERNEL_SOURCE_ENV).map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from(DEFAULT_KERNEL_SOURCE))
}

/// Identity of the source tarball: path, size and modification time (hashing 140 MB
/// of tarball on every run would cost more than it saves).
pub(crate) fn source_identity(source: &Path) -> Result<String, KernelError> {
    let meta = fs::metadata(source).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            KernelError::SourceMissing(source.to_owned())
        } else {
            KernelError::Io {
                path: source.to_owned(),
                source: e,
            }
        }
    })?;
    let mtime = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos());
    Ok(format!("{}\0{}\0{}", source.display(), meta.len(), mtime))
}

fn add_patches(hasher: &mut KeyHasher) {
    for (name, bytes) in PATCHES {
        hasher.field("patch-name", name.as_bytes());
        hasher.field("patch", bytes);
    }
}

/// Key of the extracted and patched tree.
pub(crate) fn tree_key(source_id: &str) -> String {
    let mut hasher = KeyHasher::new("mxc-vm kernel tree");
    hasher.field("builder", crate::BUILDER_VERSION.as_bytes());
    hasher.field("source", source_id.as_bytes());
    add_patches(&mut hasher);
    hasher.key()
}

/// Key of the built kernel: the tree plus the config fragment.
pub(crate) fn kernel_key(source_id: &str) -> String {
    let mut hasher = KeyHasher::new("mxc-vm kernel");
    hasher.field("builder", crate::BUILDER_VERSION.as_bytes());
    hasher.field("source", source_id.as_bytes());
    add_patches(&mut hasher);
    hasher.field("fragment", CONFIG_FRAGMENT.as_bytes());
    hasher.key()
}

/// The built kernel's files inside `dir` (see [`build_kernel`]).
pub(crate) fn artifacts_in(dir: &Path) -> (PathBuf, PathBuf) {
    (dir.join("vmlinux"), dir.join("bzImage"))
}

/// Runs builds and keeps their combined output in one log file.
struct Builder<'p> {
    log_path: PathBuf,
    log: File,
    progress: &'p mut dyn FnMut(Progress),
}

impl Builder<'_> {
    fn report(&mut self, stage: Stage, fraction: Option<f64>, message: impl Into<String>) {
        (self.progress)(Progress {
            stage,
            fraction,
            message: message.into(),
        });
    }

    fn note(&mut self, line: &str) -> Result<(), KernelError> {
        writeln!(self.log, "### {line}").map_err(io_err(&self.log_path))
    }

    fn tail(&self) -> String {
        log_tail(&self.log_path, LOG_TAIL_LINES)
    }

    /// Runs `command` with its output appended to the log; `on_line` sees each
    /// stdout line.
    fn run(
        &mut self,
        step: &str,
        command: &mut Command,
        mut on_line: impl FnMut(&mut Self, &str),
    ) -> Result<(), KernelError> {
        self.note(&format!("{step}: {command:?}"))?;
        let stderr = self.log.try_clone().map_err(io_err(&self.log_path))?;
        let tool = format!("{:?}", command.get_program());
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .map_err(|source| KernelError::Spawn { tool, source })?;
        if let Some(stdout) = child.stdout.take() {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                writeln!(self.log, "{line}").map_err(io_err(&self.log_path))?;
                on_line(self, &line);
            }
        }
        let status = child.wait().map_err(io_err(&self.log_path))?;
        if !status.success() {
            return Err(KernelError::Step {
                step: step.to_owned(),
                status,
                log: self.log_path.clone(),
                tail: self.tail(),
            });
        }
        Ok(())
    }
}

/// The last `lines` lines of the file at `path` (at most its last 64 KiB are read).
pub(crate) fn log_tail(path: &Path, lines: usize) -> String {
    let Ok(mut file) = File::open(path) else {
        return String::new();
    };
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = file.seek(SeekFrom::Start(len.saturating_sub(64 * 1024)));
    let mut bytes = Vec::new();
    let _ = file.read_to_end(&mut bytes);
    let text = String::from_utf8_lossy(&bytes);
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// `make` in `tree` with a clean, reproducible environment.
fn make(tree: &Path) -> Command {
    let mut command = Command::new("make");
    command.current_dir(tree).arg("ARCH=x86_64");
    for var in [
        "LLVM",
        "LLVM_IAS",
        "KCFLAGS",
        "KCPPFLAGS",
        "KAFLAGS",
        "KBUILD_EXTMOD",
        "W",
        "C",
        "V",
        "MAKEFLAGS",
        "MFLAGS",
        "MAKELEVEL",
        "MAKEOVERRIDES",
        "ARCH",
        "CROSS_COMPILE",
        "KBUILD_OUTPUT",
        "KCONFIG_CONFIG",
        "O",
        "CC",
        "LD",
        "CFLAGS",
        "LDFLAGS",
    ] {
        command.env_remove(var);
    }
    command
        .env("KBUILD_BUILD_TIMESTAMP", "1970-01-01")
        .env("KBUILD_BUILD_USER", "mxc-vm")
        .env("KBUILD_BUILD_HOST", "mxc-vm");
    command
}

fn is_compile_line(line: &str) -> bool {
    let word = line.split_whitespace().next().unwrap_or("");
    line.starts_with("  ") && matches!(word, "CC" | "LD" | "AS" | "AR")
}

/// Extracts the source and applies the patches in a fresh directory next to `kbuild`,
/// then swaps it in; returns the tree.
fn prepare_tree(
    builder: &mut Builder<'_>,
    kbuild: &Path,
    source: &Path,
    key: &str,
) -> Result<PathBuf, KernelError> {
    let stamp = kbuild.join("tree-key");
    if fs::read_to_string(&stamp).ok().as_deref() == Some(key) {
        if let Ok(tree) = single_dir(kbuild.join("src").as_path()) {
            return Ok(tree);
        }
    }
    let fresh = kbuild.with_extension(format!("new-{}", std::process::id()));
    let _ = fs::remove_dir_all(&fresh);
    let src = fresh.join("src");
    fs::create_dir_all(&src).map_err(io_err(&src))?;

    builder.report(
        Stage::Extract,
        None,
        format!("extracting {}", source.display()),
    );
    builder.run(
        "extracting the kernel source",
        Command::new("tar")
            .arg("-xf")
            .arg(source)
            .arg("-C")
            .arg(&src)
            .arg("--no-same-owner"),
        |_, _| {},
    )?;
    let tree = single_dir(&src)?;

    for (index, (name, bytes)) in PATCHES.iter().enumerate() {
        builder.report(
            Stage::Patch,
            Some(index as f64 / PATCHES.len() as f64),
            format!("applying {name}"),
        );
        let path = fresh.join(name);
        fs::write(&path, bytes).map_err(io_err(&path))?;
        builder.run(
            &format!("applying {name}"),
            Command::new("patch")
                .current_dir(&tree)
                .args([
                    "-p1",
                    "--forward",
                    "--batch",
                    "--no-backup-if-mismatch",
                    "-i",
                ])
                .arg(&path),
            |_, _| {},
        )?;
    }
    let fresh_stamp = fresh.join("tree-key");
    fs::write(&fresh_stamp, key).map_err(io_err(&fresh_stamp))?;

    // Swap the new tree in; the old one (other source or patches) goes.
    if kbuild.exists() {
        let old = kbuild.with_extension(format!("old-{}", std::process::id()));
        fs::rename(kbuild, &old).map_err(io_err(kbuild))?;
        let _ = fs::remove_dir_all(&old);
    }
    fs::rename(&fresh, kbuild).map_err(io_err(kbuild))?;
    single_dir(&kbuild.join("src"))
}

fn single_dir(dir: &Path) -> Result<PathBuf, KernelError> {
    let mut dirs = Vec::new();
    for entry in fs::read_dir(dir).map_err(io_err(dir))? {
        let entry = entry.map_err(io_err(dir))?;
        if entry.file_type().map(|t| t.is_dir()).unwrap_or(false) {
            dirs.push(entry.path());
        }
    }
    match dirs.as_slice() {
        [one] => Ok(one.clone()),
        _ => Err(KernelError::Layout(dir.to_owned())),
    }
}

fn configure(builder: &mut Builder<'_>, tree: &Path) -> Result<(), KernelError> {
    builder.report(Stage::Configure, None, "make tinyconfig + config.fragment");
    let config_err = |log: &Path| {
        let log = log.to_owned();
        move |source| KernelError::Config { log, source }
    };
    let fragment = kconfig::parse(CONFIG_FRAGMENT).map_err(config_err(&builder.log_path))?;
    builder.run("make tinyconfig", make(tree).arg("tinyconfig"), |_, _| {})?;
    let config_path = tree.join(".config");
    let base = fs::read_to_string(&config_path).map_err(io_err(&config_path))?;
    fs::write(&config_path, kconfig::merge(&base, &fragment)).map_err(io_err(&config_path))?;
    builder.run(
        "make olddefconfig",
        make(tree).arg("olddefconfig"),
        |_, _| {},
    )?;
    let config = fs::read_to_string(&config_path).map_err(io_err(&config_path))?;
    kconfig::verify(&config, &fragment).map_err(config_err(&builder.log_path))
}

fn compile(builder: &mut Builder<'_>, tree: &Path, jobs: usize) -> Result<(), KernelError> {
    builder.report(Stage::Compile, Some(0.0), "make vmlinux bzImage");
    let mut steps = 0u64;
    builder.run(
        "make vmlinux bzImage",
        make(tree)
            .arg(format!("-j{jobs}"))
            .args(["vmlinux", "bzImage"]),
        |b, line| {
            if is_compile_line(line) {
                steps += 1;
                let fraction = (steps as f64 / EXPECTED_COMPILE_STEPS as f64).min(0.99);
                b.report(Stage::Compile, Some(fraction), line.trim().to_owned());
            }
        },
    )
}

/// Builds the kernel for `key` into `out_dir` (created atomically: the files appear
/// under a temporary name that is renamed to `out_dir` once complete).
pub(crate) fn build_kernel(
    cache: &Path,
    source: &Path,
    source_id: &str,
    out_dir: &Path,
    jobs: usize,
    progress: &mut dyn FnMut(Progress),
) -> Result<(), KernelError> {
    if !source.is_file() {
        return Err(KernelError::SourceMissing(source.to_owned()));
    }
    let kbuild = cache.join("kbuild");
    fs::create_dir_all(cache).map_err(io_err(cache))?;
    let log_path = cache.join("kbuild.log");
    let log = OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .open(&log_path)
        .map_err(io_err(&log_path))?;
    let mut builder = Builder {
        log_path,
        log,
        progress,
    };

    let tree = prepare_tree(&mut builder, &kbuild, source, &tree_key(source_id))?;
    configure(&mut builder, &tree)?;
    compile(&mut builder, &tree, jobs)?;

    let staging = out_dir.with_extension(format!("tmp-{}", std::process::id()));
    let _ = fs::remove_dir_all(&staging);
    fs::create_dir_all(&staging).map_err(io_err(&staging))?;
    let (vmlinux, bzimage) = artifacts_in(&staging);
    for (from, to) in [
        (tree.join("vmlinux"), &vmlinux),
        (tree.join("arch/x86/boot/bzImage"), &bzimage),
        (tree.join(".config"), &staging.join("config")),
    ] {
        fs::copy(&from, to).map_err(io_err(&from))?;
    }
    let log_copy = staging.join("build.log");
    fs::copy(&builder.log_path, &log_copy).map_err(io_err(&log_copy))?;
    let _ = fs::remove_dir_all(out_dir);
    fs::rename(&staging, out_dir).map_err(io_err(out_dir))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patch_series_matches_the_patch_directory() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("kernel/patches");
        let mut on_disk: Vec<String> = fs::read_dir(&dir)
            .map(|rd| {
                rd.filter_map(Result::ok)
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n.ends_with(".patch"))
                    .collect()
            })
            .unwrap_or_default();
        on_disk.sort();

        let listed: Vec<&str> = PATCHES.iter().map(|(n, _)| *n).collect();

        assert_eq!(on_disk, listed);
    }

    #[test]
    fn patches_are_numbered_in_order() {
        let numbers: Vec<&str> = PATCHES.iter().map(|(n, _)| &n[..4]).collect();

        assert_eq!(numbers, ["0001", "0002", "0003", "0004"]);
    }

    #[test]
    fn every_patch_is_a_well_formed_unified_diff() {
        let problems: Vec<String> = PATCHES
            .iter()
            .filter_map(|(name, bytes)| {
                check_unified_diff(bytes)
                    .err()
                    .map(|e| format!("{name}: {e}"))
            })
            .collect();

        assert!(problems.is_empty(), "{problems:?}");
    }

    #[test]
    fn every_patch_documents_its_boot_flag() {
        let flags = [
            crate::PVM_FLAG_SYSCALL,
            crate::PVM_FLAG_NOFWAIT,
            crate::PVM_FLAG_NOINT3TEST,
        ];

        let documented: Vec<bool> = PATCHES
            .iter()
            .zip(flags)
            .map(|((_, bytes), flag)| {
                let text = String::from_utf8_lossy(bytes);
                text.contains(&format!("Boot flag: {flag}"))
                    && text.contains(&format!("early_param(\"{flag}\""))
            })
            .collect();

        assert_eq!(documented, [true, true, true]);
    }

    #[test]
    fn checker_rejects_a_hunk_with_wrong_counts() {
        let bad = b"--- a/x.c\n+++ b/x.c\n@@ -1,2 +1,3 @@\n a\n+b\n";

        let result = check_unified_diff(bad);

        assert!(result.is_err());
    }

    #[test]
    fn compile_lines_are_recognised() {
        let lines = [
            "  CC      kernel/fork.o",
            "  LD      vmlinux",
            "  GEN     Makefile",
            "CC foo",
        ];

        let recognised = lines.map(is_compile_line);

        assert_eq!(recognised, [true, true, false, false]);
    }

    #[test]
    fn kernel_key_changes_with_the_source() {
        let one = kernel_key("/usr/src/a.tar.xz\x001\x002");

        let two = kernel_key("/usr/src/a.tar.xz\x001\x003");

        assert_ne!(one, two);
        assert_eq!(one.len(), 32);
    }

    #[test]
    fn missing_source_names_the_package() {
        let error = source_identity(Path::new("/nonexistent/linux.tar.xz")).err();

        let message = error.map(|e| e.to_string()).unwrap_or_default();

        assert!(
            message.contains("apt-get install linux-source-6.1"),
            "{message}"
        );
    }

    /// Checks the structure of a unified diff: file headers with `a/` and `b/` paths,
    /// hunks whose line counts match their headers, and only ` `, `+`, `-`, `\` lines
    /// inside hunks.
    fn check_unified_diff(bytes: &[u8]) -> Result<(), String> {
        let text = std::str::from_utf8(bytes).map_err(|_| "not utf-8".to_string())?;
        let lines: Vec<&str> = text.lines().collect();
        let mut i = 0;
        let mut files = 0;
        while i < lines.len() {
            if !lines[i].starts_with("--- a/") {
                i += 1;
                continue;
            }
            if !lines.get(i + 1).is_some_and(|l| l.starts_with("+++ b/")) {
                return Err(format!("line {}: --- without +++", i + 1));
            }
            files += 1;
            i += 2;
            let mut hunks = 0;
            while let Some(header) = lines.get(i).filter(|l| l.starts_with("@@ ")) {
                let counts =
                    parse_hunk_header(header).ok_or(format!("line {}: bad hunk header", i + 1))?;
                let (mut old, mut new) = (0, 0);
                i += 1;
                while old < counts.0 || new < counts.1 {
                    let line = lines.get(i).ok_or("hunk runs past the end")?;
                    match line.chars().next() {
                        Some(' ') | None => {
                            old += 1;
                            new += 1;
                        }
                        Some('-') => old += 1,
                        Some('+') => new += 1,
                        Some('\\') => {}
                        _ => return Err(format!("line {}: unexpected {line:?}", i + 1)),
                    }
                    i += 1;
                }
                if (old, new) != counts {
                    return Err(format!("hunk before line {} has wrong counts", i + 1));
                }
                hunks += 1;
            }
            if hunks == 0 {
                return Err(format!("file header before line {} has no hunks", i + 1));
            }
        }
        if files == 0 {
            return Err("no file in the patch".into());
        }
        Ok(())
    }

    fn parse_hunk_header(header: &str) -> Option<(usize, usize)> {
        let body = header.strip_prefix("@@ -")?.split(" @@").next()?;
        let (old, new) = body.split_once(" +")?;
        let count = |range: &str| -> Option<usize> {
            match range.split_once(',') {
                Some((_, n)) => n.parse().ok(),
                None => range.parse::<usize>().ok().map(|_| 1),
            }
        };
        Some((count(old)?, count(new)?))
    }
}
