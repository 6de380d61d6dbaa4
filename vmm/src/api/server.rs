//! The API server: a non-blocking HTTP/1.1 server on a UNIX socket, driven by the VMM's event
//! loop.
//!
//! One [`ApiServer`] subscriber owns the listener, every client connection and a timer; the
//! epoll `data` of each registration tells them apart (`LISTENER`, `TIMER`, or a
//! connection id). Each connection reads one request into a bounded buffer, gets one answer
//! and is closed. Answers are written without blocking; what the socket does not take at once
//! is flushed on `EPOLLOUT`. A long poll parks its connection until the timer, armed at
//! [`POLL_TICK`] while any long poll is pending, finds it settled or timed out.

use std::collections::HashMap;
use std::io::{self, ErrorKind, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use event_manager::{EventOps, Events, MutEventSubscriber};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::timerfd::TimerFd;

use super::http::{parse_request, Parse, Response};
use super::routes::{handle, long_poll_answer, no_hotplug, settled, shutting_down, Outcome};
use super::socket;
use super::{ApiBackend, MemoryStatus};
use crate::event_loop::watch;
use memory::CreatedPath;

pub use super::routes::{DEFAULT_WAIT_MS, MAX_WAIT_MS};
pub use super::socket::ApiError;

/// Epoll data of the listening socket.
const LISTENER: u32 = 0;
/// Epoll data of the timer.
const TIMER: u32 = 1;
/// Epoll data of the optional wake-up event fd.
const WAKE: u32 = 2;
/// Epoll data of the stop event fd.
const STOP: u32 = 3;
/// First connection id (connections use the epoll data values from here on).
const FIRST_CONN: u32 = 4;

/// Most connections open at once that are not parked long polls; more are answered 503 and
/// closed. Parked long polls have their own bound, [`MAX_WAITERS`], so they can never take the
/// room that a PATCH, a GET or a shutdown needs.
pub const MAX_CONNECTIONS: usize = 64;
/// Most long polls parked at once; one more is answered 503.
pub const MAX_WAITERS: usize = 64;
/// How often pending long polls are re-checked.
pub const POLL_TICK: Duration = Duration::from_millis(20);
/// Timer period while connections are open but no long poll is pending (for the deadlines).
const IDLE_TICK: Duration = Duration::from_millis(250);
/// Time a client has to send its whole request (408 after that).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Time a client has to read its whole answer (the connection is dropped after that).
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Bytes read from a socket at a time.
const READ_CHUNK: usize = 4096;

/// Where a connection is in its single request/answer exchange.
enum State {
    /// Reading the request.
    Reading,
    /// A long poll waiting for `plugged_size == requested_size` until the deadline.
    Waiting { deadline: Instant },
    /// Sending `buf[pos..]`; the connection is closed once it is sent.
    Writing {
        buf: Vec<u8>,
        pos: usize,
        since: Instant,
    },
}

struct Conn {
    stream: UnixStream,
    rbuf: Vec<u8>,
    state: State,
    opened: Instant,
}

/// The API server. Register it with the VMM's `EventManager`; see the [module](super) docs for
/// the endpoints.
pub struct ApiServer {
    listener: UnixListener,
    path: PathBuf,
    /// The socket file we created, so that drop removes only ours.
    socket_file: CreatedPath,
    backend: Arc<dyn ApiBackend>,
    conns: HashMap<u32, Conn>,
    next_id: u32,
    timer: TimerFd,
    tick: Option<Duration>,
    wake: Option<EventFd>,
    /// Signalled by [`StopHandle::stop`]; afterwards every request is answered 503.
    stop: EventFd,
    stopping: bool,
    /// Connections open (shared with the [`StopHandle`], which waits for them to drain).
    open: Arc<AtomicUsize>,
    waiters: usize,
    /// `waiters`, shared with the [`StopHandle`].
    parked: Arc<AtomicUsize>,
    /// The listener is not watched: `accept` ran out of a resource (fds, memory). Watched
    /// again when a connection closes or at the next timer tick.
    listener_paused: bool,
    /// Whether running out has been logged (once per run).
    out_logged: bool,
}

/// Lets the VMM stop the API: waiting long polls and new requests get 503 "shutting down",
/// answers being sent are flushed.
#[derive(Debug)]
pub struct StopHandle {
    evt: EventFd,
    open: Arc<AtomicUsize>,
    parked: Arc<AtomicUsize>,
}

impl StopHandle {
    /// Asks the server (on its event loop) to answer everything pending and stop serving.
    pub fn stop(&self) {
        let _ = self.evt.write(1);
    }

    /// Connections still open.
    pub fn open_connections(&self) -> usize {
        self.open.load(Ordering::SeqCst)
    }

    /// Long polls parked now.
    pub fn parked_long_polls(&self) -> usize {
        self.parked.load(Ordering::SeqCst)
    }
}

impl std::fmt::Debug for ApiServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiServer")
            .field("path", &self.path)
            .field("connections", &self.conns.len())
            .finish_non_exhaustive()
    }
}

