//! Resident bytes of an anon hotplug region, read off the event loop.
//!
//! For anon, the only per-region figure is the `Rss` of `/proc/self/smaps`, a walk of the
//! region's page tables under the mmap lock (tens of milliseconds with gigabytes plugged in
//! 4 KiB pages: docs/memory.md, "Cheap status"). A `resident` thread, at background priority, takes that
//! reading when a status request finds it older than [`MAX_AGE`] and when a settled long poll
//! finds it older than the last plug or unplug, pausing four times a walk's duration between
//! walks (at least [`MIN_PAUSE`], at most [`MAX_PAUSE`]); status requests return the latest
//! reading and never wait for one. A long poll answers `settled` only once a reading taken
//! after the last plug or unplug is in ([`ResidentSampler::is_current`]). Plugs and unplugs
//! themselves do not start a reading: walks in the middle of a resize would take CPU and the
//! mmap lock from the plugs still to come, and only the settled state is waited for.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use memory::{GuestAddress, HotplugRegion, ListenerId, RamDiscardListener};
use vmm_sys_util::eventfd::EventFd;

/// Longest pause enforced between two readings. The pause is four times the last walk's
/// duration (so the thread spends at most a fifth of a core walking), between
/// [`MIN_PAUSE`] and this.
pub const MAX_PAUSE: Duration = Duration::from_millis(250);
/// Shortest pause between two readings.
pub const MIN_PAUSE: Duration = Duration::from_millis(5);
/// A status request asks for a new reading when the latest one is older than this.
pub const MAX_AGE: Duration = Duration::from_millis(20);

#[derive(Default)]
struct Want {
    dirty: bool,
    stop: bool,
}

struct Inner {
    value: AtomicU64,
    /// Plug and unplug events seen so far.
    changes: AtomicU64,
    /// The value of `changes` before the latest reading started.
    seen: AtomicU64,
    /// The region's plugged bytes before the latest reading started. Listeners hear of a
    /// discard before the memory is released and the plugged count drops after it, so a
    /// reading is current only if the count has not moved since it started.
    seen_plugged: AtomicU64,
    taken: Mutex<Option<Instant>>,
    /// The latest reading taken with no populate or discard under way: (value, plugged bytes
    /// then, when). A status moves it by what was plugged since ([`ResidentSampler::current`]).
    clean: Mutex<Option<(u64, u64, Instant)>>,
    want: Mutex<Want>,
    cv: Condvar,
}

impl Inner {
    fn poke(&self) {
        memory::lock(&self.want).dirty = true;
        self.cv.notify_all();
    }
}

struct ChangeCounter(Arc<Inner>);

impl RamDiscardListener for ChangeCounter {
    fn on_populate(&self, _: GuestAddress, _: u64) -> Result<(), memory::ListenerError> {
        self.0.changes.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
    fn on_discard(&self, _: GuestAddress, _: u64) {
        self.0.changes.fetch_add(1, Ordering::SeqCst);
    }
}

/// The sampler: one thread per anon region.
pub struct ResidentSampler {
    inner: Arc<Inner>,
    region: Arc<HotplugRegion>,
    listener: ListenerId,
    thread: Option<JoinHandle<()>>,
}

impl ResidentSampler {
    /// Starts sampling `region` (takes a first reading at once); `done`, when given, is
    /// written after each reading (the API's wake-up, so that a long poll waiting for a
    /// current reading is answered as soon as it lands).
    pub fn start(region: Arc<HotplugRegion>, done: Option<EventFd>) -> std::io::Result<Self> {
        let inner = Arc::new(Inner {
            value: AtomicU64::new(0),
            changes: AtomicU64::new(0),
            // Not current until the first reading.
            seen: AtomicU64::new(u64::MAX),
            seen_plugged: AtomicU64::new(u64::MAX),
            taken: Mutex::new(None),
            clean: Mutex::new(None),
            want: Mutex::new(Want {
                dirty: true,
                stop: false,
            }),
            cv: Condvar::new(),
        });
        let (i, r) = (inner.clone(), region.clone());
        let thread = std::thread::Builder::new()
            .name("resident".into())
            .spawn(move || {
                // A reading is background work, which a PLUG being answered or a vCPU should
                // win the CPU from.
                memory::lower_thread_priority();
                sample(&i, &r, done.as_ref())
            })?;
        let listener = region.add_listener(Arc::new(ChangeCounter(inner.clone())));
        Ok(ResidentSampler {
            inner,
            region,
            listener,
            thread: Some(thread),
        })
    }

