//! `mxc-vm image build|show`.

use std::io::Write;

use crate::cli::{ImageArgs, ImageCommand};
use crate::failure::{chain, Failure};

pub fn options(args: &ImageArgs) -> guest_image::BuildOptions {
    guest_image::BuildOptions {
        agent: args.agent.clone(),
        cache_dir: args.cache_dir.clone(),
        ..guest_image::BuildOptions::default()
    }
}

fn print_image(image: &guest_image::Image, json: bool) {
    let mut out = std::io::stdout().lock();
    if json {
        let _ = writeln!(
            out,
            "{}",
            serde_json::json!({
                "type": "image",
                "vmlinux": image.vmlinux, "bzimage": image.bzimage,
                "initramfs": image.initramfs, "key": image.key,
            })
        );
    } else {
        let _ = writeln!(out, "vmlinux   {}", image.vmlinux.display());
        if let Some(b) = &image.bzimage {
            let _ = writeln!(out, "bzImage   {}", b.display());
        }
        let _ = writeln!(out, "initramfs {}", image.initramfs.display());
        let _ = writeln!(out, "key       {}", image.key);
    }
}

fn print_snapshot(dir: &std::path::Path, json: bool) {
    let mut out = std::io::stdout().lock();
    if json {
        let line = serde_json::json!({ "type": "snapshot", "path": dir });
        let _ = writeln!(out, "{line}");
    } else {
        let _ = writeln!(out, "snapshot  {}", dir.display());
    }
}

/// Boot the image once as a VM without shares would be booted by `run`, and save it at
/// the agent's Ready: the ready snapshot `run` restores such VMs from. Skipped, with a
/// line saying why, where /dev/kvm cannot be used.
fn make_ready_snapshot(args: &ImageArgs) -> Result<Option<std::path::PathBuf>, Failure> {
    use sandbox::microvm::{MicrovmBackend, MicrovmOptions, SystemView};
    use sandbox::{Backend, SandboxSpec};
    let say = |message: &str| {
        if args.json {
            crate::jsonl::emit(&serde_json::json!({ "type": "notice", "message": message }));
        } else {
            eprintln!("mxc-vm: {message}");
        }
    };
    if let Err(reason) = sandbox::host::kvm_kind() {
        say(&format!("no ready snapshot made: {reason}"));
        return Ok(None);
    }
    say("the ready snapshot: a missing or stale one is made by booting the guest once");
    let spec = SandboxSpec {
        policy: policy::Policy::empty(policy::PolicySource::Cli),
        view: policy::FsView::default(),
        id: format!("snapshot-{}", std::process::id()),
        net: Default::default(),
    };
    let mut vm = MicrovmBackend::new(MicrovmOptions {
        image: options(args),
        system: SystemView::None,
        save_ready_snapshot: true,
        ..MicrovmOptions::default()
    });
    let fail =
        |e: sandbox::SandboxError| Failure::new(format!("the ready snapshot: {}", chain(&e)));
    vm.provision(&spec).map_err(fail)?;
    vm.start().map_err(fail)?;
    if vm.timeline.spawned.is_none() {
        say("the ready snapshot is up to date");
    }
    let dir = vm.timeline.snapshot.clone();
    vm.deprovision().map_err(fail)?;
    Ok(dir)
}

fn print_rootfs(root: &std::path::Path, json: bool) {
    let mut out = std::io::stdout().lock();
    if json {
        let line = serde_json::json!({ "type": "rootfs", "path": root });
        let _ = writeln!(out, "{line}");
    } else {
        let _ = writeln!(out, "rootfs    {}", root.display());
    }
}

pub fn run(cmd: ImageCommand) -> Result<i32, Failure> {
    match cmd {
        ImageCommand::Build(args) => {
            let mut progress = crate::progress::reporter(args.json);
            let image = guest_image::build(&options(&args), &mut progress)
                .map_err(|e| Failure::new(chain(&e)))?;
            print_image(&image, args.json);
            if !args.no_snapshot {
                if let Some(dir) = make_ready_snapshot(&args)? {
                    print_snapshot(&dir, args.json);
                }
            }
            if args.rootfs {
                let root = guest_image::build_rootfs(&options(&args), &mut progress)
                    .map_err(|e| Failure::new(chain(&e)))?;
                print_rootfs(&root, args.json);
            }
            Ok(0)
        }
        ImageCommand::Show(args) if args.rootfs => {
            match guest_image::cached_rootfs(&options(&args)) {
                Some(root) => {
                    print_rootfs(&root, args.json);
                    Ok(0)
                }
                None => Err(Failure::new(
                    "no rootfs is cached; run `sudo mxc-vm image build --rootfs`",
                )),
            }
        }
        ImageCommand::Show(args) => match guest_image::cached(&options(&args)) {
            Some(image) => {
                print_image(&image, args.json);
                Ok(0)
            }
            None => Err(Failure::new(
                "no guest image is cached for the current inputs; run `mxc-vm image build`",
            )),
        },
    }
}
