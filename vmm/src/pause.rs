//! Pausing the vCPUs: each vCPU thread, asked to pause, completes its last exit (one `KVM_RUN`
//! with `immediate_exit` set), saves its state ([`VcpuState`]) and parks outside `KVM_RUN`
//! until resumed or stopped. The API's pause returns once every vCPU has parked, so
//! `GET /vm` says "paused" only when no guest code can run.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::snapshot::vcpu_state::VcpuState;

/// How long a pause waits for every vCPU to park before it gives up.
pub const PAUSE_TIMEOUT: Duration = Duration::from_secs(5);
/// How often a pause kicks vCPUs still in `KVM_RUN` (a kick can land just before one enters).
const KICK_EVERY: Duration = Duration::from_millis(2);

#[derive(Default)]
struct Inner {
    requested: bool,
    /// One slot per vCPU: its state, saved when it parked (`None` while it runs).
    parked: Vec<Option<Result<VcpuState, String>>>,
}

/// The pause state shared by the vCPU threads and the API.
#[derive(Default)]
pub struct Pause {
    requested: AtomicBool,
    inner: Mutex<Inner>,
    cv: Condvar,
    /// The vCPU threads (joined only by [`Pause::take_threads`], so their ids stay valid for
    /// kicks while they are here).
    threads: Mutex<Vec<JoinHandle<()>>>,
    /// KVM's MSR index list, read once.
    msr_index: Mutex<Vec<u32>>,
}

impl Pause {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        devices::bus::lock(&self.inner)
    }

    /// Sets the vCPU count and KVM's MSR list (before the vCPUs start).
    pub fn init(&self, vcpus: usize, msr_index: Vec<u32>) {
        self.lock().parked = (0..vcpus).map(|_| None).collect();
        *devices::bus::lock(&self.msr_index) = msr_index;
    }

    /// KVM's MSR index list.
    pub fn msr_index(&self) -> Vec<u32> {
        devices::bus::lock(&self.msr_index).clone()
    }

    /// Hands the vCPU threads over for kicks.
    pub fn set_threads(&self, threads: Vec<JoinHandle<()>>) {
        *devices::bus::lock(&self.threads) = threads;
    }

    /// Takes the vCPU threads back (to stop and join them).
    pub fn take_threads(&self) -> Vec<JoinHandle<()>> {
        std::mem::take(&mut *devices::bus::lock(&self.threads))
    }

    /// Whether a pause is asked for (cheap: the vCPU loop reads it before every `KVM_RUN`).
    pub fn requested(&self) -> bool {
        self.requested.load(Ordering::SeqCst)
    }

    /// Asks for a pause without waiting (a VM restored with `--paused` starts so).
    pub fn request(&self) {
        let mut g = self.lock();
        g.requested = true;
        self.requested.store(true, Ordering::SeqCst);
    }

    /// Called by vCPU `id` once outside `KVM_RUN` with its saved state: parks until resumed,
    /// or until `stopping()` (checked under the lock [`Pause::wake`] takes).
    pub fn park(&self, id: u8, saved: Result<VcpuState, String>, stopping: &dyn Fn() -> bool) {
        let mut g = self.lock();
        if let Some(slot) = g.parked.get_mut(usize::from(id)) {
            *slot = Some(saved);
        }
        self.cv.notify_all();
        while g.requested && !stopping() {
            g = self.cv.wait(g).unwrap_or_else(|e| e.into_inner());
        }
        if let Some(slot) = g.parked.get_mut(usize::from(id)) {
            *slot = None;
        }
        self.cv.notify_all();
    }

    /// Wakes parked vCPUs (after a stop request, so that they see it).
    pub fn wake(&self) {
        let _g = self.lock();
        self.cv.notify_all();
    }

    /// Whether every vCPU is parked.
    pub fn is_paused(&self) -> bool {
        let g = self.lock();
        g.requested && !g.parked.is_empty() && g.parked.iter().all(Option::is_some)
    }

    /// Pauses every vCPU and waits until all have parked (kicking those still in `KVM_RUN`).
    /// Fails, and resumes, when they have not within [`PAUSE_TIMEOUT`] or the VM stops.
    pub fn pause(&self, stopping: &dyn Fn() -> bool) -> Result<(), &'static str> {
        self.request();
        let deadline = Instant::now() + PAUSE_TIMEOUT;
        let mut g = self.lock();
        loop {
            if g.parked.iter().all(Option::is_some) {
                return Ok(());
            }
            if stopping() {
                drop(g);
                self.resume();
                return Err("the VM is stopping");
            }
            if Instant::now() >= deadline {
                drop(g);
                self.resume();
                return Err("the vCPUs did not pause in time");
            }
            drop(g);
            self.kick();
            g = self.lock();
            g = self
                .cv
                .wait_timeout(g, KICK_EVERY)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Lets parked vCPUs run again (and vCPUs about to park go on).
    pub fn resume(&self) {
        let mut g = self.lock();
        g.requested = false;
        self.requested.store(false, Ordering::SeqCst);
        self.cv.notify_all();
    }

    /// The states the vCPUs saved when they parked, in index order; `None` unless paused.
    pub fn saved_states(&self) -> Option<Vec<Result<VcpuState, String>>> {
        let g = self.lock();
        if !g.requested || g.parked.is_empty() {
            return None;
        }
        g.parked.iter().cloned().collect()
    }

    fn kick(&self) {
        use std::os::unix::thread::JoinHandleExt;
        let threads = devices::bus::lock(&self.threads);
        for h in threads.iter().filter(|h| !h.is_finished()) {
            // SAFETY: the thread is not joined (joining takes it out of this list under the
            // lock held here), so its pthread_t is valid; the kick signal's handler does
            // nothing.
            unsafe { libc::pthread_kill(h.as_pthread_t(), crate::vcpu::kick_signal()) };
        }
    }
}
