//! The memory file: boot RAM at offset 0 (its regions one after the other), then the hotplug
//! region from offset `boot RAM size`, block `i` at `boot + i * block_size`. Only plugged
//! blocks are written; unplugged ones are skipped with a seek and stay holes, so the file's
//! allocated size is boot RAM plus plugged whatever the region's size. No zeros are written.
//!
//! Both ways copy through a 1 MiB buffer and fold every byte into one CRC-32, which the state
//! file keeps: a memory file that is not the snapshot's is refused before the guest runs.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;

use super::SnapshotError;

/// Bytes copied at a time.
const CHUNK: usize = 1 << 20;

/// One stretch of guest memory and where it lies in the memory file.
#[derive(Debug, Clone, Copy)]
pub struct Segment {
    /// Host address of its first byte.
    pub host: u64,
    /// Its length.
    pub len: u64,
    /// Its offset in the memory file.
    pub offset: u64,
}

/// Creates `path` as a new file, mode 0600, refusing to touch an existing one.
pub fn create_new(path: &Path) -> Result<File, SnapshotError> {
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::AlreadyExists => SnapshotError::Exists(path.to_path_buf()),
            _ => SnapshotError::File(path.to_path_buf(), e),
        })
}

/// A file this process created; removed on drop unless [`Created::keep`] was called, and only
/// while the path still names the same file (memory's [`memory::CreatedPath`] rule).
pub struct Created {
    path: memory::CreatedPath,
    keep: bool,
}

impl Created {
    /// Remembers `file`, just created at `path`.
    pub fn new(path: &Path, file: &File) -> Result<Self, SnapshotError> {
        let m = file
            .metadata()
            .map_err(|e| SnapshotError::File(path.to_path_buf(), e))?;
        Ok(Self {
            path: memory::CreatedPath::new(path, &m),
            keep: false,
        })
    }

    /// The file is complete: keep it.
    pub fn keep(mut self) {
        self.keep = true;
    }
}

impl Drop for Created {
    fn drop(&mut self) {
        if self.keep {
            return;
        }
        if let Err(e) = self.path.remove_if_ours() {
            log::warn!(
                "cannot remove the half-written {}: {e}",
                self.path.path().display()
            );
        }
    }
}

/// Writes `segments` into `file` at their offsets and sets its length to `len` (the rest
/// stays holes). Returns the CRC-32 of the bytes written, in segment order. Gives up with
/// [`SnapshotError::Cancelled`] as soon as `cancel()` says so (checked every MiB), so that a
/// stop never waits for a large copy.
pub fn write(
    file: &File,
    path: &Path,
    segments: &[Segment],
    len: u64,
    cancel: &dyn Fn() -> bool,
) -> Result<u32, SnapshotError> {
    let err = |e| SnapshotError::File(path.to_path_buf(), e);
    let mut crc = crc32fast::Hasher::new();
    let mut buf = vec![0u8; CHUNK];
    for s in segments {
        let mut done = 0u64;
        while done < s.len {
            if cancel() {
                return Err(SnapshotError::Cancelled);
            }
            let n = (s.len - done).min(CHUNK as u64) as usize;
            // SAFETY: `s.host + done .. + n` lies inside a live guest memory mapping that the
            // VM keeps for its whole life (the caller's segments come from the boot memory and
            // the plugged blocks of the hotplug region, read-write while plugged); `buf` is a
            // separate allocation of at least `n` bytes. The vCPUs are paused, so nothing
            // writes the source while it is copied.
            unsafe {
                std::ptr::copy_nonoverlapping((s.host + done) as *const u8, buf.as_mut_ptr(), n)
            };
            crc.update(&buf[..n]);
            file.write_all_at(&buf[..n], s.offset + done).map_err(err)?;
            done += n as u64;
        }
    }
    file.set_len(len).map_err(err)?;
    Ok(crc.finalize())
}

/// Reads `segments` from `file` into guest memory; returns the CRC-32 of the bytes read.
/// Gives up like [`write`] when `cancel()` says so.
pub fn read(
    file: &File,
    path: &Path,
    segments: &[Segment],
    cancel: &dyn Fn() -> bool,
) -> Result<u32, SnapshotError> {
    let err = |e| SnapshotError::File(path.to_path_buf(), e);
    let mut crc = crc32fast::Hasher::new();
    let mut buf = vec![0u8; CHUNK];
    for s in segments {
        let mut done = 0u64;
        while done < s.len {
            if cancel() {
                return Err(SnapshotError::Cancelled);
            }
            let n = (s.len - done).min(CHUNK as u64) as usize;
            file.read_exact_at(&mut buf[..n], s.offset + done)
                .map_err(err)?;
            crc.update(&buf[..n]);
            // SAFETY: `s.host + done .. + n` lies inside a live, writable guest memory mapping
            // (boot RAM, or hotplug blocks the restore has just plugged); no vCPU runs yet.
            unsafe { std::ptr::copy_nonoverlapping(buf.as_ptr(), (s.host + done) as *mut u8, n) };
            done += n as u64;
        }
    }
    Ok(crc.finalize())
}
