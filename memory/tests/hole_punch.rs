//! A `file:` backend on a file system that cannot punch holes (ramfs) could never give
//! unplugged memory back: it is refused at start with one line, and leaves nothing behind.
//! No KVM needed; mounting ramfs needs root (the test says SKIP without it).

use std::path::PathBuf;
use std::process::Command;

use memory::{Backend, Error, GuestAddress, HotplugLayout, HotplugRegion};

const MIB: u64 = 1 << 20;

/// A ramfs mounted on a fresh directory, unmounted and removed on drop.
struct Ramfs(PathBuf);

impl Ramfs {
    fn mount() -> Result<Ramfs, String> {
        let p = std::env::temp_dir().join(format!("tide-ramfs-{}", std::process::id()));
        std::fs::create_dir_all(&p).map_err(|e| e.to_string())?;
        let out = Command::new("mount")
            .args(["-t", "ramfs", "ramfs"])
            .arg(&p)
            .output()
            .map_err(|e| e.to_string())?;
        if !out.status.success() {
            let _ = std::fs::remove_dir(&p);
            return Err(String::from_utf8_lossy(&out.stderr).trim().to_string());
        }
        Ok(Ramfs(p))
    }
}

impl Drop for Ramfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
        let _ = std::fs::remove_dir(&self.0);
    }
}

#[test]
fn a_file_system_without_hole_punching_is_refused() {
    let fs = match Ramfs::mount() {
        Ok(fs) => fs,
        Err(why) => {
            println!(
                "SKIP a_file_system_without_hole_punching_is_refused: cannot mount ramfs ({why})"
            );
            return;
        }
    };
    let layout = HotplugLayout {
        base: GuestAddress(1 << 32),
        size: 64 * MIB,
        block_size: 2 * MIB,
    };
    for path in [fs.0.join("guest-ram"), fs.0.clone()] {
        let backend = Backend::File(path.clone());
        let err = HotplugRegion::new(&layout, backend).unwrap_err();
        assert!(matches!(err, Error::NoHolePunch { .. }), "{err}");
        let line = err.to_string();
        assert_eq!(line.lines().count(), 1, "{line}");
        assert!(line.contains("does not punch holes"), "{line}");
        // Nothing of Tide's left behind (a file it created is removed).
        assert_eq!(std::fs::read_dir(&fs.0).unwrap().count(), 0, "{path:?}");
    }
}
