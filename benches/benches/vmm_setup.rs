//! What the VMM itself costs before the guest runs: KVM VM and vCPU creation, guest
//! memory, loading the kernel and initramfs, and (stopped at the first vCPU entry) the
//! vCPU setup and teardown. Not distorted by kvm_pvm (no guest code runs), so the
//! figures are meaningful on our nested machines too.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use criterion::{criterion_group, criterion_main, Criterion};

fn bench(c: &mut Criterion) {
    if let Err(e) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        eprintln!("vmm_setup bench: /dev/kvm unusable ({e}); nothing to measure");
        return;
    }
    let Some(image) = guest_image::cached(&guest_image::BuildOptions::default()) else {
        eprintln!("vmm_setup bench: no guest image cached; run `mxc-vm image build` first");
        return;
    };
    let mut g = c.benchmark_group("vmm setup");
    g.sample_size(30);
    for (name, mem) in [("128 MiB", 128u32), ("1 GiB", 1024)] {
        g.bench_function(format!("Vm::new vmlinux+initramfs {name}"), |b| {
            b.iter(|| {
                let mut config = vmm::VmConfig::new(image.vmlinux.clone(), mem, 1);
                config.initrd = Some(image.initramfs.clone());
                let vm = vmm::Vm::new(config).unwrap();
                drop(vm);
            })
        });
    }
    // Setup, the boot vCPU's first entry (stopped right there: no guest code runs) and
    // teardown, in this process: the `--until first-entry` boot of `mxc-vm bench boot`
    // without the process spawn. Teardown (closing the KVM VM) is most of it.
    g.bench_function("Vm::new+run to first vCPU entry+teardown 256 MiB", |b| {
        b.iter(|| {
            let mut config = vmm::VmConfig::new(image.vmlinux.clone(), 256, 1);
            config.initrd = Some(image.initramfs.clone());
            config.stop_at = Some(vmm::Stage::FirstVcpuEntry);
            let report = vmm::Vm::new(config).unwrap().run().unwrap();
            assert_eq!(report.reason, vmm::ExitReason::Killed);
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
