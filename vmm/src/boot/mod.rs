//! Loading a Linux kernel and describing the machine to it.
//!
//! An ELF `vmlinux` with a PVH note is entered through PVH (32-bit protected mode, no
//! decompression; preferred); any other ELF or a `bzImage` through the Linux 64-bit boot
//! protocol with a zero page. Both get the same memory map, command line, initrd (high
//! in low RAM) and MP table.

pub mod cmdline;
mod cpu_state;
pub mod elf;
pub mod image;
mod linux;
pub mod mptable;
mod pvh;
pub mod tiny;

use std::fs::File;
use std::path::{Path, PathBuf};

use linux_loader::loader::bootparam::setup_header;
use linux_loader::loader::{BzImage, KernelLoader};
use vm_memory::{Bytes, GuestAddress};

use crate::hypervisor::{HypervisorError, VcpuX86};
use crate::layout::{CMDLINE_ADDR, EBDA_START, HIGH_RAM_START, MMIO_GAP_END, MPTABLE_ADDR};
use crate::memory::{low_ram_end, GuestMemoryMmap};

/// Errors loading or describing the kernel.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("cannot open {what} {path}")]
    Open {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("kernel {path} is neither an ELF vmlinux nor a bzImage")]
    UnknownFormat { path: PathBuf },
    #[error("cannot load ELF kernel {path}")]
    Elf {
        path: PathBuf,
        #[source]
        source: elf::ElfError,
    },
    #[error("cannot load kernel {path}")]
    Load {
        path: PathBuf,
        #[source]
        source: linux_loader::loader::Error,
    },
    #[error("bzImage {path} does not support the 64-bit boot protocol")]
    No64BitEntry { path: PathBuf },
    #[error(
        "initrd {path} ({size} bytes) does not fit in guest RAM below {limit:#x} above the kernel"
    )]
    InitrdTooLarge {
        path: PathBuf,
        size: u64,
        limit: u64,
    },
    #[error("cannot read initrd {path}")]
    ReadInitrd {
        path: PathBuf,
        #[source]
        source: image::ImageError,
    },
    #[error("cannot write {what} to guest memory")]
    Write {
        what: &'static str,
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    #[error("memory map has {0} entries, more than the boot protocol holds")]
    TooManyMemoryRegions(usize),
    #[error(transparent)]
    Cmdline(#[from] cmdline::CmdlineError),
    #[error(transparent)]
    Mptable(#[from] mptable::MptableError),
    #[error("cannot set the boot vCPU's registers")]
    Registers(#[source] HypervisorError),
}

/// How the kernel is entered.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum KernelEntry {
    /// PVH: 32-bit protected mode, paging off, at `entry`; RBX = `hvm_start_info`.
    Pvh { entry: u64 },
    /// Linux 64-bit boot protocol: long mode, identity-mapped, at `entry`; RSI = zero page.
    Linux64 {
        entry: u64,
        /// The bzImage's setup header (None for an ELF without a PVH note).
        header: Option<setup_header>,
    },
}

/// A kernel loaded into guest memory.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LoadedKernel {
    /// How to enter it.
    pub entry: KernelEntry,
    /// First byte above everything the kernel needs while starting (image, and for a
    /// bzImage the area it decompresses into).
    pub end: u64,
    /// Highest address the initrd may end at (exclusive).
    pub initrd_limit: u64,
}

/// An initrd placed in guest memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Initrd {
    /// Guest-physical start (page-aligned).
    pub addr: u64,
    /// Size in bytes.
    pub size: u64,
}

/// E820 memory types.
const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;

/// An initrd of an ELF kernel stays below 2 GiB (the boot protocol's classic limit).
const ELF_INITRD_LIMIT: u64 = 0x8000_0000;
/// Setup-header `xloadflags` bit: the kernel has a 64-bit entry point at +0x200.
const XLF_KERNEL_64: u16 = 1;
/// Physical address a non-relocatable bzImage decompresses to (CONFIG_PHYSICAL_START).
const DEFAULT_DECOMPRESS_ADDR: u64 = 0x100_0000;

fn open(what: &'static str, path: &Path) -> Result<File, BootError> {
    File::open(path).map_err(|source| BootError::Open {
        what,
        path: path.to_owned(),
        source,
    })
}

