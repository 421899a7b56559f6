//! The node's resources and the alarms they raise: resident memory against the memory high
//! watermark, free disk space against the disk free limit. While an alarm is on, connections
//! that publish are blocked (see `connection`); consumers keep draining.

use std::path::Path;
use std::sync::Weak;
use std::time::Duration;

use crate::broker::Broker;

/// How often resources are checked.
pub const CHECK_INTERVAL: Duration = Duration::from_secs(1);

/// Resident memory of this process in bytes (`VmRSS` from `/proc/self/status`).
pub fn resident_memory_bytes() -> Option<u64> {
    parse_kb_line(
        &std::fs::read_to_string("/proc/self/status").ok()?,
        "VmRSS:",
    )
}

/// The memory this node may use, in bytes: physical memory, or the memory limit of the
/// container (cgroup) the process runs in when that is lower. In a Kubernetes pod the
/// machine's memory is the node's, not the pod's: a watermark computed from it would let the
/// kernel's OOM killer act long before the memory alarm does.
pub fn total_memory_bytes() -> Option<u64> {
    let physical = physical_memory_bytes();
    let cgroup = cgroup_memory_limit(Path::new("/"));
    match (physical, cgroup) {
        (Some(p), Some(c)) => Some(p.min(c)),
        (p, c) => p.or(c),
    }
}

/// Physical memory of the machine in bytes (`MemTotal` from `/proc/meminfo`).
pub fn physical_memory_bytes() -> Option<u64> {
    parse_kb_line(&std::fs::read_to_string("/proc/meminfo").ok()?, "MemTotal:")
}

/// The memory limit of this process's cgroup, under `root` (`/` outside tests): cgroup v2
/// `memory.max`, cgroup v1 `memory.limit_in_bytes`, both at the cgroup filesystem's root (what
/// a container sees through its cgroup namespace) and at the process's own cgroup path from
/// `/proc/self/cgroup` (a host without cgroup namespaces). The lowest limit found wins; `max`
/// or v1's "unlimited" (a huge page-aligned number) is no limit.
pub fn cgroup_memory_limit(root: &Path) -> Option<u64> {
    let own = std::fs::read_to_string(root.join("proc/self/cgroup")).unwrap_or_default();
    let (v2_path, v1_path) = parse_proc_cgroup(&own);
    let fs = root.join("sys/fs/cgroup");
    let mut files = vec![
        fs.join("memory.max"),
        fs.join("memory/memory.limit_in_bytes"),
    ];
    if let Some(p) = v2_path {
        files.push(fs.join(p.trim_start_matches('/')).join("memory.max"));
    }
    if let Some(p) = v1_path {
        files.push(
            fs.join("memory")
                .join(p.trim_start_matches('/'))
                .join("memory.limit_in_bytes"),
        );
    }
    files
        .iter()
        .filter_map(|f| parse_cgroup_limit(&std::fs::read_to_string(f).ok()?))
        .min()
}

/// A cgroup memory limit file's content: bytes, or `None` for no limit (`max` in v2; v1 writes
/// `PAGE_COUNTER_MAX` pages, 9223372036854771712 on x86-64, for unlimited).
pub fn parse_cgroup_limit(text: &str) -> Option<u64> {
    let t = text.trim();
    if t == "max" {
        return None;
    }
    let n: u64 = t.parse().ok()?;
    // Anything from 2^60 up is "unlimited" in every kernel's encoding; 0 is not a usable limit.
    (n > 0 && n < 1 << 60).then_some(n)
}

/// The process's cgroup paths from `/proc/self/cgroup`: the v2 (unified) path (`0::/path`)
/// and the v1 memory controller's path (`N:memory:/path`, possibly among other controllers).
pub fn parse_proc_cgroup(text: &str) -> (Option<&str>, Option<&str>) {
    let mut v2 = None;
    let mut v1 = None;
    for line in text.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(_id), Some(controllers), Some(path)) = (parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        if controllers.is_empty() {
            v2 = Some(path);
        } else if controllers.split(',').any(|c| c == "memory") {
            v1 = Some(path);
        }
    }
    (v2.filter(|p| *p != "/"), v1.filter(|p| *p != "/"))
}

fn parse_kb_line(text: &str, key: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with(key))?;
    let kb: u64 = line[key.len()..].split_whitespace().next()?.parse().ok()?;
    Some(kb * 1024)
}

/// Bytes available to an unprivileged user on the filesystem holding `dir` (or its nearest
/// existing ancestor, before the data directory is created).
pub fn disk_available(dir: &Path) -> Option<u64> {
    dir.ancestors()
        .filter(|p| !p.as_os_str().is_empty())
        .chain([Path::new(".")])
        .find_map(|p| rustix::fs::statvfs(p).ok())
        .map(|s| s.f_bavail.saturating_mul(s.f_frsize))
}