impl ApiServer {
    /// Binds the API socket at `path` (mode 0600, non-blocking).
    ///
    /// An existing socket nobody listens on (connecting is refused) is stale and replaced; one
    /// somebody listens on gives [`ApiError::InUse`]; anything else at `path` gives
    /// [`ApiError::NotASocket`]. The socket file is removed when the server is dropped.
    pub fn bind(path: &Path, backend: Arc<dyn ApiBackend>) -> Result<Self, ApiError> {
        let (listener, socket_file) = socket::bind(path)?;
        let server = ApiServer {
            listener,
            path: path.to_path_buf(),
            socket_file,
            backend,
            conns: HashMap::new(),
            next_id: FIRST_CONN,
            timer: TimerFd::new().map_err(|e| ApiError::Timer(e.into()))?,
            tick: None,
            wake: None,
            stop: EventFd::new(libc::EFD_NONBLOCK).map_err(ApiError::Timer)?,
            stopping: false,
            open: Arc::new(AtomicUsize::new(0)),
            waiters: 0,
            parked: Arc::new(AtomicUsize::new(0)),
            listener_paused: false,
            out_logged: false,
        };
        // Dropping `server` on error removes the socket file.
        set_nonblocking_fd(&server.timer).map_err(ApiError::Timer)?;
        Ok(server)
    }

    /// Re-checks pending long polls whenever `evt` is signalled (the VMM signals it when the
    /// memory state may have changed), so they answer at once instead of at the next tick.
    pub fn with_wakeup(mut self, evt: EventFd) -> Self {
        self.wake = Some(evt);
        self
    }

    /// A handle to stop this server from another owner (the VMM's run loop).
    pub fn stop_handle(&self) -> io::Result<StopHandle> {
        Ok(StopHandle {
            evt: self.stop.try_clone()?,
            open: self.open.clone(),
            parked: self.parked.clone(),
        })
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn accept(&mut self, ops: &mut EventOps) {
        loop {
            let stream = match self.listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                // The client left before being accepted: the next one.
                Err(e) if e.raw_os_error() == Some(libc::ECONNABORTED) => continue,
                Err(e) => {
                    // EMFILE, ENFILE, ENOBUFS, ENOMEM...: the pending connection stays queued
                    // and the listener readable, so watching it would spin. Stop watching it
                    // until a connection closes or the next tick.
                    if !self.out_logged {
                        self.out_logged = true;
                        log::warn!(
                            "API socket: accept failed: {e}; not accepting until a connection closes or an fd is free"
                        );
                    }
                    self.pause_listener(ops);
                    return;
                }
            };
            if let Err(e) = stream.set_nonblocking(true) {
                log::warn!("API socket: cannot make a connection non-blocking: {e}");
                continue;
            }
            if self.conns.len() - self.waiters >= MAX_CONNECTIONS || self.stopping {
                // Best effort: the socket buffer of a fresh connection takes this at once.
                let r = if self.stopping {
                    shutting_down()
                } else {
                    Response::error(503, "too many API connections")
                };
                let _ = (&stream).write(&r.to_bytes());
                continue;
            }
            let id = self.new_id();
            let ev = Events::with_data(&stream, id, EventSet::IN | EventSet::READ_HANG_UP);
            if let Err(e) = ops.add(ev) {
                log::warn!("API socket: cannot watch a connection: {e:?}");
                continue;
            }
            self.conns.insert(
                id,
                Conn {
                    stream,
                    rbuf: Vec::new(),
                    state: State::Reading,
                    opened: Instant::now(),
                },
            );
        }
    }

    fn pause_listener(&mut self, ops: &mut EventOps) {
        if !self.listener_paused {
            let fd = self.listener.as_raw_fd();
            let _ = ops.remove(Events::with_data_raw(fd, LISTENER, EventSet::empty()));
            self.listener_paused = true;
        }
    }

    /// Watches the listener again after [`Self::pause_listener`] (a connection closed, or the
    /// timer ticked); the pending connections it has are taken at once.
    fn resume_listener(&mut self, ops: &mut EventOps) {
        if self.listener_paused {
            self.listener_paused = false;
            watch(ops, self.listener.as_raw_fd(), LISTENER, "the API socket");
        }
    }

    fn new_id(&mut self) -> u32 {
        loop {
            let id = self.next_id;
            self.next_id = self.next_id.checked_add(1).unwrap_or(FIRST_CONN);
            if !self.conns.contains_key(&id) {
                return id;
            }
        }
    }