    /// The latest reading; with `refresh`, asks for a new one if it is older than [`MAX_AGE`].
    pub fn get(&self, refresh: bool) -> u64 {
        if refresh {
            let taken = *memory::lock(&self.inner.taken);
            if taken.is_none_or(|t| t.elapsed() > MAX_AGE) {
                self.inner.poke();
            }
        }
        self.inner.value.load(Ordering::SeqCst)
    }

    /// A current figure: the latest reading taken with no populate or discard under way, moved
    /// by what was plugged or unplugged since (Tide populates every plugged block and discards
    /// every unplugged one), and how old that reading is. Before the first such reading: the
    /// latest reading as it is, and `None`. With `refresh`, asks for a new reading if the
    /// latest is older than [`MAX_AGE`].
    pub fn current(&self, refresh: bool) -> (u64, Option<Duration>) {
        let value = self.get(refresh);
        let i = &self.inner;
        let Some((v, at, taken)) = *memory::lock(&i.clean) else {
            return (value, None);
        };
        let now = self.region.plugged_bytes();
        let value = if now >= at {
            v.saturating_add(now - at)
        } else {
            v.saturating_sub(at - now)
        };
        (value, Some(taken.elapsed()))
    }

    /// Whether the latest reading was taken after every plug and unplug so far; when it was
    /// not, asks for a new one.
    pub fn is_current(&self) -> bool {
        let i = &self.inner;
        let current = i.seen.load(Ordering::SeqCst) == i.changes.load(Ordering::SeqCst)
            && i.seen_plugged.load(Ordering::SeqCst) == self.region.plugged_bytes();
        if !current {
            i.poke();
        }
        current
    }
}

fn sample(i: &Inner, region: &HotplugRegion, done: Option<&EventFd>) {
    let mut last: Option<Instant> = None;
    let mut pause = MIN_PAUSE;
    loop {
        {
            let mut w = memory::lock(&i.want);
            loop {
                if w.stop {
                    return;
                }
                let early = last.map(|l| pause.saturating_sub(l.elapsed()));
                match early {
                    _ if !w.dirty => w = i.cv.wait(w).unwrap_or_else(|e| e.into_inner()),
                    Some(d) if !d.is_zero() => {
                        w = i.cv.wait_timeout(w, d).unwrap_or_else(|e| e.into_inner()).0
                    }
                    _ => break,
                }
            }
            w.dirty = false;
        }
        let now = Instant::now();
        let changes = i.changes.load(Ordering::SeqCst);
        let plugged = region.plugged_bytes();
        let before = region.changes();
        match region.resident_bytes() {
            Ok(v) => {
                i.value.store(v, Ordering::SeqCst);
                // A populate under way during the walk shows in part of the memory and not
                // in the plugged count yet: only a reading with none is a base for `current`.
                let after = region.changes();
                if before == after && before.1 == 0 && region.plugged_bytes() == plugged {
                    *memory::lock(&i.clean) = Some((v, plugged, now));
                }
            }
            Err(e) => log::debug!("resident bytes: {e}"),
        }
        i.seen_plugged.store(plugged, Ordering::SeqCst);
        i.seen.store(changes, Ordering::SeqCst);
        pause = (now.elapsed() * 4).clamp(MIN_PAUSE, MAX_PAUSE);
        last = Some(Instant::now());
        *memory::lock(&i.taken) = Some(now);
        if let Some(done) = done {
            let _ = done.write(1);
        }
    }
}

impl Drop for ResidentSampler {
    fn drop(&mut self) {
        self.region.remove_listener(self.listener);
        memory::lock(&self.inner.want).stop = true;
        self.inner.cv.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
