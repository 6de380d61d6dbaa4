//! The rule for removing a file Tide created by name: only while the path still names that same
//! file (same device and inode). Whatever was renamed or put over it since is left alone.

use std::fs::Metadata;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// A file Tide created at a path, to remove at the end if the path still names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreatedPath {
    path: PathBuf,
    dev: u64,
    ino: u64,
}

impl CreatedPath {
    /// The file at `path` whose metadata (of the file Tide just created there) is `md`.
    pub fn new(path: &Path, md: &Metadata) -> Self {
        Self {
            path: path.to_path_buf(),
            dev: md.dev(),
            ino: md.ino(),
        }
    }

    /// The file `path` names now (not following a symbolic link).
    pub fn at(path: &Path) -> io::Result<Self> {
        Ok(Self::new(path, &std::fs::symlink_metadata(path)?))
    }

    /// The path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Removes the file if the path still names it. `Ok(false)`: the path names something else
    /// now (or nothing), which is left alone.
    pub fn remove_if_ours(&self) -> io::Result<bool> {
        match std::fs::symlink_metadata(&self.path) {
            Ok(md) if md.dev() == self.dev && md.ino() == self.ino => {
                std::fs::remove_file(&self.path)?;
                Ok(true)
            }
            _ => Ok(false),
        }
    }
}