    fn close(&mut self, id: u32, ops: &mut EventOps) {
        if let Some(conn) = self.conns.remove(&id) {
            if matches!(conn.state, State::Waiting { .. }) {
                self.waiters -= 1;
            }
            let _ = ops.remove(Events::with_data(&conn.stream, id, EventSet::empty()));
            // An fd is free again.
            drop(conn);
            self.resume_listener(ops);
        }
    }

    /// Stops serving: every parked long poll and every request not yet answered gets 503
    /// "shutting down"; answers being sent are still flushed.
    fn stop(&mut self, ops: &mut EventOps) {
        let _ = self.stop.read();
        self.stopping = true;
        let ids: Vec<u32> = self.conns.keys().copied().collect();
        for id in ids {
            if let Some(c) = self.conns.get(&id) {
                if !matches!(c.state, State::Writing { .. }) {
                    self.respond(id, shutting_down(), ops);
                }
            }
        }
    }

    fn conn_event(&mut self, id: u32, set: EventSet, ops: &mut EventOps) {
        let Some(conn) = self.conns.get_mut(&id) else {
            return;
        };
        if set.contains(EventSet::ERROR) {
            return self.close(id, ops);
        }
        match conn.state {
            State::Reading => self.read_request(id, ops),
            // Waiting connections are registered for nothing: any event is a hang-up or error.
            State::Waiting { .. } => self.close(id, ops),
            State::Writing { .. } => {
                if set.contains(EventSet::HANG_UP) {
                    return self.close(id, ops);
                }
                self.flush(id, ops);
            }
        }
    }

