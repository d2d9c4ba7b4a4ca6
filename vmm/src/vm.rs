//! A whole VM: build it from a [`VmConfig`], add virtio devices, run it to the end.

use std::path::Path;
use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use event_manager::{EventOps, Events, MutEventSubscriber};
use serde::{Deserialize, Serialize};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::boot::{self, cmdline::CmdlineParts, BootError, Initrd, LoadedKernel};
use crate::bus::{Bus, BusError};
use crate::config::{ConfigError, ConsoleMode, SnapshotMode, VmConfig};
use crate::devices::boot_timer::BootTimer;
use crate::devices::fs::Fs;
use crate::devices::i8042::{I8042, I8042_PORT_LEN};
use crate::devices::serial::{ConsoleOutput, SerialDevice, SerialSnapshot, CONSOLE_LIMIT};
use crate::devices::virtio::mmio::{MmioError, MmioTransport, QUEUE_NOTIFY_OFFSET};
use crate::devices::virtio::VirtioDevice;
use crate::devices::ZeroDevice;
use crate::event_loop::{EventLoop, EventLoopError};
use crate::exit::{ExitReason, VmExit, VmFailure};
use crate::hypervisor::{self, Hypervisor, HypervisorError, IoEventAddress, VcpuX86};
use crate::layout::{
    virtio_mmio_addr, virtio_mmio_irq, BOOT_TIMER_ADDR, BOOT_TIMER_SIZE, I8042_DATA_PORT,
    SERIAL_IRQ, SERIAL_PORT, SERIAL_PORT_LEN, VIRTIO_MMIO_SIZE, VIRTIO_MMIO_SLOTS,
};
use crate::memory::{self, GuestMemoryMmap, MemoryError};
use crate::snapshot::{self, Identity, SnapshotError, VmSnapshot};
use crate::timeline::{self, Stage, Timeline};
use crate::vcpu::{self, VcpuError, VcpuRunner, VcpuShared};

/// CMOS RTC index/data ports (answered with zeros: the guest's clock is kvmclock).
const CMOS_PORT: u64 = 0x70;
const CMOS_PORT_LEN: u64 = 2;

