//! The `file:PATH` backend's policy: Tide never truncates, resizes or unlinks a file it did not
//! create.
//!
//! * PATH is a directory: an unnamed file (`O_TMPFILE`) inside it; nothing is left behind.
//! * PATH does not exist: the file is created (`O_CREAT | O_EXCL`, mode 0600) and removed when
//!   the region is dropped (only if PATH still names that same file).
//! * PATH exists as anything else (a regular file, a symlink, a FIFO, a device...): refused.
//!   An existing regular file that another Tide holds is reported as in use.
//!
//! Every file Tide uses is locked (`flock(LOCK_EX)`), so a second Tide cannot share it.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::Path;

use crate::{CreatedPath, Error, Result};

/// A backing file opened under the policy of this module.
#[derive(Debug)]
pub(crate) struct BackingFile {
    /// The open, locked and sized file.
    pub(crate) file: File,
    /// A file Tide created by name (to remove at the end).
    created: Option<CreatedPath>,
}

fn refuse(path: &Path, reason: &'static str) -> Error {
    Error::BackingFileRefused {
        path: path.to_path_buf(),
        reason,
    }
}

/// Takes an exclusive, non-blocking lock on `file`.
fn lock(file: &File) -> io::Result<()> {
    rustix::fs::flock(file, rustix::fs::FlockOperation::NonBlockingLockExclusive)
        .map_err(io::Error::from)
}

/// Whether an existing regular file at `path` is locked by another process (another Tide).
fn locked_by_other(path: &Path) -> bool {
    let Ok(f) = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
    else {
        return false;
    };
    matches!(lock(&f), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
}

impl BackingFile {
    /// Opens (creates) the backing file for a region of `size` bytes under the module's policy.
    pub(crate) fn open(path: &Path, size: u64) -> Result<Self> {
        let io_err = |source| Error::File {
            path: path.to_path_buf(),
            size,
            source,
        };
        let (file, created) = match std::fs::symlink_metadata(path) {
            Ok(md) if md.file_type().is_dir() => (Self::unnamed_in(path).map_err(io_err)?, None),
            Ok(md) if md.file_type().is_symlink() => {
                return Err(refuse(
                    path,
                    "is a symbolic link (Tide does not follow links)",
                ))
            }
            Ok(md) if md.file_type().is_file() => {
                return Err(if locked_by_other(path) {
                    refuse(path, "is in use by another Tide")
                } else {
                    refuse(
                        path,
                        "already exists (Tide only uses files it creates: give a new path or a directory)",
                    )
                });
            }
            Ok(md) => {
                let t = md.file_type();
                return Err(refuse(
                    path,
                    if t.is_fifo() {
                        "is a FIFO, not a regular file"
                    } else if t.is_char_device() || t.is_block_device() {
                        "is a device node, not a regular file"
                    } else if t.is_socket() {
                        "is a socket, not a regular file"
                    } else {
                        "is not a regular file"
                    },
                ));
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                // O_EXCL | O_NOFOLLOW: whatever appeared at PATH since the check is not touched.
                let file = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
                    .open(path)
                    .map_err(|e| match e.kind() {
                        io::ErrorKind::AlreadyExists => {
                            refuse(path, "appeared while Tide was creating it")
                        }
                        _ => io_err(e),
                    })?;
                let md = file.metadata().map_err(io_err)?;
                (file, Some(CreatedPath::new(path, &md)))
            }
            Err(e) => return Err(io_err(e)),
        };
        // From here on, dropping `this` removes a file we created.
        let this = BackingFile { file, created };
        lock(&this.file).map_err(|e| match e.kind() {
            io::ErrorKind::WouldBlock => refuse(path, "is in use by another Tide"),
            _ => io_err(e),
        })?;
        this.file.set_len(size).map_err(io_err)?;
        Ok(this)
    }

    /// An unnamed file (`O_TMPFILE`) in directory `dir`: it disappears with its last reference.
    fn unnamed_in(dir: &Path) -> io::Result<File> {
        use rustix::fs::{Mode, OFlags};
        let flags = OFlags::TMPFILE | OFlags::RDWR | OFlags::CLOEXEC;
        Ok(File::from(rustix::fs::open(
            dir,
            flags,
            Mode::from_raw_mode(0o600),
        )?))
    }

    /// Bytes of storage allocated to the file (`st_blocks` * 512): for a tmpfs or hugetlbfs file
    /// this is the memory it holds.
    pub(crate) fn allocated_bytes(file: &File) -> io::Result<u64> {
        Ok(file.metadata()?.blocks().saturating_mul(512))
    }
}

impl Drop for BackingFile {
    fn drop(&mut self) {
        // Remove the file only if PATH still names the file we created (someone may have
        // renamed it and put another file there). Unlinked while still locked.
        if let Some(created) = &self.created {
            let path = created.path().display();
            match created.remove_if_ours() {
                Ok(true) => {}
                Ok(false) => log::warn!("backing file {path} was moved or replaced; leaving it"),
                Err(e) => log::warn!("cannot remove backing file {path}: {e}"),
            }
        }
    }
}
