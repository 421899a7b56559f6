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

/// Physical memory of the machine in bytes (`MemTotal` from `/proc/meminfo`).
pub fn total_memory_bytes() -> Option<u64> {
    parse_kb_line(&std::fs::read_to_string("/proc/meminfo").ok()?, "MemTotal:")
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
        assert!(disk_available(Path::new("/definitely/not/here")).is_some());
    }
}