/// Errors building or running a VM.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    #[error("invalid VM configuration")]
    Config(#[from] ConfigError),
    #[error("cannot use the hypervisor")]
    Hypervisor(#[from] HypervisorError),
    #[error("cannot set up guest memory")]
    Memory(#[from] MemoryError),
    #[error("cannot boot the kernel")]
    Boot(#[from] BootError),
    #[error("cannot set up a vCPU")]
    Vcpu(#[source] VcpuError),
    #[error("cannot place a device")]
    Bus(#[from] BusError),
    #[error("cannot set up a virtio device")]
    Virtio(#[from] MmioError),
    #[error("all {VIRTIO_MMIO_SLOTS} virtio-mmio slots are in use")]
    NoVirtioSlot,
    #[error("cannot open the console file {path}")]
    Console {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot create the vsock device")]
    Vsock(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("cannot share a directory with the guest")]
    Share(#[from] crate::devices::fs::FsError),
    #[error("cannot create an eventfd")]
    EventFd(#[source] std::io::Error),
    #[error("device event loop")]
    EventLoop(#[from] EventLoopError),
    #[error("cannot start the thread for vcpu {vcpu}")]
    Thread {
        vcpu: u8,
        #[source]
        source: std::io::Error,
    },
    #[error("the VM failed")]
    Failed(#[from] VmFailure),
    #[error("snapshot")]
    Snapshot(#[from] SnapshotError),
    #[error("control socket")]
    Control(#[from] crate::control::ControlError),
    #[error("cannot start the control socket's thread")]
    ControlThread(#[source] std::io::Error),
}

/// How a VM run ended, with its boot timeline.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmExitReport {
    /// Why the VM ended.
    pub reason: ExitReason,
    /// (stage, nanoseconds since the VMM process started), in the order recorded.
    pub boot_timeline: Vec<(Stage, u64)>,
    /// The VMM process start as CLOCK_MONOTONIC nanoseconds (the timeline's origin).
    pub process_start_monotonic_ns: u64,
    /// VM exits the vCPUs handled in userspace.
    pub vcpu_exits: u64,
    /// Boot-timer writes not recorded because the timeline was full.
    pub boot_timer_dropped: u64,
    /// The kernel command line the guest got.
    pub cmdline: String,
}

/// Ends a running VM from another thread.
#[derive(Clone, Debug)]
pub struct VmHandle {
    exit: Arc<VmExit>,
    termination: Arc<EventFd>,
}

impl VmHandle {
    /// Stop the VM: `Vm::run` returns with `ExitReason::Killed` (unless it already ended).
    pub fn kill(&self) {
        self.exit.request(Ok(ExitReason::Killed));
    }
}

/// Turns a write to the termination eventfd (by the SIGTERM/SIGINT handler, which may
/// only do async-signal-safe work) into a clean VM exit, on the device thread.
#[derive(Debug)]
struct TerminationWatch {
    evt: Arc<EventFd>,
    exit: Arc<VmExit>,
}

impl MutEventSubscriber for TerminationWatch {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.evt.read();
        self.exit.request(Ok(ExitReason::Killed));
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(self.evt.as_ref(), EventSet::IN)) {
            tracing::warn!(error = ?e, "termination signals will not stop the VM");
        }
    }
}

/// The eventfd SIGTERM/SIGINT write to (-1: none).
static SIGNAL_EXIT_FD: AtomicI32 = AtomicI32::new(-1);

extern "C" fn on_termination_signal(
    _num: libc::c_int,
    _info: *mut libc::siginfo_t,
    _ctx: *mut libc::c_void,
) {
    let fd = SIGNAL_EXIT_FD.load(Ordering::SeqCst);
    if fd >= 0 {
        let one: u64 = 1;
        // SAFETY: write(2) is async-signal-safe; `one` is a live 8-byte buffer and `fd`
        // is an eventfd kept open for the life of the process.
        unsafe {
            libc::write(fd, std::ptr::addr_of!(one).cast(), 8);
        }
    }
}

/// Make SIGTERM and SIGINT end the VM behind `handle` cleanly (`ExitReason::Killed`).
/// For a process that runs one VM, such as `mxc-vm __vmm`.
pub fn kill_on_termination_signals(handle: &VmHandle) -> std::io::Result<()> {
    let fd = handle.termination.try_clone()?;
    // The duplicate stays open for the process's life: the handler may run at any time.
    let raw = std::os::fd::AsRawFd::as_raw_fd(&fd);
    std::mem::forget(fd);
    SIGNAL_EXIT_FD.store(raw, Ordering::SeqCst);
    for signal in [libc::SIGTERM, libc::SIGINT] {
        vmm_sys_util::signal::register_signal_handler(signal, on_termination_signal)
            .map_err(std::io::Error::from)?;
    }
    Ok(())
}

/// Debug log of how long each setup step took (to keep VM setup fast).
struct SetupSteps {
    last: std::time::Instant,
}

impl SetupSteps {
    fn new() -> Self {
        Self {
            last: std::time::Instant::now(),
        }
    }

    fn done(&mut self, step: &'static str) {
        let now = std::time::Instant::now();
        tracing::debug!(step, us = (now - self.last).as_micros() as u64, "vm setup");
        self.last = now;
    }
}

/// A VM ready to run.
pub struct Vm {
    config: VmConfig,
    pvm: bool,
    timeline: Arc<Timeline>,
    exit: Arc<VmExit>,
    termination: Arc<EventFd>,
    vcpus: Vec<Box<dyn VcpuX86>>,
    io_bus: Bus,
    mmio_bus: Bus,
    event_loop: EventLoop,
    virtio_slots: u32,
    /// The kernel and initrd to boot; `None` for a VM restored from a snapshot.
    boot: Option<(LoadedKernel, Option<Initrd>)>,
    /// Devices whose state a snapshot saves.
    serial: Option<Arc<Mutex<SerialDevice>>>,
    transports: Vec<Arc<Mutex<MmioTransport>>>,
    /// The virtio-fs devices of a VM with share slots, by slot.
    share_slots: Vec<Arc<Mutex<crate::devices::fs::Fs>>>,
    /// The control socket, when the config asks for one.
    control: Option<std::os::unix::net::UnixListener>,
    /// What a snapshot of this VM is made from (when the config asks for snapshots).
    identity: Option<Identity>,
    /// The snapshot this VM is being restored from (devices take their state from it).
    restoring: Option<VmSnapshot>,
    // Declared before the memory so the VM is closed before its memory is unmapped.
    vm: Arc<dyn hypervisor::Vm>,
    mem: GuestMemoryMmap,
    /// The mappings behind `mem` when this VMM made them (a cold boot; a restored VM's
    /// memory is the snapshot file's, owned by `mem`). Declared after every field that
    /// holds a clone of `mem`, and left in `self` by [`Vm::run`] (dropped after all its
    /// locals), so that it goes last and unmaps them.
    _ram: Option<memory::GuestRam>,
    _hypervisor: Box<dyn Hypervisor>,
}

impl std::fmt::Debug for Vm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vm")
            .field("config", &self.config)
            .field("pvm", &self.pvm)
            .field("virtio_slots", &self.virtio_slots)
            .finish_non_exhaustive()
    }
}

/// The first step of building a VM: the hypervisor opened and an empty VM created in it
/// ([`Vm::create`]). It touches nothing of the host but the hypervisor, so a VMM process
/// takes it on a thread of its own while it confines itself; [`Vm::build`] does the rest.
pub struct Created {
    timeline: Arc<Timeline>,
    hypervisor: Box<dyn Hypervisor>,
    vm: Arc<dyn hypervisor::Vm>,
}

impl std::fmt::Debug for Created {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Created")
            .field("hypervisor", &self.hypervisor)
            .finish_non_exhaustive()
    }
}

impl Vm {
    /// Create the VM: hypervisor VM and irqchip, guest memory, kernel and initrd, vCPUs,
    /// and the devices the config asks for. Nothing runs until [`Vm::run`].
    /// ([`Vm::create`], then [`Vm::build`].)
    pub fn new(config: VmConfig) -> Result<Self, VmmError> {
        config.validate()?;
        let created = Self::create(config.start_monotonic_ns)?;
        Self::build(config, created)
    }

    /// Open the hypervisor and create an empty VM in it. Its boot timeline counts from
    /// `start_monotonic_ns` ([`VmConfig::start_monotonic_ns`]; the process's start when
    /// `None`) and begins here ([`Stage::SetupStart`]).
    pub fn create(start_monotonic_ns: Option<u64>) -> Result<Created, VmmError> {
        let start = start_monotonic_ns
            .or_else(timeline::process_start_monotonic_ns)
            .unwrap_or_else(timeline::monotonic_ns);
        let timeline = Arc::new(Timeline::new(start));
        timeline.record(Stage::SetupStart);
        tracing::debug!(
            since_process_start_us = timeline::monotonic_ns().saturating_sub(start) / 1000,
            "vm setup begins"
        );
        let hypervisor: Box<dyn Hypervisor> = crate::hypervisor::open()?;
        let vm: Arc<dyn hypervisor::Vm> = Arc::from(hypervisor.create_vm()?);
        Ok(Created {
            timeline,
            hypervisor,
            vm,
        })
    }

    /// Build the rest of the VM `created` for `config` (the same configuration).
    pub fn build(config: VmConfig, created: Created) -> Result<Self, VmmError> {
        config.validate()?;
        let Created {
            timeline,
            hypervisor,
            vm,
        } = created;
        let pvm = config.pvm.enabled_for(hypervisor.flavour());
        let identity = match &config.snapshot {
            Some(_) => Some(snapshot_identity(&config, hypervisor.flavour(), pvm)?),
            None => None,
        };
        let loaded = match (&config.snapshot, &identity) {
            (Some(SnapshotMode::Restore(dir)), Some(identity)) => {
                Some((dir.clone(), snapshot::load(dir, identity)?))
            }
            _ => None,
        };
        // Declared before `mem`, so that on an early return below `mem` is dropped first
        // and the mappings go with the last reference to them (`GuestRam`'s drop).
        let ram;
        let mem = match &loaded {
            Some((dir, loaded)) => {
                ram = None;
                snapshot::map_memory(
                    &loaded.memory,
                    &dir.join(snapshot::MEMORY_FILE),
                    config.mem_mib,
                )?
            }
            None => {
                let made = memory::create_guest_memory(config.mem_mib)?;
                let mem = made.memory().clone();
                ram = Some(made);
                mem
            }
        };

        // The KVM calls below mostly wait in the kernel; loading the kernel image,
        // fetching the CPUID set and starting the share devices in the meantime hides that
        // wait. A restore loads neither image nor CPUID set.
        let restoring = loaded.is_some();
        let (kvm_setup, images, supported, shares) = std::thread::scope(|scope| {
            let kvm = scope.spawn(|| Self::setup_kvm(vm.as_ref(), &mem, config.vcpus, &timeline));
            let (images, supported) = if restoring {
                (Ok(None), Ok(Vec::new()))
            } else {
                (
                    Self::load_images(&mem, &config, &timeline).map(Some),
                    hypervisor.supported_cpuid(),
                )
            };
            let shares = start_share_devices(&config);
            let kvm_setup = kvm.join().unwrap_or_else(|_| {
                Err(VmmError::Hypervisor(HypervisorError::InvalidArgument(
                    "vm setup thread panicked",
                )))
            });
            (kvm_setup, images, supported, shares)
        });
        let shares = shares?;
        let mut vcpus = kvm_setup?;
        let boot = images?;
        let supported = supported?;
        let restoring = match loaded {
            Some((_, loaded)) => {
                Self::restore_cpus(vm.as_ref(), &mut vcpus, &loaded.state)?;
                timeline.record(Stage::SnapshotLoaded);
                Some(loaded.state)
            }
            None => {
                for (id, vcpu) in (0u8..).zip(&vcpus) {
                    vcpu::configure(vcpu.as_ref(), id, config.vcpus, &supported, pvm)
                        .map_err(VmmError::Vcpu)?;
                }
                None
            }
        };

        let exit = Arc::new(VmExit::new().map_err(VmmError::EventFd)?);
        let termination = Arc::new(EventFd::new(EFD_NONBLOCK).map_err(VmmError::EventFd)?);
        let mut event_loop = EventLoop::new()?;
        event_loop.add(Arc::new(Mutex::new(TerminationWatch {
            evt: termination.clone(),
            exit: exit.clone(),
        })));
        let mut this = Self {
            pvm,
            timeline: timeline.clone(),
            exit: exit.clone(),
            termination,
            vcpus,
            io_bus: Bus::new(),
            mmio_bus: Bus::new(),
            event_loop,
            virtio_slots: 0,
            boot,
            serial: None,
            transports: Vec::new(),
            share_slots: Vec::new(),
            control: None,
            identity,
            restoring,
            vm,
            mem,
            _ram: ram,
            _hypervisor: hypervisor,
            config,
        };
        this.io_bus.insert(
            u64::from(I8042_DATA_PORT),
            u64::from(I8042_PORT_LEN),
            Arc::new(Mutex::new(I8042::new(exit))),
        )?;
        this.io_bus
            .insert(CMOS_PORT, CMOS_PORT_LEN, Arc::new(Mutex::new(ZeroDevice)))?;
        let mut boot_timer = BootTimer::new(timeline);
        if let Some(SnapshotMode::SaveAtReady(_)) = this.config.snapshot {
            boot_timer = boot_timer.saving_at_ready(this.exit.clone());
        }
        this.mmio_bus.insert(
            BOOT_TIMER_ADDR,
            BOOT_TIMER_SIZE,
            Arc::new(Mutex::new(boot_timer)),
        )?;
        this.add_serial()?;
        if let Some(vsock) = this.config.vsock.clone() {
            this.add_vsock(vsock.guest_cid, &vsock.uds_path)?;
        }
        this.add_shares(shares)?;
        if let Some(path) = &this.config.control_socket {
            this.control = Some(crate::control::listen(path)?);
        }
        // The devices have their state now; the rest of the snapshot is not needed.
        this.restoring = None;
        Ok(this)
    }

    /// Put back the saved VM-wide and per-vCPU hypervisor state.
    fn restore_cpus(
        vm: &dyn hypervisor::Vm,
        vcpus: &mut [Box<dyn VcpuX86>],
        state: &VmSnapshot,
    ) -> Result<(), VmmError> {
        if state.vcpus.len() != vcpus.len() {
            return Err(SnapshotError::Unsaveable(format!(
                "the snapshot has {} vCPUs, this VM {}",
                state.vcpus.len(),
                vcpus.len()
            ))
            .into());
        }
        vm.restore_state(&state.vm)?;
        for (vcpu, saved) in vcpus.iter().zip(&state.vcpus) {
            vcpu.restore_state(saved)?;
        }
        Ok(())
    }

    /// The hypervisor side of setup: memory slots, irqchip, vCPUs.
    fn setup_kvm(
        vm: &dyn hypervisor::Vm,
        mem: &GuestMemoryMmap,
        count: u8,
        timeline: &Timeline,
    ) -> Result<Vec<Box<dyn VcpuX86>>, VmmError> {
        let mut steps = SetupSteps::new();
        // Memory slots first: registered before any in-kernel device exists they cost
        // ~0.2 ms; after the irqchip, ~4-8 ms each (measured on kvm_pvm).
        memory::map_into_vm(vm, mem)?;
        steps.done("map memory");
        vm.create_irqchip()?;
        steps.done("create irqchip");
        timeline.record(Stage::VmCreated);
        let vcpus = (0..count)
            .map(|id| vm.create_vcpu(id))
            .collect::<Result<Vec<_>, _>>()?;
        steps.done("create vcpus");
        Ok(vcpus)
    }

    /// The guest-memory side of setup: kernel and initrd.
    fn load_images(
        mem: &GuestMemoryMmap,
        config: &VmConfig,
        timeline: &Timeline,
    ) -> Result<(LoadedKernel, Option<Initrd>), VmmError> {
        let mut steps = SetupSteps::new();
        let kernel = boot::load_kernel(mem, &config.kernel)?;
        steps.done("load kernel");
        let initrd = match &config.initrd {
            Some(path) => Some(boot::load_initrd(mem, path, &kernel)?),
            None => None,
        };
        steps.done("load initrd");
        timeline.record(Stage::KernelLoaded);
        Ok((kernel, initrd))
    }

    fn add_serial(&mut self) -> Result<(), VmmError> {
        let out: Box<dyn std::io::Write + Send> = match &self.config.console {
            ConsoleMode::Off => return Ok(()),
            ConsoleMode::Stdout => Box::new(std::io::stdout()),
            ConsoleMode::File(path) => Box::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .map_err(|source| VmmError::Console {
                        path: path.clone(),
                        source,
                    })?,
            ),
        };
        let irq = self.vm.interrupt_line(SERIAL_IRQ)?;
        let out = Box::new(ConsoleOutput::new(out, CONSOLE_LIMIT));
        let saved: Option<&SerialSnapshot> =
            self.restoring.as_ref().and_then(|s| s.serial.as_ref());
        let serial = match saved {
            Some(saved) => SerialDevice::restored(irq, out, saved).map_err(|e| {
                SnapshotError::Unsaveable(format!("the serial port's saved state: {e}"))
            })?,
            None => SerialDevice::new(irq, out),
        };
        let serial = Arc::new(Mutex::new(serial));
        self.io_bus.insert(
            u64::from(SERIAL_PORT),
            u64::from(SERIAL_PORT_LEN),
            serial.clone(),
        )?;
        self.serial = Some(serial);
        Ok(())
    }

    fn add_vsock(&mut self, guest_cid: u32, uds_path: &Path) -> Result<(), VmmError> {
        let device = crate::devices::vsock::Vsock::new(u64::from(guest_cid), uds_path)
            .map_err(|e| VmmError::Vsock(Box::new(e)))?;
        self.add_virtio_device(Arc::new(Mutex::new(device)))?;
        Ok(())
    }

    /// Put the share devices in the next virtio-mmio slots, in order.
    fn add_shares(&mut self, devices: Vec<Fs>) -> Result<(), VmmError> {
        for device in devices {
            let device = Arc::new(Mutex::new(device));
            self.add_virtio_device(device.clone())?;
            if self.config.share_slots > 0 {
                self.share_slots.push(device);
            }
        }
        Ok(())
    }

    /// Put a virtio device in the next virtio-mmio slot (announced on the kernel command
    /// line, IRQ `5 + slot`) and register it with the device event loop. Returns the slot.
    pub fn add_virtio_device<D>(&mut self, device: Arc<Mutex<D>>) -> Result<u32, VmmError>
    where
        D: VirtioDevice + MutEventSubscriber + 'static,
    {
        let slot = self.virtio_slots;
        if slot >= VIRTIO_MMIO_SLOTS {
            return Err(VmmError::NoVirtioSlot);
        }
        let base = virtio_mmio_addr(slot);
        let irq = self.vm.interrupt_line(virtio_mmio_irq(slot))?;
        let mut transport = MmioTransport::new(self.mem.clone(), device.clone(), irq)?;
        if let Some(state) = &self.restoring {
            let saved = state.virtio.get(slot as usize).ok_or_else(|| {
                SnapshotError::Unsaveable(format!(
                    "the snapshot has no virtio device in slot {slot}"
                ))
            })?;
            transport.restore(saved).map_err(SnapshotError::from)?;
        }
        for (index, fd) in transport.notify_eventfds().iter().enumerate() {
            let addr = IoEventAddress::Mmio(base + QUEUE_NOTIFY_OFFSET);
            if let Err(e) = self.vm.register_ioeventfd(fd, addr, Some(index as u32)) {
                // The write then traps and the transport signals the same eventfd.
                tracing::debug!(error = %e, slot, index, "no ioeventfd for queue notify");
            }
        }
        let transport = Arc::new(Mutex::new(transport));
        self.mmio_bus
            .insert(base, VIRTIO_MMIO_SIZE, transport.clone())?;
        self.transports.push(transport);
        self.event_loop.add(device);
        self.virtio_slots += 1;
        Ok(slot)
    }

    /// A handle to stop the VM from another thread.
    pub fn handle(&self) -> VmHandle {
        VmHandle {
            exit: self.exit.clone(),
            termination: self.termination.clone(),
        }
    }

    /// Whether the `kvm_pvm` changes are applied to this VM.
    pub fn pvm(&self) -> bool {
        self.pvm
    }

    /// The kernel command line this VM will boot with.
    pub fn cmdline(&self) -> Result<String, VmmError> {
        guest_cmdline(&self.config, self.pvm, self.virtio_slots)
    }

    /// Boot the guest and block until the VM ends: guest reset/power-off, a vCPU
    /// shutdown, an error, or a [`VmHandle::kill`].
    pub fn run(self) -> Result<VmExitReport, VmmError> {
        let cmdline = self.cmdline()?;
        let Vm {
            config,
            timeline,
            exit,
            vcpus,
            termination: _,
            io_bus,
            mmio_bus,
            event_loop,
            boot,
            serial,
            transports,
            share_slots,
            control,
            identity,
            vm,
            mem,
            _hypervisor,
            ..
        } = self;
        // A restored VM resumes where it was saved; only a fresh one is set up to boot.
        let restoring = boot.is_none();
        if let Some((kernel, initrd)) = boot {
            let boot_vcpu = vcpus.first().ok_or(ConfigError::VcpuCount(0))?;
            boot::configure(
                &mem,
                boot_vcpu.as_ref(),
                &kernel,
                initrd,
                &cmdline,
                config.vcpus,
            )?;
        }

        // Restored devices look at their queues once the loop runs: the boot vCPU's
        // first entry does not wait for what that starts. A booted VM's have none yet.
        let restored = if restoring {
            transports.clone()
        } else {
            Vec::new()
        };
        let devices = event_loop.spawn(exit.clone(), move || {
            for transport in restored {
                let kicked = transport
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .kick_restored();
                if let Err(e) = kicked {
                    tracing::warn!("a restored device was not told to look at its queues: {e}");
                }
            }
        })?;
        if let Some(listener) = control {
            let slots = crate::control::ShareSlots {
                slots: share_slots,
                bound: false,
            };
            crate::control::serve(listener, slots).map_err(VmmError::ControlThread)?;
        }
        let shared = VcpuShared {
            io_bus: Arc::new(io_bus),
            mmio_bus: Arc::new(mmio_bus),
            exit: exit.clone(),
            timeline: timeline.clone(),
            exits: Arc::new(AtomicU64::new(0)),
            stop_at: config.stop_at,
            saving: matches!(config.snapshot, Some(SnapshotMode::SaveAtReady(_))),
        };
        let mut runners = (0u8..)
            .zip(vcpus)
            .map(|(id, vcpu)| VcpuRunner::new(id, vcpu, shared.clone()));
        let boot_runner = runners.next();
        let mut threads = Vec::with_capacity(usize::from(config.vcpus));
        let mut spawn_error = None;
        for (id, runner) in (1u8..).zip(runners) {
            match std::thread::Builder::new()
                .name(format!("mxc-vcpu{id}"))
                .spawn(move || runner.run())
            {
                Ok(thread) => threads.push(thread),
                Err(source) => {
                    spawn_error = Some(VmmError::Thread { vcpu: id, source });
                    exit.request(Ok(ExitReason::Killed));
                    break;
                }
            }
        }
        // The boot vCPU runs on this thread: no thread start between setup and the first
        // guest instruction. It returns once the VM is stopping.
        let mut stopped = Vec::with_capacity(usize::from(config.vcpus));
        if let Some(runner) = boot_runner {
            stopped.push(runner.run());
        }
        exit.wait();
        for thread in threads {
            if let Ok(vcpu) = thread.join() {
                stopped.push(vcpu);
            }
        }
        devices.stop();
        let vcpu_exits = shared.exits.load(Ordering::Relaxed);
        let outcome = exit.take();
        // Every vCPU and device is still now: save the VM if that is why it stopped.
        let saved = match (&outcome, &config.snapshot, identity) {
            (Ok(ExitReason::Saved), Some(SnapshotMode::SaveAtReady(dir)), Some(identity)) => {
                let parts = SnapshotParts {
                    vm: vm.as_ref(),
                    vcpus: &mut stopped,
                    expected_vcpus: config.vcpus,
                    serial: serial.as_ref(),
                    transports: &transports,
                    mem: &mem,
                };
                let result = parts.save(dir, identity);
                timeline.record(Stage::SnapshotSaved);
                Some(result)
            }
            _ => None,
        };
        drop(stopped);
        drop(shared);
        drop(vm);
        drop(mem);
        timeline.record(Stage::VmGone);

        if let Some(error) = spawn_error {
            return Err(error);
        }
        if let Some(result) = saved {
            result?;
        }
        let reason = outcome?;
        Ok(VmExitReport {
            reason,
            boot_timeline: timeline.relative(),
            process_start_monotonic_ns: timeline.start_ns(),
            vcpu_exits,
            boot_timer_dropped: timeline.dropped(),
            cmdline,
        })
    }
}

/// One virtio-fs device per configured share (and unbound slot). Every share is checked
/// and opened here, so a share the guest cannot get is an error before anything boots.
/// The devices' workers open their roots and confine themselves side by side, each
/// while the next device is made.
fn start_share_devices(config: &VmConfig) -> Result<Vec<Fs>, VmmError> {
    use crate::devices::fs::{self, ServerOptions};
    let shares = share_devices(config);
    if shares.is_empty() {
        return Ok(Vec::new());
    }
    let mut steps = SetupSteps::new();
    fs::validate_shares(&shares)?;
    let options = ServerOptions {
        limits: fs::limits_within_fd_budget(shares.len())?,
        run_as: config.share_run_as,
        guest_owner: config.share_guest_owner,
    };
    let budget = config
        .share_write_limit
        .map(|bytes| Arc::new(fs::WriteBudget::new(bytes)));
    let mountinfo = fs::share::read_mountinfo()?;
    let starting = shares
        .iter()
        .map(|share| {
            let prepared = fs::share::prepare_with(share, &mountinfo)?;
            Fs::start_prepared(prepared, options, budget.clone())
        })
        .collect::<Result<Vec<_>, _>>()?;
    let devices = starting
        .into_iter()
        .map(Fs::started)
        .collect::<Result<Vec<_>, _>>()?;
    steps.done("start shares");
    Ok(devices)
}

/// The virtio-fs devices of `config`, in slot order: its shares, then (with share slots)
/// a read-only placeholder in every slot left.
fn share_devices(config: &VmConfig) -> Vec<crate::devices::fs::FsShareConfig> {
    use crate::devices::fs::{share_tag, FsShareConfig};
    let mut shares = config.shares.clone();
    if let Some(placeholder) = &config.share_placeholder {
        for index in shares.len()..usize::from(config.share_slots) {
            shares.push(FsShareConfig {
                tag: share_tag(index),
                host_path: placeholder.clone(),
                guest_path: format!("/.mxc-vm-slot{index}").into(),
                readonly: true,
                denied: Vec::new(),
                root_allowlist: None,
                hidden_inodes: Vec::new(),
            });
        }
    }
    shares
}

/// What a snapshot saves, once every vCPU and device has stopped.
struct SnapshotParts<'a> {
    vm: &'a dyn hypervisor::Vm,
    vcpus: &'a mut [Box<dyn VcpuX86>],
    expected_vcpus: u8,
    serial: Option<&'a Arc<Mutex<SerialDevice>>>,
    transports: &'a [Arc<Mutex<MmioTransport>>],
    mem: &'a GuestMemoryMmap,
}

impl SnapshotParts<'_> {
    fn save(self, dir: &Path, identity: Identity) -> Result<snapshot::Header, SnapshotError> {
        let poisoned = |what: &str| SnapshotError::Unsaveable(format!("the {what} failed"));
        if self.vcpus.len() != usize::from(self.expected_vcpus) {
            return Err(SnapshotError::Unsaveable(
                "a vCPU thread ended abnormally".into(),
            ));
        }
        // vCPUs first: saving one completes its last I/O, which may touch the irqchip.
        let vcpus = self
            .vcpus
            .iter_mut()
            .map(|v| v.save_state())
            .collect::<Result<Vec<_>, _>>()?;
        let vm = self.vm.save_state()?;
        let serial = match self.serial {
            Some(s) => Some(s.lock().map_err(|_| poisoned("serial port"))?.save()),
            None => None,
        };
        let virtio = self
            .transports
            .iter()
            .map(|t| Ok(t.lock().map_err(|_| poisoned("virtio device"))?.save()?))
            .collect::<Result<Vec<_>, SnapshotError>>()?;
        let state = VmSnapshot {
            vm,
            vcpus,
            serial,
            virtio,
        };
        snapshot::save(dir, identity, &state, self.mem)
    }
}

/// The kernel command line of a VM of `config` with `virtio_slots` virtio-mmio devices.
fn guest_cmdline(config: &VmConfig, pvm: bool, virtio_slots: u32) -> Result<String, VmmError> {
    Ok(boot::cmdline::build(&CmdlineParts {
        virtio_slots,
        console: config.console != ConsoleMode::Off,
        pvm: if pvm { config.pvm_cmdline.as_str() } else { "" },
        extra: &config.cmdline_extra,
    })
    .map_err(BootError::from)?)
}

/// What a snapshot of the VM `config` would be made from on this host: a saved
/// snapshot whose identity differs cannot be restored into it.
pub fn snapshot_identity_for(config: &VmConfig) -> Result<Identity, VmmError> {
    let flavour = hypervisor::host_flavour();
    snapshot_identity(config, flavour, config.pvm.enabled_for(flavour))
}

/// What a snapshot of the VM `config` describes is made from.
fn snapshot_identity(
    config: &VmConfig,
    flavour: hypervisor::Flavour,
    pvm: bool,
) -> Result<Identity, VmmError> {
    let virtio_slots = u32::from(config.vsock.is_some()) + share_devices(config).len() as u32;
    let cmdline = guest_cmdline(config, pvm, virtio_slots)?;
    Ok(Identity {
        format: snapshot::FORMAT,
        vmm_version: env!("CARGO_PKG_VERSION").to_string(),
        flavour,
        host_cpu: snapshot::host_cpu(),
        kernel: snapshot::FileStamp::of(&config.kernel)?,
        initrd: config
            .initrd
            .as_deref()
            .map(snapshot::FileStamp::of)
            .transpose()?,
        cmdline_extra: cmdline,
        mem_mib: config.mem_mib,
        vcpus: config.vcpus,
    })
}