/// Load the kernel at `path` (ELF or bzImage, detected) into `mem`.
pub fn load_kernel(mem: &GuestMemoryMmap, path: &Path) -> Result<LoadedKernel, BootError> {
    let mut file = open("kernel", path)?;
    if elf::is_elf(&file) {
        let kernel = elf::load(mem, &file).map_err(|source| BootError::Elf {
            path: path.to_owned(),
            source,
        })?;
        let entry = match kernel.pvh_entry {
            Some(entry) => KernelEntry::Pvh { entry },
            None => KernelEntry::Linux64 {
                entry: kernel.entry,
                header: None,
            },
        };
        return Ok(LoadedKernel {
            entry,
            end: kernel.end,
            initrd_limit: ELF_INITRD_LIMIT,
        });
    }
    let load_err = |source| BootError::Load {
        path: path.to_owned(),
        source,
    };
    let res = BzImage::load(mem, None, &mut file, Some(GuestAddress(HIGH_RAM_START))).map_err(
        |e| match e {
            linux_loader::loader::Error::Bzimage(
                linux_loader::loader::bzimage::Error::InvalidBzImage,
            ) => BootError::UnknownFormat {
                path: path.to_owned(),
            },
            other => load_err(other),
        },
    )?;
    let Some(header) = res.setup_header else {
        return Err(BootError::UnknownFormat {
            path: path.to_owned(),
        });
    };
    let xloadflags = header.xloadflags;
    if xloadflags & XLF_KERNEL_64 == 0 {
        return Err(BootError::No64BitEntry {
            path: path.to_owned(),
        });
    }
    // The decompressor writes the kernel at its preferred address, up to `init_size`.
    let pref = match header.pref_address {
        0 => DEFAULT_DECOMPRESS_ADDR,
        p => p,
    };
    let decompressed_end = pref.saturating_add(u64::from(header.init_size));
    let initrd_max = u64::from(header.initrd_addr_max);
    Ok(LoadedKernel {
        entry: KernelEntry::Linux64 {
            entry: res.kernel_load.0 + 0x200,
            header: Some(header),
        },
        end: res.kernel_end.max(decompressed_end),
        initrd_limit: initrd_max.saturating_add(1).min(ELF_INITRD_LIMIT),
    })
}

/// Read the initrd at `path` into the top of low RAM, below `kernel.initrd_limit` and
/// above the kernel.
pub fn load_initrd(
    mem: &GuestMemoryMmap,
    path: &Path,
    kernel: &LoadedKernel,
) -> Result<Initrd, BootError> {
    let file = open("initrd", path)?;
    let size = file
        .metadata()
        .map_err(|source| BootError::Open {
            what: "initrd",
            path: path.to_owned(),
            source,
        })?
        .len();
    let limit = low_ram_end(mem).min(kernel.initrd_limit);
    let lowest = kernel.end.next_multiple_of(0x1000);
    let addr = limit
        .checked_sub(size)
        .map(|a| a & !0xfff)
        .filter(|&a| a >= lowest)
        .ok_or_else(|| BootError::InitrdTooLarge {
            path: path.to_owned(),
            size,
            limit,
        })?;
    image::place(mem, &file, 0, addr, size).map_err(|source| BootError::ReadInitrd {
        path: path.to_owned(),
        source,
    })?;
    Ok(Initrd { addr, size })
}

/// The guest's memory map as (start, size, E820 type).
pub fn memory_map(mem: &GuestMemoryMmap) -> Vec<(u64, u64, u32)> {
    let low_end = low_ram_end(mem);
    let total: u64 = vm_memory::GuestMemoryBackend::iter(mem)
        .map(vm_memory::GuestMemoryRegion::len)
        .sum();
    let mut map = vec![
        (0, EBDA_START, E820_RAM),
        (EBDA_START, HIGH_RAM_START - EBDA_START, E820_RESERVED),
    ];
    if low_end > HIGH_RAM_START {
        map.push((HIGH_RAM_START, low_end - HIGH_RAM_START, E820_RAM));
    }
    let high = total.saturating_sub(low_end);
    if high > 0 {
        map.push((MMIO_GAP_END, high, E820_RAM));
    }
    map
}

