//! Writes an initramfs with our cpio writer, for booting test programs by hand:
//!
//! `cargo run -p guest-image --example mkinitramfs -- --init ./selftest [--busybox /bin/busybox] -o test.cpio`

use std::error::Error;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::PathBuf;

use guest_image::{busybox_applets, check_static_x86_64, write_initramfs, InitramfsContents};

fn main() -> Result<(), Box<dyn Error>> {
    let mut init = None;
    let mut busybox = None;
    let mut out = None;
    let mut args = std::env::args_os().skip(1);
    while let Some(arg) = args.next() {
        let value = args.next().ok_or("missing value")?;
        match arg.to_str() {
            Some("--init") => init = Some(PathBuf::from(value)),
            Some("--busybox") => busybox = Some(PathBuf::from(value)),
            Some("-o") => out = Some(PathBuf::from(value)),
            _ => return Err(format!("unknown argument {arg:?}").into()),
        }
    }
    let init = init.ok_or("--init is required")?;
    let out = out.ok_or("-o is required")?;

    let init_bytes = std::fs::read(&init)?;
    check_static_x86_64(&init_bytes).map_err(|e| format!("{}: {e}", init.display()))?;
    let busybox_bytes = busybox.as_ref().map(std::fs::read).transpose()?;
    let applets = match &busybox {
        Some(path) => busybox_applets(path)?,
        None => Vec::new(),
    };
    let contents = InitramfsContents {
        init: &init_bytes,
        busybox: busybox_bytes.as_deref(),
        applets,
        extra_files: Vec::new(),
    };
    let mut writer = write_initramfs(BufWriter::new(File::create(&out)?), &contents)?;
    writer.flush()?;
    println!("wrote {}", out.display());
    Ok(())
}
