//! Binding the API socket: replacing a stale socket, refusing one in use, mode 0600 from the
//! start, and removing only the file this process made.

use std::io::{self, ErrorKind};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
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
        Ok(md) if md.file_type().is_socket() => match UnixStream::connect(path) {
            Ok(_) => return Err(ApiError::InUse(path.to_path_buf())),
            Err(e) if e.kind() == ErrorKind::ConnectionRefused => {
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
    // appears at `path` with another mode.
    let mut tmp_name = path.as_os_str().to_owned();
    tmp_name.push(format!(".{}.tmp", std::process::id()));
    let tmp = PathBuf::from(tmp_name);
    let _ = std::fs::remove_file(&tmp);
    let listener = UnixListener::bind(&tmp).map_err(|e| ApiError::Bind(path.to_path_buf(), e))?;
    let setup = || -> io::Result<CreatedPath> {
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))?;
        listener.set_nonblocking(true)?;
        rename_noreplace(&tmp, path)?;
        CreatedPath::at(path)
    };
    let ident = match setup() {
        Ok(ident) => ident,
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            return Err(ApiError::Setup(path.to_path_buf(), e));
        }
    };
    Ok((listener, ident))
}

/// Renames `from` to `to`, failing (EEXIST) rather than replacing anything at `to`.
fn rename_noreplace(from: &Path, to: &Path) -> io::Result<()> {
    use rustix::fs::{renameat_with, RenameFlags, CWD};
    Ok(renameat_with(CWD, from, CWD, to, RenameFlags::NOREPLACE)?)
}
