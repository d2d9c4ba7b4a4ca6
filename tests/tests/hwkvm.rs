//! The vCPU as the guest sees it, on whatever KVM the host has: `kvm_pvm` on our
//! machines, emulated AMD SVM in the nested hardware-KVM lane (`tests/hwkvm/`, which
//! sets `MXC_VM_LANE=hwkvm`). One VM with two vCPUs answers every check.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use tests::{code, mxc_vm, require_kvm, stderr, stdout};

fn in_nested_lane() -> bool {
    std::env::var("MXC_VM_LANE").is_ok_and(|v| v == "hwkvm")
}

#[test]
fn backends_names_the_kvm_flavour_and_whether_the_host_is_a_vm() {
    require_kvm();
    let out = mxc_vm(&["backends"]);
    let text = stdout(&out);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let line = text
        .lines()
        .find(|l| l.contains("hypervisor:"))
        .unwrap_or_else(|| panic!("no hypervisor line: {text}"));
    if in_nested_lane() {
        assert!(
            line.contains("nested hardware KVM (AMD SVM): the host is itself a VM"),
            "{line}"
        );
    } else if std::path::Path::new("/sys/module/kvm_pvm").exists() {
        assert!(line.contains("kvm_pvm"), "{line}");
    } else {
        assert!(line.contains("hardware KVM"), "{line}");
    }
}

#[test]
fn the_guest_has_a_deadline_timer_its_cpus_and_no_nested_virtualization() {
    require_kvm();
    // Each word of interest on its own line, counted per CPU; then the kernel's word on
    // its timer.
    let script = "for f in tsc_deadline_timer hypervisor svm vmx; do \
                    echo \"$f=$(grep -c -w $f /proc/cpuinfo)\"; \
                  done; \
                  dmesg | grep -c 'APIC timer disabled' || true; \
                  ls /dev/kvm 2>&1 | head -1";
    let out = mxc_vm(&[
        "run",
        "--backend",
        "microvm",
        "--guest-system",
        "none",
        "--vcpus",
        "2",
        "--",
        "/bin/sh",
        "-c",
        script,
    ]);
    let text = stdout(&out);
    assert_eq!(code(&out), 0, "{text}{}", stderr(&out));
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(
        lines.get(..4),
        Some(&["tsc_deadline_timer=2", "hypervisor=2", "svm=0", "vmx=0"][..]),
        "{text}"
    );
    assert_eq!(lines.get(4), Some(&"0"), "the APIC timer works: {text}");
    assert!(
        lines.get(5).is_some_and(|l| l.contains("No such file")),
        "no /dev/kvm in the guest: {text}"
    );
}
