//! Builds and caches the guest's kernel and initramfs.
//!
//! [`build`] produces an [`Image`]: a Linux kernel built from Debian's
//! `linux-source-6.1` with our config fragment and PVM compatibility patches
//! (`kernel/` in this crate), and an initramfs with the static guest agent as `/init`
//! plus busybox. Results live in the user's cache directory under keys hashed from
//! their inputs; the kernel and the initramfs have separate keys, so a new agent only
//! rewrites the initramfs. [`cached`] returns an image without building anything.
//!
//! The command lines the VMM passes are [`KERNEL_CMDLINE_BASE`] and, on the `kvm_pvm`
//! hypervisor, [`KERNEL_CMDLINE_PVM`] (see [`kernel_cmdline`]).

mod agent;
mod cmdline;
pub mod cpio;
mod elf;
mod hash;
pub mod initramfs;
mod kconfig;
mod kernel;
pub mod rootfs;

use std::ffi::OsString;
use std::fs::{self, File, OpenOptions};
use std::io::{BufWriter, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use thiserror::Error;

pub use agent::{AgentError, AGENT_BUILD_COMMAND, AGENT_ENV};
pub use cmdline::{
    kernel_cmdline, GuestConsole, KERNEL_CMDLINE_BASE, KERNEL_CMDLINE_CONSOLE,
    KERNEL_CMDLINE_LOGGED, KERNEL_CMDLINE_PVM, PVM_CLEARCPUID, PVM_FLAG_NOFWAIT,
    PVM_FLAG_NOINT3TEST, PVM_FLAG_SYSCALL, PVM_USER_ENV,
};
pub use elf::{check_static_x86_64, ElfError};
pub use initramfs::{busybox_applets, write_initramfs, InitramfsContents, InitramfsError};
pub use kconfig::KconfigError;
pub use kernel::{KernelError, DEFAULT_KERNEL_SOURCE, KERNEL_SOURCE_ENV};
pub use rootfs::{build_rootfs, cached_rootfs, rootfs_path, RootfsError};

/// Environment variable that overrides the cache directory.
pub const CACHE_ENV: &str = "MXC_VM_CACHE_DIR";

/// Debian's `busybox-static` binary.
pub const DEFAULT_BUSYBOX: &str = "/bin/busybox";

/// Part of every cache key: bump the suffix when the build steps change their output.
pub(crate) const BUILDER_VERSION: &str = concat!(env!("CARGO_PKG_VERSION"), "+build1");

/// What to build from and where to keep it. `Default` means: the user's cache
/// directory, Debian's kernel source, the guest agent found by [`find_guest_agent`],
/// and `/bin/busybox`.
#[derive(Debug, Clone, Default)]
pub struct BuildOptions {
    /// Cache directory (else `$MXC_VM_CACHE_DIR`, `$XDG_CACHE_HOME/mxc-vm`,
    /// `~/.cache/mxc-vm`).
    pub cache_dir: Option<PathBuf>,
    /// Kernel source tarball (else `$MXC_VM_KERNEL_SOURCE`, [`DEFAULT_KERNEL_SOURCE`]).
    pub kernel_source: Option<PathBuf>,
    /// Static guest-agent binary (else see [`find_guest_agent`]).
    pub agent: Option<PathBuf>,
    /// Static busybox binary (else [`DEFAULT_BUSYBOX`]).
    pub busybox: Option<PathBuf>,
    /// Leave busybox out of the initramfs. Under `kvm_pvm` its 2 MB were measured to
    /// add about 20 s to the boot (kernel code runs emulated there); on hardware KVM
    /// the difference is small.
    pub no_busybox: bool,
    /// Parallel compile jobs (else the number of CPUs).
    pub jobs: Option<usize>,
}

/// A built guest image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Image {
    /// Uncompressed ELF kernel (boots through its PVH entry point).
    pub vmlinux: PathBuf,
    /// The same kernel as a bzImage, when present.
    pub bzimage: Option<PathBuf>,
    /// The cpio newc initramfs.
    pub initramfs: PathBuf,
    /// Identifies this image: `<kernel key>-<initramfs key>`.
    pub key: String,
}

/// A build stage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Stage {
    /// Unpacking the kernel source.
    Extract,
    /// Applying our patch series.
    Patch,
    /// `make tinyconfig`, merging the fragment, `make olddefconfig`.
    Configure,
    /// `make vmlinux bzImage`.
    Compile,
    /// Writing the initramfs.
    Initramfs,
    /// Building the Debian rootfs (`debootstrap`).
    Rootfs,
    /// Finished.
    Done,
}

