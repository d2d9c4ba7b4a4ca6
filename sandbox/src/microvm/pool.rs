//! A warm pool: microVMs restored from the ready snapshot ahead of time, waiting for a
//! policy.
//!
//! A pooled VM is restored, its agent has answered, and nothing policy-specific exists
//! yet: its share slots serve an empty placeholder and its proxy relay reaches nothing.
//! A backend given the pool ([`MicrovmOptions::pool`]) that would restore a VM of the
//! same shape takes one instead: it binds its shares into the VM's slots over the VMM's
//! control socket ([`vmm::control`]), starts its network proxy, and sends the agent its
//! mounts and links (`Control::Setup`). A background thread refills the pool, one VM at
//! a time, up to its size and within its memory budget. A pool that cannot start VMs
//! (no ready snapshot, say) stops trying after a few failures and says why in
//! [`WarmPool::status`]; backends then start their VMs as they would without it.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::{MicrovmBackend, MicrovmOptions};
use crate::{Backend, SandboxError, SandboxSpec};

/// The VMM's control socket in a pooled VM's runtime directory.
pub(super) const CONTROL_SOCKET: &str = "control.sock";
/// Consecutive failed starts after which the pool stops refilling.
const MAX_FAILURES: u32 = 3;

/// What a warm pool holds.
#[derive(Debug, Clone)]
pub struct PoolOptions {
    /// VMs kept waiting.
    pub size: usize,
    /// Guest RAM of all waiting VMs together, MiB: the pool holds at most
    /// `memory_budget_mib / mem_mib` VMs (each could come to hold all its RAM privately).
    pub memory_budget_mib: u64,
    /// Guest RAM of each VM, MiB (the ready snapshot's size: `DEFAULT_MEM_MIB`).
    pub mem_mib: u64,
    /// vCPUs of each VM.
    pub vcpus: u32,
    /// Kernel, initramfs, VMM binary, image cache and boot timeout, as for a backend.
    pub kernel: Option<PathBuf>,
    pub initrd: Option<PathBuf>,
    pub vmm_binary: Option<PathBuf>,
    pub image: guest_image::BuildOptions,
    pub boot_timeout: Option<Duration>,
}

impl Default for PoolOptions {
    fn default() -> Self {
        Self {
            size: 2,
            memory_budget_mib: 4096,
            mem_mib: super::DEFAULT_MEM_MIB,
            vcpus: 1,
            kernel: None,
            initrd: None,
            vmm_binary: None,
            image: guest_image::BuildOptions::default(),
            boot_timeout: None,
        }
    }
}

impl PoolOptions {
    /// How many VMs the pool keeps: its size, within its memory budget.
    pub fn capacity(&self) -> usize {
        let by_memory = self.memory_budget_mib / self.mem_mib.max(1);
        self.size
            .min(usize::try_from(by_memory).unwrap_or(usize::MAX))
    }
}

/// Where a pool stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolStatus {
    /// VMs waiting.
    pub ready: usize,
    /// VMs being restored.
    pub starting: usize,
    /// The most it keeps.
    pub capacity: usize,
    /// VMs handed out so far.
    pub taken: u64,
    /// Backends given the pool that started a VM of their own (none waiting, or not
    /// of the pool's shape).
    pub missed: u64,
    /// Why the pool stopped refilling, if it did.
    pub stopped: Option<String>,
}

/// A pool of restored microVMs (cheap to clone: clones share the pool). Dropping the
/// last clone stops the refill and ends every waiting VM.
#[derive(Debug, Clone)]
pub struct WarmPool {
    inner: Arc<Handle>,
}

#[derive(Debug)]
struct Handle {
    shared: Arc<Shared>,
    filler: Mutex<Option<JoinHandle<()>>>,
}

#[derive(Debug)]
struct Shared {
    opts: PoolOptions,
    state: Mutex<State>,
    changed: Condvar,
}

#[derive(Debug, Default)]
struct State {
    ready: VecDeque<MicrovmBackend>,
    starting: usize,
    taken: u64,
    missed: u64,
    failures: u32,
    stopped: Option<String>,
    shutdown: bool,
    /// The snapshot the pool's VMs are restored from (known after the first start).
    snapshot: Option<PathBuf>,
    /// Numbers the pool's VMs' runtime directories.
    started: u64,
}