/// Raises or clears the memory and disk alarms once.
pub fn check(broker: &Broker) {
    if let Some(used) = resident_memory_bytes() {
        let limit = broker.memory_limit_bytes();
        toggle(broker, "memory", used > limit, || {
            format!("memory resource limit alarm: {used} bytes used, limit {limit} bytes")
        });
    }
    if let Some(free) = disk_available(&broker.config.data_dir) {
        let limit = broker.config.disk_free_limit;
        toggle(broker, "disk", free < limit, || {
            format!("disk resource limit alarm: {free} bytes free, limit {limit} bytes")
        });
    }
}

fn toggle(broker: &Broker, resource: &str, on: bool, describe: impl Fn() -> String) {
    let active = broker.active_alarms().iter().any(|a| a == resource);
    if on && !active {
        tracing::warn!("{} set; publishers are blocked", describe());
        broker.set_alarm(resource);
    } else if !on && active {
        tracing::info!("{} cleared", describe());
        broker.clear_alarm(resource);
    }
}

/// Checks resources every [`CHECK_INTERVAL`] until the broker is gone.
pub async fn monitor(broker: Weak<Broker>) {
    let mut tick = tokio::time::interval(CHECK_INTERVAL);
    loop {
        tick.tick().await;
        let Some(b) = broker.upgrade() else { return };
        check(&b);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_proc_lines() {
        assert_eq!(
            parse_kb_line("Name: x\nVmRSS:\t  2048 kB\n", "VmRSS:"),
            Some(2 * 1024 * 1024)
        );
        assert_eq!(parse_kb_line("MemTotal: x kB", "MemTotal:"), None);
        assert!(resident_memory_bytes().is_some_and(|b| b > 0));
        assert!(total_memory_bytes().is_some_and(|b| b > 0));
        assert!(total_memory_bytes() <= physical_memory_bytes());
        assert!(disk_available(Path::new("/definitely/not/here")).is_some());
    }

    #[test]
    fn cgroup_limit_values() {
        assert_eq!(parse_cgroup_limit("max\n"), None);
        assert_eq!(parse_cgroup_limit("536870912\n"), Some(512 << 20));
        // cgroup v1 "unlimited" on x86-64 (and on 64 KiB-page arm64: 9223372036854710272).
        assert_eq!(parse_cgroup_limit("9223372036854771712\n"), None);
        assert_eq!(parse_cgroup_limit("9223372036854710272"), None);
        assert_eq!(parse_cgroup_limit("0"), None);
        assert_eq!(parse_cgroup_limit("lots"), None);
        assert_eq!(parse_cgroup_limit(""), None);
    }

    #[test]
    fn proc_self_cgroup_paths() {
        // cgroup v2 only, inside a container's namespace: the root, nothing to add.
        assert_eq!(parse_proc_cgroup("0::/\n"), (None, None));
        // systemd on a v2 host.
        assert_eq!(
            parse_proc_cgroup("0::/system.slice/warren.service\n"),
            (Some("/system.slice/warren.service"), None)
        );
        // Hybrid v1 host: the memory controller's path, possibly shared with others.
        let hybrid = "12:cpu,cpuacct:/x\n4:memory:/kubepods/burstable/pod1/abc\n0::/\n";
        assert_eq!(
            parse_proc_cgroup(hybrid),
            (None, Some("/kubepods/burstable/pod1/abc"))
        );
        assert_eq!(
            parse_proc_cgroup("3:memory,hugetlb:/m\ngarbage\n"),
            (None, Some("/m"))
        );
    }

    /// A fake filesystem root with the files a container would see.
    fn fake_root(name: &str, files: &[(&str, &str)]) -> std::path::PathBuf {
        let root = std::env::temp_dir().join(format!("warren-cg-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        for (path, content) in files {
            let p = root.join(path);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, content).unwrap();
        }
        root
    }

    #[test]
    fn cgroup_limit_from_the_filesystem() {
        // A pod with a 512 MiB limit on a cgroup v2 node.
        let v2 = fake_root(
            "v2",
            &[
                ("proc/self/cgroup", "0::/\n"),
                ("sys/fs/cgroup/memory.max", "536870912\n"),
            ],
        );
        assert_eq!(cgroup_memory_limit(&v2), Some(512 << 20));
        // No limit set.
        let none = fake_root(
            "none",
            &[
                ("proc/self/cgroup", "0::/\n"),
                ("sys/fs/cgroup/memory.max", "max\n"),
            ],
        );
        assert_eq!(cgroup_memory_limit(&none), None);
        // cgroup v1: unlimited at the root, 256 MiB in the process's own cgroup.
        let v1 = fake_root(
            "v1",
            &[
                ("proc/self/cgroup", "5:memory:/kubepods/pod1\n0::/\n"),
                (
                    "sys/fs/cgroup/memory/memory.limit_in_bytes",
                    "9223372036854771712\n",
                ),
                (
                    "sys/fs/cgroup/memory/kubepods/pod1/memory.limit_in_bytes",
                    "268435456\n",
                ),
            ],
        );
        assert_eq!(cgroup_memory_limit(&v1), Some(256 << 20));
        // Nothing mounted at all.
        assert_eq!(cgroup_memory_limit(&fake_root("empty", &[])), None);
    }
}
