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

/// Walks `segments` a [`CHUNK`] at a time through one buffer: `fill` puts the chunk at
/// `done` bytes into segment `s` into the buffer, `drain` takes it out; returns the CRC-32 of
/// every chunk, in segment order. Gives up with [`SnapshotError::Cancelled`] as soon as
/// `cancel()` says so (checked every chunk), so that a stop never waits for a large copy.
fn by_chunks(
    segments: &[Segment],
    cancel: &dyn Fn() -> bool,
    mut fill: impl FnMut(&Segment, u64, &mut [u8]) -> Result<(), SnapshotError>,
    mut drain: impl FnMut(&Segment, u64, &[u8]) -> Result<(), SnapshotError>,
) -> Result<u32, SnapshotError> {
    let mut crc = crc32fast::Hasher::new();
    let mut buf = vec![0u8; CHUNK];
    for s in segments {
        let mut done = 0u64;
        while done < s.len {
            if cancel() {
                return Err(SnapshotError::Cancelled);
            }
            let n = (s.len - done).min(CHUNK as u64) as usize;
            fill(s, done, &mut buf[..n])?;
            crc.update(&buf[..n]);
            drain(s, done, &buf[..n])?;
            done += n as u64;
        }
    }
    Ok(crc.finalize())
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
    let crc = by_chunks(
        segments,
        cancel,
        |s, done, buf| {
            // SAFETY: `s.host + done .. + buf.len()` lies inside a live guest memory mapping
            // that the VM keeps for its whole life (the caller's segments come from the boot
            // memory and the plugged blocks of the hotplug region, read-write while plugged);
            // `buf` is a separate allocation of that length. The vCPUs are paused, so nothing
            // writes the source while it is copied.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    (s.host + done) as *const u8,
                    buf.as_mut_ptr(),
                    buf.len(),
                )
            };
            Ok(())
        },
        |s, done, buf| file.write_all_at(buf, s.offset + done).map_err(err),
    )?;
    file.set_len(len).map_err(err)?;
    Ok(crc)
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
    by_chunks(
        segments,
        cancel,
        |s, done, buf| file.read_exact_at(buf, s.offset + done).map_err(err),
        |s, done, buf| {
            // SAFETY: `s.host + done .. + buf.len()` lies inside a live, writable guest memory
            // mapping (boot RAM, or hotplug blocks the restore has just plugged); no vCPU runs
            // yet; `buf` is a separate allocation.
            unsafe {
                std::ptr::copy_nonoverlapping(buf.as_ptr(), (s.host + done) as *mut u8, buf.len())
            };
            Ok(())
        },
    )
}