    fn read_request(&mut self, id: u32, ops: &mut EventOps) {
        let Some(conn) = self.conns.get_mut(&id) else {
            return;
        };
        let mut chunk = [0u8; READ_CHUNK];
        let parsed = loop {
            match conn.stream.read(&mut chunk) {
                // The client went away (or half-closed) before sending a whole request.
                Ok(0) => return self.close(id, ops),
                Ok(n) => {
                    conn.rbuf.extend_from_slice(&chunk[..n]);
                    // The parser bounds the buffer: it errors out past the header limit, and
                    // a complete header section fixes a body length under the body limit.
                    match parse_request(&conn.rbuf) {
                        Parse::Partial => continue,
                        other => break other,
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => {
                    log::debug!("API socket: read failed: {e}");
                    return self.close(id, ops);
                }
            }
        };
        conn.rbuf = Vec::new();
        let outcome = match parsed {
            Parse::Complete(_) if self.stopping => Outcome::Answer(shutting_down()),
            Parse::Complete(req) => handle(self.backend.as_ref(), &req),
            Parse::Error(resp) => Outcome::Answer(resp),
            Parse::Partial => return,
        };
        match outcome {
            Outcome::Answer(resp) => self.respond(id, resp, ops),
            Outcome::AnswerThenShutdown(resp) => {
                // The stop is requested before the answer leaves, so a client that got its
                // 204 can rely on the stop having started. Not waiting for the answer to be
                // flushed: a slow client must not delay the stop.
                self.backend.shutdown();
                self.respond(id, resp, ops);
            }
            Outcome::Wait(_) if self.waiters >= MAX_WAITERS => {
                self.respond(id, Response::error(503, "too many long polls waiting"), ops)
            }
            Outcome::Wait(deadline) => {
                conn.state = State::Waiting { deadline };
                self.waiters += 1;
                // Only hang-ups and errors (always reported) matter while waiting; a client
                // that half-closes after its request keeps waiting.
                if ops
                    .modify(Events::with_data(&conn.stream, id, EventSet::empty()))
                    .is_err()
                {
                    self.close(id, ops);
                }
            }
        }
    }

    /// Starts sending `resp` on connection `id`, then closes it once sent.
    fn respond(&mut self, id: u32, resp: Response, ops: &mut EventOps) {
        let Some(conn) = self.conns.get_mut(&id) else {
            return;
        };
        if matches!(conn.state, State::Waiting { .. }) {
            self.waiters -= 1;
        }
        conn.state = State::Writing {
            buf: resp.to_bytes(),
            pos: 0,
            since: Instant::now(),
        };
        self.flush(id, ops);
        if let Some(conn) = self.conns.get(&id) {
            // Not all sent: wait until the socket takes more.
            if ops
                .modify(Events::with_data(&conn.stream, id, EventSet::OUT))
                .is_err()
            {
                self.close(id, ops);
            }
        }
    }

    /// Writes what the socket takes; closes the connection when all is sent or on error.
    fn flush(&mut self, id: u32, ops: &mut EventOps) {
        let Some(conn) = self.conns.get_mut(&id) else {
            return;
        };
        let State::Writing { buf, pos, .. } = &mut conn.state else {
            return;
        };
        while *pos < buf.len() {
            match conn.stream.write(&buf[*pos..]) {
                Ok(0) => return self.close(id, ops),
                Ok(n) => *pos += n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => {
                    log::debug!("API socket: write failed: {e}");
                    return self.close(id, ops);
                }
            }
        }
        // Closing a UNIX socket with unread input makes the peer's reads fail with
        // ECONNRESET once it has read the answer: discard what the client sent beyond the
        // request (bounded; this is best effort).
        let mut chunk = [0u8; READ_CHUNK];
        for _ in 0..16 {
            match conn.stream.read(&mut chunk) {
                Ok(n) if n > 0 => {}
                _ => break,
            }
        }
        self.close(id, ops);
    }

    /// Timer tick: answers settled or expired long polls and enforces the I/O deadlines.
    fn on_tick(&mut self, ops: &mut EventOps) {
        // Non-blocking timer: EAGAIN when the expirations were already consumed or reset.
        let _ = self.timer.wait();
        // Out of fds with no connection of ours to close: try again at each tick.
        self.resume_listener(ops);
        let now = Instant::now();
        let mut status: Option<Option<MemoryStatus>> = None;
        let ids: Vec<u32> = self.conns.keys().copied().collect();
        for id in ids {
            let Some(conn) = self.conns.get(&id) else {
                continue;
            };
            match conn.state {
                State::Reading => {
                    if now.duration_since(conn.opened) >= REQUEST_TIMEOUT {
                        self.respond(
                            id,
                            Response::error(408, "request not received in time"),
                            ops,
                        );
                    }
                }
                State::Writing { since, .. } => {
                    if now.duration_since(since) >= WRITE_TIMEOUT {
                        log::debug!("API socket: dropping a client that does not read");
                        self.close(id, ops);
                    }
                }
                State::Waiting { deadline } => {
                    let status = status.get_or_insert_with(|| self.backend.memory_sizes());
                    let resp = match status {
                        None => Some(no_hotplug()),
                        // Settled, with a resident figure that includes the last change: read
                        // the status again, the reading may be newer than `status`.
                        Some(s) if settled(s) && self.backend.resident_current() => self
                            .backend
                            .memory_sizes()
                            .map(|s| long_poll_answer(&s, settled(&s)))
                            .or_else(|| Some(no_hotplug())),
                        Some(s) if now >= deadline => Some(long_poll_answer(s, false)),
                        Some(_) => None,
                    };
                    if let Some(resp) = resp {
                        // Back to a normal registration before writing.
                        self.respond(id, resp, ops);
                    }
                }
            }
        }
    }

    /// Arms the timer at the period the open connections need, or disarms it.
    fn update_timer(&mut self) {
        let want = if self
            .conns
            .values()
            .any(|c| matches!(c.state, State::Waiting { .. }))
        {
            Some(POLL_TICK)
        } else if self.conns.is_empty() && !self.listener_paused {
            None
        } else {
            Some(IDLE_TICK)
        };
        if want == self.tick {
            return;
        }
        let res = match want {
            Some(d) => self.timer.reset(d, Some(d)),
            None => self.timer.clear(),
        };
        match res {
            Ok(()) => self.tick = want,
            Err(e) => log::error!("API socket: cannot set the timer: {e}"),
        }
    }
}

impl MutEventSubscriber for ApiServer {
    fn init(&mut self, ops: &mut EventOps) {
        watch(ops, self.listener.as_raw_fd(), LISTENER, "the API socket");
        if let Some(w) = &self.wake {
            watch(ops, w.as_raw_fd(), WAKE, "the API's wake-up");
        }
        watch(ops, self.timer.as_raw_fd(), TIMER, "the API's timer");
        watch(ops, self.stop.as_raw_fd(), STOP, "the API's stop");
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        match events.data() {
            LISTENER => self.accept(ops),
            TIMER => self.on_tick(ops),
            WAKE => {
                if let Some(w) = &self.wake {
                    let _ = w.read();
                }
                self.on_tick(ops)
            }
            STOP => self.stop(ops),
            id => self.conn_event(id, events.event_set(), ops),
        }
        self.open.store(self.conns.len(), Ordering::SeqCst);
        self.parked.store(self.waiters, Ordering::SeqCst);
        self.update_timer();
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        let _ = self.socket_file.remove_if_ours();
    }
}

/// Makes the timer's fd non-blocking, so that reading it after a reset in the same epoll round
/// cannot block the event loop.
fn set_nonblocking_fd(fd: &impl AsRawFd) -> io::Result<()> {
    let fd = fd.as_raw_fd();
    // SAFETY: F_GETFL on a file descriptor we own; no memory is involved.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: F_SETFL with flags on a file descriptor we own; no memory is involved.
    if unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
