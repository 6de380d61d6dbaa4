//! How much more memory this process's memory cgroups allow.
//!
//! The cgroup files are found once and kept open: finding them reads `/proc/self/cgroup` and
//! probes several directories (about half a millisecond here), while reading open files takes
//! microseconds, and a PLUG checks the headroom before it populates. `/proc/self/cgroup` is
//! read again (from its open file) at each check, and the files are found again when the
//! process has moved to another cgroup.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Mutex;

use crate::sync::lock;

/// The limit and usage files of one memory cgroup level, v1 or v2.
struct Level {
    limit: File,
    usage: File,
}

/// Reads a number from the start of an open cgroup file (`None` for v2's "max" or an error).
fn read_at_start(f: &File) -> Option<u64> {
    let mut buf = [0u8; 32];
    let n = f.read_at(&mut buf, 0).ok()?;
    std::str::from_utf8(&buf[..n]).ok()?.trim().parse().ok()
}

/// `/proc/self/cgroup`, open, its text when the levels were found, and the levels.
struct Cache {
    own: File,
    text: String,
    levels: Vec<Level>,
}

static CACHE: Mutex<Option<Cache>> = Mutex::new(None);

/// Reads the whole of an open `/proc/self/cgroup`.
fn read_own(f: &File) -> Option<String> {
    let mut buf = vec![0u8; 4096];
    let n = f.read_at(&mut buf, 0).ok()?;
    buf.truncate(n);
    String::from_utf8(buf).ok()
}

/// Opens the cgroup files now (called when a region is created, so that the files a PLUG
/// reads are open before the VM runs).
pub(crate) fn prepare() {
    let _ = cgroup_headroom();
}

/// Every memory cgroup level named by `text` (`/proc/self/cgroup`) and its ancestors that has
/// a limit file, opened.
fn find_levels(text: &str) -> Vec<Level> {
    let mut out = Vec::new();
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
            if let (Ok(limit), Ok(usage)) = (
                File::open(dir.join(limit_file)),
                File::open(dir.join(usage_file)),
            ) {
                out.push(Level { limit, usage });
            }
            if dir.as_os_str().len() <= mount.len() || !dir.pop() {
                break;
            }
        }
    }
    out
}

/// Bytes the memory cgroups of this process (and their ancestors), v1 or v2, can still charge
/// before one reaches its limit; `None` when no limit can be read.
pub(crate) fn cgroup_headroom() -> Option<u64> {
    let mut cache = lock(&CACHE);
    if cache.is_none() {
        let own = File::open("/proc/self/cgroup").ok()?;
        *cache = Some(Cache {
            own,
            text: String::new(),
            levels: Vec::new(),
        });
    }
    let c = cache.as_mut()?;
    let text = read_own(&c.own)?;
    if text != c.text {
        c.levels = find_levels(&text);
        c.text = text;
    }
    let mut room: Option<u64> = None;
    for level in &c.levels {
        // v2's "max" does not parse: no limit at that level.
        if let (Some(limit), Some(usage)) =
            (read_at_start(&level.limit), read_at_start(&level.usage))
        {
            let r = limit.saturating_sub(usage);
            room = Some(room.map_or(r, |old| old.min(r)));
        }
    }
    room
}