/// Write everything the kernel reads at entry (command line, boot information, MP
/// table, GDT and, for the 64-bit protocol, page tables) and set the boot vCPU's
/// registers.
pub fn configure(
    mem: &GuestMemoryMmap,
    vcpu: &dyn VcpuX86,
    kernel: &LoadedKernel,
    initrd: Option<Initrd>,
    cmdline: &str,
    vcpus: u8,
) -> Result<(), BootError> {
    let mut cmdline_bytes = Vec::with_capacity(cmdline.len() + 1);
    cmdline_bytes.extend_from_slice(cmdline.as_bytes());
    cmdline_bytes.push(0);
    mem.write_slice(&cmdline_bytes, GuestAddress(CMDLINE_ADDR))
        .map_err(|source| BootError::Write {
            what: "command line",
            source,
        })?;
    mptable::write(mem, MPTABLE_ADDR, vcpus)?;
    cpu_state::write_gdt(mem)?;
    let map = memory_map(mem);
    match kernel.entry {
        KernelEntry::Pvh { entry } => {
            pvh::write_start_info(mem, &map, initrd)?;
            cpu_state::enter_pvh(vcpu, entry)
        }
        KernelEntry::Linux64 { entry, header } => {
            linux::write_zero_page(mem, header, &map, initrd, cmdline.len())?;
            cpu_state::write_page_tables(mem)?;
            cpu_state::enter_long_mode(vcpu, entry)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::create_guest_memory;

    #[test]
    fn the_memory_map_skips_the_bios_area_and_the_mmio_gap() {
        let mem = create_guest_memory(4096).unwrap();

        let map = memory_map(&mem);

        assert_eq!(
            map,
            vec![
                (0, EBDA_START, E820_RAM),
                (EBDA_START, HIGH_RAM_START - EBDA_START, E820_RESERVED),
                (HIGH_RAM_START, (3 << 30) - HIGH_RAM_START, E820_RAM),
                (MMIO_GAP_END, 1 << 30, E820_RAM),
            ]
        );
    }

    #[test]
    fn a_missing_kernel_names_its_path() {
        let mem = create_guest_memory(16).unwrap();

        let err = load_kernel(&mem, Path::new("/nonexistent/vmlinux")).unwrap_err();

        assert_eq!(err.to_string(), "cannot open kernel /nonexistent/vmlinux");
    }

    #[test]
    fn a_file_that_is_no_kernel_is_refused() {
        let mem = create_guest_memory(16).unwrap();
        let path = std::env::temp_dir().join(format!("mxc-not-a-kernel-{}", std::process::id()));
        std::fs::write(&path, vec![0u8; 8192]).unwrap();

        let err = load_kernel(&mem, &path).unwrap_err();
        std::fs::remove_file(&path).unwrap();

        assert!(matches!(err, BootError::UnknownFormat { .. }), "{err}");
    }

    #[test]
    fn the_initrd_goes_to_the_top_of_low_ram_page_aligned() {
        let mem = create_guest_memory(64).unwrap();
        let path = std::env::temp_dir().join(format!("mxc-initrd-{}", std::process::id()));
        std::fs::write(&path, vec![0x5au8; 10_000]).unwrap();
        let kernel = LoadedKernel {
            entry: KernelEntry::Pvh { entry: 0x100_0000 },
            end: 0x200_0000,
            initrd_limit: ELF_INITRD_LIMIT,
        };

        let initrd = load_initrd(&mem, &path, &kernel).unwrap();
        let first: u8 = mem.read_obj(GuestAddress(initrd.addr)).unwrap();
        std::fs::remove_file(&path).unwrap();

        assert_eq!(
            initrd,
            Initrd {
                addr: (64 << 20) - 0x3000,
                size: 10_000
            }
        );
        assert_eq!(first, 0x5a);
    }

    #[test]
    fn an_initrd_that_would_overlap_the_kernel_is_refused() {
        let mem = create_guest_memory(16).unwrap();
        let path = std::env::temp_dir().join(format!("mxc-big-initrd-{}", std::process::id()));
        std::fs::write(&path, vec![0u8; 4 << 20]).unwrap();
        let kernel = LoadedKernel {
            entry: KernelEntry::Pvh { entry: 0x100_0000 },
            end: 14 << 20,
            initrd_limit: ELF_INITRD_LIMIT,
        };

        let err = load_initrd(&mem, &path, &kernel).unwrap_err();
        std::fs::remove_file(&path).unwrap();

        assert!(matches!(err, BootError::InitrdTooLarge { .. }), "{err}");
    }
}
