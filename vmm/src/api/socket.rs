//! Binding the API socket: replacing a stale socket, refusing one in use, mode 0600 from the
//! start, and removing only the file this process made.

use std::io::{self, ErrorKind};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};

use memory::CreatedPath;

/// Errors setting up the API socket.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// Another process listens on the socket.
    #[error("API socket {0} is in use by another process")]
    InUse(PathBuf),
    /// The path exists and is not a socket.
    #[error("{0} exists and is not a socket")]
    NotASocket(PathBuf),
    /// Inspecting the existing path failed.
    #[error("cannot inspect {0}: {1}")]
    Inspect(PathBuf, #[source] io::Error),
    /// Removing a stale socket failed.
    #[error("cannot remove stale API socket {0}: {1}")]
    RemoveStale(PathBuf, #[source] io::Error),
    /// Binding failed.
    #[error("cannot bind API socket {0}: {1}")]
    Bind(PathBuf, #[source] io::Error),
    /// Setting up the bound socket (mode, non-blocking) failed.
    #[error("cannot set up API socket {0}: {1}")]
    Setup(PathBuf, #[source] io::Error),
    /// Creating the timer failed.
    #[error("cannot create the API timer: {0}")]
    Timer(#[source] io::Error),
}

/// Binds a UNIX socket at `path` (mode 0600, non-blocking) and returns it with its file, which
/// is removed at the end only if `path` still names it ([`CreatedPath::remove_if_ours`]).
///
/// An existing socket nobody listens on (connecting is refused) is stale and replaced; one
/// somebody listens on gives [`ApiError::InUse`]; anything else at `path` gives
/// [`ApiError::NotASocket`].
pub(crate) fn bind(path: &Path) -> Result<(UnixListener, CreatedPath), ApiError> {
    match std::fs::symlink_metadata(path) {
        Ok(md) if md.file_type().is_socket() => match probe(path) {
            Ok(Probe::Listening) => return Err(ApiError::InUse(path.to_path_buf())),
            Ok(Probe::Stale) => {
                log::info!("removing stale API socket {}", path.display());
                std::fs::remove_file(path)
                    .map_err(|e| ApiError::RemoveStale(path.to_path_buf(), e))?;
            }
            Err(e) => return Err(ApiError::Inspect(path.to_path_buf(), e)),
        },
        Ok(_) => return Err(ApiError::NotASocket(path.to_path_buf())),
        Err(e) if e.kind() == ErrorKind::NotFound => {}
        Err(e) => return Err(ApiError::Inspect(path.to_path_buf(), e)),
    }
    // Bound under a temporary name, made 0600, then renamed into place: the socket never
    // appears at `path` with another mode. bind() creates the temporary file itself and fails
    // if anything is there, so a name already taken is skipped, never removed.
    let (listener, tmp) = bind_temporary(path)?;
    let md = match std::fs::symlink_metadata(&tmp) {
        Ok(md) => md,
        Err(e) => return Err(ApiError::Setup(path.to_path_buf(), e)),
    };
    let setup = || -> io::Result<()> {
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))?;
        listener.set_nonblocking(true)?;
        rename_noreplace(&tmp, path)
    };
    if let Err(e) = setup() {
        let _ = CreatedPath::new(&tmp, &md).remove_if_ours();
        return Err(ApiError::Setup(path.to_path_buf(), e));
    }
    Ok((listener, CreatedPath::new(path, &md)))
}

/// Binds a listener at a fresh temporary name beside `path` (`PATH.<pid>.<n>.tmp`): bind()
/// fails with EADDRINUSE on any existing file, which is left alone and the next name tried.
fn bind_temporary(path: &Path) -> Result<(UnixListener, PathBuf), ApiError> {
    const TRIES: u32 = 64;
    let mut last = None;
    for n in 0..TRIES {
        let mut name = path.as_os_str().to_owned();
        name.push(format!(".{}.{n}.tmp", std::process::id()));
        let tmp = PathBuf::from(name);
        match UnixListener::bind(&tmp) {
            Ok(l) => return Ok((l, tmp)),
            Err(e) if e.kind() == ErrorKind::AddrInUse => last = Some(e),
            Err(e) => return Err(ApiError::Bind(path.to_path_buf(), e)),
        }
    }
    Err(ApiError::Bind(
        path.to_path_buf(),
        last.unwrap_or_else(|| io::Error::from_raw_os_error(libc::EADDRINUSE)),
    ))
}

/// What is behind an existing socket file.
enum Probe {
    /// A process listens on it (it may not be accepting: its backlog may be full).
    Listening,
    /// Nobody listens (connecting is refused): a socket left behind.
    Stale,
}

/// The address of the UNIX socket at `path` (ENAMETOOLONG if it does not fit).
pub(crate) fn unix_addr(path: &Path) -> io::Result<libc::sockaddr_un> {
    use std::os::unix::ffi::OsStrExt;
    // SAFETY: sockaddr_un is plain data, for which all zeroes is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let bytes = path.as_os_str().as_bytes();
    if bytes.len() >= addr.sun_path.len() {
        return Err(io::Error::from_raw_os_error(libc::ENAMETOOLONG));
    }
    for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    Ok(addr)
}

/// Connects to the socket at `path` without blocking: a listener whose backlog is full (its
/// owner stopped accepting) answers EAGAIN at once instead of holding the connect.
fn probe(path: &Path) -> io::Result<Probe> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    // SAFETY: socket() takes no pointers; the result is checked.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh fd that nothing else owns; closed on drop.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let addr = unix_addr(path)?;
    // SAFETY: `addr` is a valid sockaddr_un of the size given; connect only reads it.
    let r = unsafe {
        libc::connect(
            fd.as_raw_fd(),
            &addr as *const libc::sockaddr_un as *const libc::sockaddr,
            std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t,
        )
    };
    if r == 0 {
        return Ok(Probe::Listening);
    }
    let e = io::Error::last_os_error();
    match e.raw_os_error() {
        // The backlog is full (EAGAIN) or the connection is on its way: somebody listens.
        Some(libc::EAGAIN) | Some(libc::EINPROGRESS) => Ok(Probe::Listening),
        Some(libc::ECONNREFUSED) => Ok(Probe::Stale),
        _ => Err(e),
    }
}

/// Renames `from` to `to`, failing (EEXIST) rather than replacing anything at `to`.
fn rename_noreplace(from: &Path, to: &Path) -> io::Result<()> {
    use rustix::fs::{renameat_with, RenameFlags, CWD};
    Ok(renameat_with(CWD, from, CWD, to, RenameFlags::NOREPLACE)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp_dir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("tide-socket-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    /// A file of the user's at any temporary name `bind` might use (the old `PATH.<pid>.tmp`
    /// and the new `PATH.<pid>.<n>.tmp`) survives, untouched, a bind and a removal.
    #[test]
    fn bind_never_removes_a_file_it_did_not_create() {
        let d = tmp_dir("tmpname");
        let path = d.join("api.sock");
        let pid = std::process::id();
        let mut users = vec![d.join(format!("api.sock.{pid}.tmp"))];
        users.extend((0..3).map(|n| d.join(format!("api.sock.{pid}.{n}.tmp"))));
        for (i, f) in users.iter().enumerate() {
            std::fs::write(f, format!("user file {i}")).unwrap();
        }
        let (listener, file) = bind(&path).unwrap();
        for (i, f) in users.iter().enumerate() {
            assert_eq!(
                std::fs::read_to_string(f).unwrap(),
                format!("user file {i}")
            );
        }
        let md = std::fs::symlink_metadata(&path).unwrap();
        assert!(md.file_type().is_socket());
        assert_eq!(md.permissions().mode() & 0o777, 0o600);
        drop(listener);
        assert!(file.remove_if_ours().unwrap());
        assert!(!path.exists());
        let left: Vec<_> = std::fs::read_dir(&d)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        assert_eq!(left.len(), users.len(), "{left:?}");
        std::fs::remove_dir_all(&d).unwrap();
    }

    /// A live socket whose owner does not accept (backlog full) is in use, found without
    /// blocking; one nobody listens on is stale and replaced.
    #[test]
    fn probe_does_not_block_on_a_full_backlog() {
        let d = tmp_dir("probe");
        let path = d.join("api.sock");
        let held = UnixListener::bind(&path).unwrap();
        // Fill the backlog: non-blocking connects until the listener refuses more.
        let mut queued = Vec::new();
        loop {
            match probe_connect(&path) {
                Some(fd) => queued.push(fd),
                None => break,
            }
            assert!(queued.len() < 100_000, "the backlog never filled");
        }
        assert!(matches!(bind(&path), Err(ApiError::InUse(_))));
        drop(queued);
        drop(held);
        // Nobody listens now: stale, replaced.
        let (_l, file) = bind(&path).unwrap();
        assert!(file.remove_if_ours().unwrap());
        std::fs::remove_dir_all(&d).unwrap();
    }

    /// A non-blocking connect that stays queued; `None` once the backlog is full.
    fn probe_connect(path: &Path) -> Option<std::os::fd::OwnedFd> {
        use std::os::fd::{FromRawFd, OwnedFd};
        use std::os::unix::ffi::OsStrExt;
        // SAFETY: as in `probe`.
        unsafe {
            let fd = libc::socket(
                libc::AF_UNIX,
                libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                0,
            );
            assert!(fd >= 0);
            let fd = OwnedFd::from_raw_fd(fd);
            let mut addr: libc::sockaddr_un = std::mem::zeroed();
            addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
            for (d, s) in addr.sun_path.iter_mut().zip(path.as_os_str().as_bytes()) {
                *d = *s as libc::c_char;
            }
            let r = libc::connect(
                std::os::fd::AsRawFd::as_raw_fd(&fd),
                &addr as *const libc::sockaddr_un as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t,
            );
            (r == 0).then_some(fd)
        }
    }
}