/// A progress report.
#[derive(Debug, Clone, PartialEq)]
pub struct Progress {
    /// Current stage.
    pub stage: Stage,
    /// Completed fraction of the stage (0 to 1), when it can be estimated.
    pub fraction: Option<f64>,
    /// What is happening (e.g. the file being compiled).
    pub message: String,
}

/// Errors of [`build`] and [`find_guest_agent`].
#[derive(Debug, Error)]
pub enum ImageError {
    /// No cache directory could be determined.
    #[error("no cache directory: set MXC_VM_CACHE_DIR, XDG_CACHE_HOME or HOME")]
    NoCacheDir,
    /// A cache file or directory could not be used.
    #[error("cannot use {path}")]
    Cache {
        /// The path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The guest agent is missing or unsuitable.
    #[error(transparent)]
    Agent(#[from] AgentError),
    /// Busybox is missing or unsuitable.
    #[error("busybox {path} is unusable; install Debian's busybox-static (`apt-get install busybox-static`) or name a static busybox")]
    Busybox {
        /// The binary.
        path: PathBuf,
        /// Why.
        #[source]
        source: AgentError,
    },
    /// The kernel build failed.
    #[error(transparent)]
    Kernel(#[from] KernelError),
    /// The initramfs could not be assembled.
    #[error(transparent)]
    Initramfs(#[from] InitramfsError),
    /// The Debian rootfs could not be built.
    #[error(transparent)]
    Rootfs(#[from] RootfsError),
}

pub(crate) fn cache_err(path: &Path) -> impl FnOnce(std::io::Error) -> ImageError + '_ {
    move |source| ImageError::Cache {
        path: path.to_owned(),
        source,
    }
}

/// The cache directory from, in order: `explicit`, `$MXC_VM_CACHE_DIR`,
/// `$XDG_CACHE_HOME/mxc-vm` (when absolute), `$HOME/.cache/mxc-vm`.
fn resolve_cache_dir(
    explicit: Option<&Path>,
    env: Option<OsString>,
    xdg: Option<OsString>,
    home: Option<OsString>,
) -> Option<PathBuf> {
    let nonempty = |v: Option<OsString>| v.filter(|v| !v.is_empty()).map(PathBuf::from);
    explicit
        .map(Path::to_owned)
        .or_else(|| nonempty(env))
        .or_else(|| {
            nonempty(xdg)
                .filter(|p| p.is_absolute())
                .map(|p| p.join("mxc-vm"))
        })
        .or_else(|| nonempty(home).map(|p| p.join(".cache/mxc-vm")))
}

/// The cache directory `opts` selects (not created).
pub fn cache_dir(opts: &BuildOptions) -> Result<PathBuf, ImageError> {
    resolve_cache_dir(
        opts.cache_dir.as_deref(),
        std::env::var_os(CACHE_ENV),
        std::env::var_os("XDG_CACHE_HOME"),
        std::env::var_os("HOME"),
    )
    .ok_or(ImageError::NoCacheDir)
}

/// The static guest-agent binary: `opts.agent`, else `$MXC_VM_GUEST_AGENT`, else
/// `guest-agent` next to the current executable, else
/// `<exe_dir>/../x86_64-unknown-linux-gnu/release/guest-agent`. It must be a static
/// x86-64 ELF (no program interpreter); the error says how to build one.
pub fn find_guest_agent(opts: &BuildOptions) -> Result<PathBuf, ImageError> {
    let exe = std::env::current_exe().ok();
    Ok(agent::find(
        opts.agent.as_deref(),
        std::env::var_os(AGENT_ENV),
        exe.as_deref(),
    )?)
}

/// Everything the cache keys are computed from.
struct Inputs {
    cache: PathBuf,
    source: PathBuf,
    source_id: String,
    kernel_key: String,
    busybox: Option<PathBuf>,
    agent_bytes: Vec<u8>,
    busybox_bytes: Vec<u8>,
    initramfs_key: String,
}

impl Inputs {
    fn gather(opts: &BuildOptions) -> Result<Self, ImageError> {
        let cache = cache_dir(opts)?;
        let source = kernel::source_path(opts.kernel_source.as_deref());
        let source_id = kernel::source_identity(&source)?;
        let kernel_key = kernel::kernel_key(&source_id);

        let agent_path = find_guest_agent(opts)?;
        let agent_bytes = fs::read(&agent_path).map_err(|source| AgentError::Read {
            path: agent_path.clone(),
            source,
        })?;
        let busybox = (!opts.no_busybox).then(|| {
            opts.busybox
                .clone()
                .unwrap_or_else(|| PathBuf::from(DEFAULT_BUSYBOX))
        });
        let busybox_bytes = match &busybox {
            Some(path) => read_static(path).map_err(|source| ImageError::Busybox {
                path: path.clone(),
                source,
            })?,
            None => Vec::new(),
        };

        let mut hasher = hash::KeyHasher::new("mxc-vm initramfs");
        hasher
            .field("builder", BUILDER_VERSION.as_bytes())
            .field("layout", initramfs::LAYOUT_VERSION.as_bytes())
            .field("agent", &agent_bytes)
            .field("busybox", &busybox_bytes)
            .field("with-busybox", &[u8::from(busybox.is_some())]);
        let initramfs_key = hasher.key();
        Ok(Self {
            cache,
            source,
            source_id,
            kernel_key,
            busybox,
            agent_bytes,
            busybox_bytes,
            initramfs_key,
        })
    }

    fn kernel_dir(&self) -> PathBuf {
        self.cache.join("kernel").join(&self.kernel_key)
    }

    fn initramfs_path(&self) -> PathBuf {
        self.cache
            .join("initramfs")
            .join(format!("{}.cpio", self.initramfs_key))
    }

    fn image(&self) -> Option<Image> {
        let (vmlinux, bzimage) = kernel::artifacts_in(&self.kernel_dir());
        let initramfs = self.initramfs_path();
        (vmlinux.is_file() && initramfs.is_file()).then(|| Image {
            vmlinux,
            bzimage: bzimage.is_file().then_some(bzimage),
            initramfs,
            key: format!("{}-{}", &self.kernel_key[..16], &self.initramfs_key[..16]),
        })
    }
}

fn read_static(path: &Path) -> Result<Vec<u8>, AgentError> {
    let bytes = fs::read(path).map_err(|source| AgentError::Read {
        path: path.to_owned(),
        source,
    })?;
    elf::check_static_x86_64(&bytes).map_err(|source| AgentError::NotStatic {
        path: path.to_owned(),
        source,
    })?;
    Ok(bytes)
}

/// The image for `opts` if it has been built already; never builds.
pub fn cached(opts: &BuildOptions) -> Option<Image> {
    Inputs::gather(opts).ok()?.image()
}

/// An exclusive lock on the cache, held while building (released on drop).
pub(crate) struct CacheLock {
    _file: File,
}

impl CacheLock {
    pub(crate) fn acquire(cache: &Path) -> Result<Self, ImageError> {
        let path = cache.join("lock");
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(cache_err(&path))?;
        loop {
            // SAFETY: flock on a file descriptor we own; it touches no memory.
            let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
            if rc == 0 {
                return Ok(Self { _file: file });
            }
            let error = std::io::Error::last_os_error();
            if error.kind() != std::io::ErrorKind::Interrupted {
                return Err(cache_err(&path)(error));
            }
        }
    }
}

/// Builds (or reuses) the image for `opts`, reporting progress through `progress`.
///
/// The kernel is rebuilt only when its source, patches or config fragment changed;
/// the initramfs only when the agent or busybox changed. Files appear under their
/// final names only when complete. Another process building into the same cache
/// waits for this one.
pub fn build(opts: &BuildOptions, progress: &mut dyn FnMut(Progress)) -> Result<Image, ImageError> {
    let inputs = Inputs::gather(opts)?;
    fs::create_dir_all(&inputs.cache).map_err(cache_err(&inputs.cache))?;
    let _lock = CacheLock::acquire(&inputs.cache)?;
    remove_leftovers(&inputs.cache);

    let kernel_dir = inputs.kernel_dir();
    if kernel::artifacts_in(&kernel_dir).0.is_file() {
        progress(Progress {
            stage: Stage::Compile,
            fraction: Some(1.0),
            message: "kernel up to date".into(),
        });
    } else {
        let parent = inputs.cache.join("kernel");
        fs::create_dir_all(&parent).map_err(cache_err(&parent))?;
        let jobs = opts.jobs.filter(|j| *j > 0).unwrap_or_else(|| {
            std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
        });
        kernel::build_kernel(
            &inputs.cache,
            &inputs.source,
            &inputs.source_id,
            &kernel_dir,
            jobs,
            progress,
        )?;
    }

    let initramfs = inputs.initramfs_path();
    if !initramfs.is_file() {
        progress(Progress {
            stage: Stage::Initramfs,
            fraction: None,
            message: "writing the initramfs".into(),
        });
        write_initramfs_file(&inputs, &initramfs)?;
    }

    let image = inputs.image().ok_or_else(|| ImageError::Cache {
        path: kernel_dir.clone(),
        source: std::io::Error::new(std::io::ErrorKind::NotFound, "built files are missing"),
    })?;
    progress(Progress {
        stage: Stage::Done,
        fraction: Some(1.0),
        message: format!("image {}", image.key),
    });
    Ok(image)
}

/// Removes what an interrupted build left behind (temporary trees, kernel directories
/// and initramfs files); only called with the cache lock held.
pub(crate) fn remove_leftovers(cache: &Path) {
    let is_leftover = |name: &str| {
        name.starts_with("kbuild.new-") || name.starts_with("kbuild.old-") || name.contains(".tmp-")
    };
    for dir in [
        cache.to_owned(),
        cache.join("kernel"),
        cache.join("initramfs"),
    ] {
        remove_leftovers_in(&dir, &is_leftover);
    }
    // A partial rootfs may still have debootstrap's mounts inside: removed only without.
    if let Ok(entries) = fs::read_dir(cache.join("rootfs")) {
        for entry in entries.flatten() {
            if is_leftover(&entry.file_name().to_string_lossy()) {
                rootfs::remove_tree(&entry.path());
            }
        }
    }
}

fn remove_leftovers_in(dir: &Path, is_leftover: &dyn Fn(&str) -> bool) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        if !is_leftover(&entry.file_name().to_string_lossy()) {
            continue;
        }
        let path = entry.path();
        let _ = if path.is_dir() {
            fs::remove_dir_all(&path)
        } else {
            fs::remove_file(&path)
        };
    }
}

fn write_initramfs_file(inputs: &Inputs, path: &Path) -> Result<(), ImageError> {
    let dir = path.parent().unwrap_or(&inputs.cache);
    fs::create_dir_all(dir).map_err(cache_err(dir))?;
    let applets = match &inputs.busybox {
        Some(path) => busybox_applets(path)?,
        None => Vec::new(),
    };
    let contents = InitramfsContents {
        init: &inputs.agent_bytes,
        busybox: inputs
            .busybox
            .as_ref()
            .map(|_| inputs.busybox_bytes.as_slice()),
        applets,
        extra_files: Vec::new(),
    };
    let staging = path.with_extension(format!("tmp-{}", std::process::id()));
    let file = File::create(&staging).map_err(cache_err(&staging))?;
    let mut out = write_initramfs(BufWriter::new(file), &contents)?;
    out.flush().map_err(cache_err(&staging))?;
    let file = out
        .into_inner()
        .map_err(|e| cache_err(&staging)(e.into_error()))?;
    file.sync_all().map_err(cache_err(&staging))?;
    fs::rename(&staging, path).map_err(cache_err(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leftovers_of_interrupted_builds_are_removed() {
        let cache =
            std::env::temp_dir().join(format!("guest-image-leftovers-{}", std::process::id()));
        let keep = [
            cache.join("kbuild/src"),
            cache.join("kernel/abc"),
            cache.join("initramfs"),
        ];
        let gone = [
            cache.join("kbuild.new-1/src"),
            cache.join("kernel/abc.tmp-7"),
        ];
        for dir in keep.iter().chain(&gone) {
            let _ = fs::create_dir_all(dir);
        }
        let _ = fs::write(cache.join("initramfs/k.cpio"), b"");
        let _ = fs::write(cache.join("initramfs/k.tmp-3"), b"");

        remove_leftovers(&cache);

        assert!(keep.iter().all(|d| d.is_dir()));
        assert!(cache.join("initramfs/k.cpio").is_file());
        assert!(!cache.join("kbuild.new-1").exists());
        assert!(!cache.join("kernel/abc.tmp-7").exists());
        assert!(!cache.join("initramfs/k.tmp-3").exists());
        let _ = fs::remove_dir_all(&cache);
    }

    #[test]
    fn explicit_cache_dir_wins() {
        let dir = resolve_cache_dir(
            Some(Path::new("/c")),
            Some("/e".into()),
            Some("/x".into()),
            Some("/h".into()),
        );

        assert_eq!(dir, Some(PathBuf::from("/c")));
    }

    #[test]
    fn environment_cache_dir_comes_next() {
        let dir = resolve_cache_dir(
            None,
            Some("/e".into()),
            Some("/x".into()),
            Some("/h".into()),
        );

        assert_eq!(dir, Some(PathBuf::from("/e")));
    }

    #[test]
    fn xdg_cache_home_gets_a_subdirectory() {
        let dir = resolve_cache_dir(None, None, Some("/x".into()), Some("/h".into()));

        assert_eq!(dir, Some(PathBuf::from("/x/mxc-vm")));
    }

    #[test]
    fn relative_xdg_is_ignored_for_home() {
        let dir = resolve_cache_dir(None, Some("".into()), Some("rel".into()), Some("/h".into()));

        assert_eq!(dir, Some(PathBuf::from("/h/.cache/mxc-vm")));
    }

    #[test]
    fn nothing_set_means_no_cache_dir() {
        let dir = resolve_cache_dir(None, None, None, None);

        assert_eq!(dir, None);
    }
}
