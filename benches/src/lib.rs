//! Criterion benchmarks live in `benches/benches/`:
//! - `exec`: `mxc-vm run -- /bin/true` on the process tier against plain fork+exec;
//! - `vmm_setup`: creating a VM and loading the guest kernel (no guest code runs), the
//!   part of boot latency the VMM owns;
//! - `policy`: parsing and resolving policies, seccomp compilation, view building.
//!
//! Run with `cargo bench -p benches`. The end-user harness with stage tables is
//! `mxc-vm bench exec|boot`.
