//! How much more memory this process's memory cgroups allow.

use std::path::PathBuf;

use crate::sys::read_u64_file;

/// Bytes the memory cgroups of this process (and their ancestors), v1 or v2, can still charge
/// before one reaches its limit; `None` when no limit can be read.
pub(crate) fn cgroup_headroom() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let mut room: Option<u64> = None;
    for line in text.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(_), Some(ctls), Some(path)) = (parts.next(), parts.next(), parts.next()) else {
            continue;
        };
        let (mount, limit_file, usage_file) = if ctls.is_empty() {
            let unified = ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"]
                .into_iter()
                .find(|m| std::path::Path::new(m).join("cgroup.controllers").exists());
            match unified {
                Some(m) => (m, "memory.max", "memory.current"),
                None => continue,
            }
        } else if ctls.split(',').any(|c| c == "memory") {
            (
                "/sys/fs/cgroup/memory",
                "memory.limit_in_bytes",
                "memory.usage_in_bytes",
            )
        } else {
            continue;
        };
        let mut dir = PathBuf::from(mount).join(path.trim_start_matches('/'));
        loop {
            let file = |f: &str| read_u64_file(&dir.join(f).to_string_lossy());
            // v2's "max" does not parse: no limit at that level.
            if let (Some(limit), Some(usage)) = (file(limit_file), file(usage_file)) {
                let r = limit.saturating_sub(usage);
                room = Some(room.map_or(r, |old| old.min(r)));
            }
            if dir.as_os_str().len() <= mount.len() || !dir.pop() {
                break;
            }
        }
    }
    room
}
