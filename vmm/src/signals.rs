//! SIGTERM, SIGINT and SIGHUP stop the VM the way `PUT /vm/shutdown` does; a second one while
//! stopping exits at once (terminal restored, exit status 128 + the signal's number).
//!
//! The handler only does async-signal-safe things: atomics, `write` to an event fd that the
//! event loop watches, and, for the second signal, `tcsetattr` and `_exit`.
//!
//! Not signal-hook: its safe registrations (`flag`, `pipe`) cannot restore the terminal before
//! the second signal's `_exit`, and its `low_level::register` is the same unsafe contract.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicI32, AtomicU32, Ordering};
use std::sync::OnceLock;

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// The signals that stop the VM.
pub const STOP_SIGNALS: [libc::c_int; 3] = [libc::SIGTERM, libc::SIGINT, libc::SIGHUP];

static EVT: OnceLock<EventFd> = OnceLock::new();
static EVT_FD: AtomicI32 = AtomicI32::new(-1);
static FIRST: AtomicI32 = AtomicI32::new(0);
static COUNT: AtomicU32 = AtomicU32::new(0);
/// The terminal settings to restore on a hard exit (set by the VMM before raw mode).
static TERMIOS: OnceLock<libc::termios> = OnceLock::new();

extern "C" fn on_signal(sig: libc::c_int) {
    if COUNT.fetch_add(1, Ordering::SeqCst) > 0 {
        restore_terminal();
        // SAFETY: _exit is async-signal-safe and does not return.
        unsafe { libc::_exit(128 + sig) };
    }
    FIRST.store(sig, Ordering::SeqCst);
    let fd = EVT_FD.load(Ordering::SeqCst);
    if fd >= 0 {
        let one = 1u64.to_ne_bytes();
        // SAFETY: writes 8 bytes from a live stack buffer to an event fd we own;
        // async-signal-safe.
        unsafe { libc::write(fd, one.as_ptr().cast(), one.len()) };
    }
}

/// Restores the terminal on stdin to the settings saved by [`save_terminal`], if any.
/// Async-signal-safe.
pub fn restore_terminal() {
    if let Some(t) = TERMIOS.get() {
        // SAFETY: tcsetattr reads a valid termios; async-signal-safe.
        unsafe { libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, t) };
    }
}

/// Saves the current settings of the terminal on stdin, for [`restore_terminal`].
pub fn save_terminal() {
    // SAFETY: an all-zero termios is a valid value to be overwritten by tcgetattr.
    let mut t: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: tcgetattr writes into a valid termios.
    if unsafe { libc::tcgetattr(libc::STDIN_FILENO, &mut t) } == 0 {
        let _ = TERMIOS.set(t);
    }
}

/// Installs the handlers (once per process). From then on the stop signals set the event fd
/// returned by [`event`] instead of killing the process.
pub fn install() -> io::Result<()> {
    if EVT.get().is_some() {
        return Ok(());
    }
    let evt = EventFd::new(EFD_NONBLOCK)?;
    EVT_FD.store(evt.as_raw_fd(), Ordering::SeqCst);
    let _ = EVT.set(evt);
    for sig in STOP_SIGNALS {
        // SAFETY: an all-zero sigaction is valid; the fields we need are set below.
        let mut sa: libc::sigaction = unsafe { std::mem::zeroed() };
        sa.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
        sa.sa_flags = libc::SA_RESTART;
        // SAFETY: sa_mask is a valid sigset_t to initialise.
        unsafe { libc::sigemptyset(&mut sa.sa_mask) };
        // SAFETY: installs a handler that only calls async-signal-safe functions.
        if unsafe { libc::sigaction(sig, &sa, std::ptr::null_mut()) } != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// The event fd the stop signals set, once [`install`] has run.
pub fn event() -> Option<&'static EventFd> {
    EVT.get()
}

/// The first stop signal received, if any.
pub fn received() -> Option<libc::c_int> {
    match FIRST.load(Ordering::SeqCst) {
        0 => None,
        s => Some(s),
    }
}

/// The exit status of a VM stopped by `sig`: 128 + its number, as shells report it.
pub fn exit_code(sig: libc::c_int) -> i32 {
    128 + sig
}

/// The signal's name.
pub fn name(sig: libc::c_int) -> &'static str {
    match sig {
        libc::SIGTERM => "SIGTERM",
        libc::SIGINT => "SIGINT",
        libc::SIGHUP => "SIGHUP",
        _ => "a signal",
    }
}
