//! What backs the hotplug reservation, and how a command line names it.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use crate::{Error, Result};

/// What backs the hotplug reservation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Backend {
    /// Private anonymous memory (transparent huge pages when the block size allows).
    Anon,
    /// A shared mapping of a memfd (shmem); discarded by punching holes.
    Memfd,
    /// A shared mapping of a hugetlb memfd with 2 MiB pages; needs a non-empty huge page pool.
    Hugetlb,
    /// A shared mapping of a file, e.g. on a tmpfs mounted with `size=` to cap the memory.
    /// Tide never truncates, resizes or unlinks a file it did not create: a directory gets an
    /// unnamed file inside it, a path that does not exist is created (and removed when the
    /// region is dropped), anything that exists is refused; the file is locked so a second
    /// Tide cannot share it. Discarded by punching holes.
    File(PathBuf),
}

impl FromStr for Backend {
    type Err = Error;

    /// Parses `"anon"`, `"memfd"`, `"hugetlb"` or `"file:/path"`.
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "anon" => Ok(Backend::Anon),
            "memfd" => Ok(Backend::Memfd),
            "hugetlb" => Ok(Backend::Hugetlb),
            _ => match s.strip_prefix("file:") {
                Some(path) if !path.is_empty() => Ok(Backend::File(PathBuf::from(path))),
                _ => Err(Error::BadBackend {
                    input: s.to_string(),
                }),
            },
        }
    }
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Backend::Anon => f.write_str("anon"),
            Backend::Memfd => f.write_str("memfd"),
            Backend::Hugetlb => f.write_str("hugetlb"),
            Backend::File(p) => write!(f, "file:{}", p.display()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backend_strings() {
        for s in ["anon", "memfd", "hugetlb", "file:/dev/shm/x"] {
            let b: Backend = s.parse().unwrap();
            assert_eq!(b.to_string(), s);
        }
        assert_eq!(
            "file:/a/b".parse::<Backend>().unwrap(),
            Backend::File(PathBuf::from("/a/b"))
        );
        for s in ["", "file:", "shm", "Anon"] {
            assert!(matches!(
                s.parse::<Backend>(),
                Err(Error::BadBackend { .. })
            ));
        }
    }
}
