//! `mxc-vmm __vmm CONFIG REPORT`: the VMM process of one microVM, which mxc-vm starts
//! from its own directory (`sandbox::microvm::vmm_program`). The same code as
//! `mxc-vm __vmm`, in a binary that holds nothing else.

use std::ffi::OsStr;

use sandbox::microvm::{vmm_main, VMM_ARG};

fn main() {
    let mut args = std::env::args_os().skip(1);
    if args.next().as_deref() != Some(OsStr::new(VMM_ARG)) {
        eprintln!(
            "mxc-vmm runs one microVM for mxc-vm (`mxc-vmm {VMM_ARG} CONFIG REPORT`); \
             use mxc-vm"
        );
        std::process::exit(2);
    }
    let rest: Vec<std::ffi::OsString> = args.collect();
    std::process::exit(vmm_main(&rest));
}