impl WarmPool {
    /// Start a pool and its refill thread (which restores the first VM right away).
    pub fn new(opts: PoolOptions) -> Result<Self, SandboxError> {
        let shared = Arc::new(Shared {
            opts,
            state: Mutex::new(State::default()),
            changed: Condvar::new(),
        });
        let filler = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("mxc-warm-pool".into())
                .spawn(move || refill(&shared))
                .map_err(|e| SandboxError::io("starting the warm pool's thread", e))?
        };
        Ok(Self {
            inner: Arc::new(Handle {
                shared,
                filler: Mutex::new(Some(filler)),
            }),
        })
    }

    /// Where the pool stands.
    pub fn status(&self) -> PoolStatus {
        let state = self.inner.shared.lock();
        PoolStatus {
            ready: state.ready.len(),
            starting: state.starting,
            capacity: self.inner.shared.opts.capacity(),
            taken: state.taken,
            missed: state.missed,
            stopped: state.stopped.clone(),
        }
    }

    /// Wait until the pool is full, it stopped refilling, or `timeout` passed. Returns
    /// the status then.
    pub fn wait_full(&self, timeout: Duration) -> PoolStatus {
        let deadline = Instant::now() + timeout;
        let shared = &self.inner.shared;
        let mut state = shared.lock();
        let capacity = shared.opts.capacity();
        while state.ready.len() < capacity && state.stopped.is_none() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            state = shared
                .changed
                .wait_timeout(state, left)
                .map_or_else(|e| e.into_inner().0, |(s, _)| s);
        }
        drop(state);
        self.status()
    }

    /// The VMM process ids of the waiting VMs (for `mxc-vm bench density`).
    pub fn vmm_pids(&self) -> Vec<u32> {
        let state = self.inner.shared.lock();
        state.ready.iter().filter_map(|vm| vm.vmm_pid()).collect()
    }

    /// Count a backend that started its own VM instead of taking one.
    pub(super) fn missed(&self) {
        self.inner.shared.lock().missed += 1;
    }

    /// A waiting VM restored from `snapshot`, if there is one (whose VMM still runs).
    pub(super) fn take(&self, snapshot: &std::path::Path) -> Option<MicrovmBackend> {
        let shared = &self.inner.shared;
        let mut state = shared.lock();
        if state.snapshot.as_deref() != Some(snapshot) {
            return None;
        }
        while let Some(mut vm) = state.ready.pop_front() {
            let alive = vm.vmm.as_mut().is_some_and(|p| p.exited_early().is_none());
            if alive {
                state.taken += 1;
                shared.changed.notify_all();
                return Some(vm);
            }
            tracing::warn!("warm pool: a waiting VM had ended; discarded");
        }
        shared.changed.notify_all();
        None
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for Handle {
    fn drop(&mut self) {
        {
            let mut state = self.shared.lock();
            state.shutdown = true;
            // The waiting VMs end here (their backends' drop kills the VMMs).
            state.ready.clear();
        }
        self.shared.changed.notify_all();
        let filler = self.filler.lock().map(|mut f| f.take()).unwrap_or(None);
        if let Some(thread) = filler {
            let _ = thread.join();
        }
    }
}

/// The refill thread: keep the pool at its capacity until it shuts down.
fn refill(shared: &Shared) {
    let capacity = shared.opts.capacity();
    loop {
        let n = {
            let mut state = shared.lock();
            while !state.shutdown
                && state.stopped.is_none()
                && state.ready.len() + state.starting >= capacity
            {
                state = shared
                    .changed
                    .wait(state)
                    .unwrap_or_else(|e| e.into_inner());
            }
            if state.shutdown || state.stopped.is_some() {
                return;
            }
            state.starting += 1;
            state.started += 1;
            state.started
        };
        let started = start_one(&shared.opts, n);
        let mut state = shared.lock();
        state.starting -= 1;
        match started {
            Ok(vm) if !state.shutdown => {
                state.failures = 0;
                state.snapshot.clone_from(&vm.timeline.snapshot);
                state.ready.push_back(vm);
            }
            Ok(_) => {}
            Err(e) => {
                state.failures += 1;
                let why = crate::error_chain(&e);
                tracing::warn!(error = %why, "warm pool: a VM did not start");
                if state.failures >= MAX_FAILURES {
                    state.stopped = Some(why);
                }
            }
        }
        shared.changed.notify_all();
    }
}

/// Restore one VM for the pool, up to its agent's Ready.
fn start_one(opts: &PoolOptions, n: u64) -> Result<MicrovmBackend, SandboxError> {
    let mut policy = policy::Policy::empty(policy::PolicySource::Cli);
    policy.limits.memory_mib = Some(opts.mem_mib);
    policy.limits.vcpus = Some(opts.vcpus);
    let spec = SandboxSpec {
        policy,
        view: policy::FsView::default(),
        // `<pid>-<hex>` like every run's, so a dead process's are swept; 12 digits, so
        // never one of a service's own 8-digit sandbox ids.
        id: format!("{}-ffff{n:08x}", std::process::id()),
        net: Default::default(),
    };
    let mut vm = MicrovmBackend::new(MicrovmOptions {
        kernel: opts.kernel.clone(),
        initrd: opts.initrd.clone(),
        vmm_binary: opts.vmm_binary.clone(),
        image: opts.image.clone(),
        boot_timeout: opts.boot_timeout,
        ..MicrovmOptions::default()
    });
    vm.pooled = true;
    vm.provision(&spec)?;
    vm.start()?;
    Ok(vm)
}

impl MicrovmBackend {
    /// Take over `warm`, a pooled VM, as this backend's VM: its runtime directory
    /// replaces ours, its shares and network become this policy's, and its agent gets
    /// this policy's mounts and links.
    pub(super) fn adopt(&mut self, mut warm: MicrovmBackend) -> Result<(), SandboxError> {
        let (Some(spec), Some(runtime)) = (&self.spec, warm.runtime.take()) else {
            return Err(SandboxError::Lifecycle("adopting a VM before provision"));
        };
        let guest_owner = (!spec.policy.process.guest_root).then_some(proto::GUEST_USER);
        let write_limit = spec.policy.limits.disk_mib.map(|m| m << 20);
        if let Some(ours) = self.runtime.replace(runtime.clone()) {
            let _ = std::fs::remove_dir_all(ours);
        }
        self.vmm = warm.vmm.take();
        self.timeline = warm.timeline.clone();
        let mut client = warm
            .control
            .take()
            .ok_or(SandboxError::Lifecycle("a pooled VM without its agent"))?;
        drop(warm);
        let shares = match &self.vmm {
            Some(vmm) if vmm.jailed() => into_jail(vmm.pid(), &self.files.shares)?,
            _ => self.files.shares.clone(),
        };
        let request = vmm::control::ControlRequest::BindShares {
            shares,
            guest_owner,
            write_limit,
        };
        vmm::control::request(&runtime.join(CONTROL_SOCKET), &request).map_err(|e| {
            SandboxError::Setup {
                stage: "shares".into(),
                message: format!(
                    "the pooled VM could not take this policy's shares: {}",
                    crate::error_chain(&e)
                ),
            }
        })?;
        self.net.start(&runtime.join("vsock.sock"))?;
        self.send_setup(&mut client, "pooled")?;
        self.control = Some(client);
        self.timeline.pooled = true;
        self.timeline.agent_ready = Some(Instant::now());
        Ok(())
    }
}

/// Mount each share into the jail of the VMM `pid` at its slot's path
/// ([`vmm::jail::slot_path`]), and describe the shares as the jailed VMM sees them: at
/// that path, with their denied paths beneath it.
fn into_jail(
    pid: i32,
    shares: &[vmm::devices::fs::FsShareConfig],
) -> Result<Vec<vmm::devices::fs::FsShareConfig>, SandboxError> {
    let pid = u32::try_from(pid).map_err(|_| SandboxError::Lifecycle("a VMM without a pid"))?;
    shares
        .iter()
        .enumerate()
        .map(|(index, share)| {
            let slot = vmm::jail::slot_path(index);
            let hidden =
                vmm::jail::inject_share(pid, share, &slot).map_err(|e| SandboxError::Setup {
                    stage: "shares".into(),
                    message: format!(
                        "the pooled VM could not take the share {}: {}",
                        share.host_path.display(),
                        crate::error_chain(&e)
                    ),
                })?;
            let mut jailed = share.clone();
            jailed.denied = share
                .denied
                .iter()
                .map(|path| match path.strip_prefix(&share.host_path) {
                    Ok(rel) => slot.join(rel),
                    // Not inside the share: nothing of the share to deny (kept as it was).
                    Err(_) => path.clone(),
                })
                .collect();
            jailed.host_path = slot;
            jailed.hidden_inodes.extend(hidden);
            Ok(jailed)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pool_holds_its_size_within_its_memory_budget() {
        let opts = |size, memory_budget_mib, mem_mib| PoolOptions {
            size,
            memory_budget_mib,
            mem_mib,
            ..PoolOptions::default()
        };
        assert_eq!(opts(4, 4096, 256).capacity(), 4);
        assert_eq!(opts(50, 4096, 256).capacity(), 16);
        assert_eq!(opts(2, 100, 256).capacity(), 0);
        assert_eq!(opts(3, 1000, 0).capacity(), 3);
    }
}
