//! What the host holds that a sandbox could leave behind, for before/after comparisons.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;

use crate::mount_table;

/// What the host holds that a sandbox could leave behind.
#[derive(Debug, PartialEq, Eq)]
pub struct HostState {
    /// Processes of ours: `mxc-vm`, its sandbox init, `bwrap`.
    pub processes: BTreeSet<String>,
    pub mounts: usize,
    /// `mxc-vm-*` cgroups in every mounted hierarchy.
    pub cgroups: BTreeSet<String>,
    /// Network namespaces some process is in.
    pub net_namespaces: usize,
    /// Unix sockets bound to a path with `mxc` in it.
    pub unix_sockets: BTreeSet<String>,
    /// `mxc*` entries in the temp directory.
    pub temp: BTreeSet<String>,
}

impl HostState {
    /// The state now.
    pub fn now() -> Self {
        let mut processes = BTreeSet::new();
        let mut namespaces = BTreeSet::new();
        for entry in std::fs::read_dir("/proc").unwrap().flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            if let Ok(ns) = std::fs::read_link(entry.path().join("ns/net")) {
                namespaces.insert(ns);
            }
            let comm = std::fs::read_to_string(entry.path().join("comm")).unwrap_or_default();
            let comm = comm.trim();
            if ["mxc-vm", "mxc-vmm", "mxc-vm-sandbox", "bwrap"].contains(&comm) {
                processes.insert(format!("{pid} {comm}"));
            }
        }
        let mut cgroups = BTreeSet::new();
        walk_cgroups(std::path::Path::new("/sys/fs/cgroup"), 0, &mut cgroups);
        let unix_sockets = std::fs::read_to_string("/proc/net/unix")
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.split_whitespace().nth(7))
            .filter(|p| p.contains("mxc"))
            .map(str::to_string)
            .collect();
        let temp = std::fs::read_dir(std::env::temp_dir())
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("mxc"))
            .collect();
        HostState {
            processes,
            mounts: mount_table().lines().count(),
            cgroups,
            net_namespaces: namespaces.len(),
            unix_sockets,
            temp,
        }
    }
}

impl HostState {
    /// What is here now that was not at `before`: processes, cgroups, sockets and temp
    /// entries not there then, and more mounts or network namespaces than then. (Things
    /// that were there and went away are no leak: another test's run ending.)
    pub fn left_since(&self, before: &HostState) -> Vec<String> {
        let mut left = Vec::new();
        let new = |now: &BTreeSet<String>, then: &BTreeSet<String>, what: &str| {
            now.difference(then)
                .map(|x| format!("{what} {x}"))
                .collect::<Vec<_>>()
        };
        left.extend(new(&self.processes, &before.processes, "process"));
        left.extend(new(&self.cgroups, &before.cgroups, "cgroup"));
        left.extend(new(&self.unix_sockets, &before.unix_sockets, "socket"));
        left.extend(new(&self.temp, &before.temp, "temp entry"));
        if self.mounts > before.mounts {
            left.push(format!("{} mounts more", self.mounts - before.mounts));
        }
        if self.net_namespaces > before.net_namespaces {
            left.push(format!(
                "{} network namespaces more",
                self.net_namespaces - before.net_namespaces
            ));
        }
        left
    }
}

fn walk_cgroups(dir: &std::path::Path, depth: usize, out: &mut BTreeSet<String>) {
    if depth > 4 {
        return;
    }
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        if !e.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        let path = e.path();
        if e.file_name().to_string_lossy().starts_with("mxc-vm-") {
            out.insert(path.display().to_string());
        }
        walk_cgroups(&path, depth + 1, out);
    }
}
