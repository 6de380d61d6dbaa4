//! What the virtio-mem device spends on each request, by request type: counters and latency
//! aggregates in plain atomics (readable from any thread, no lock), in the spirit of
//! Firecracker's virtio-mem `metrics`.
//!
//! A request's service time runs from the moment the device takes its chain off the queue to
//! the moment its answer is on the used ring (the interrupt that follows is timed apart), and
//! is split into validation (parsing, range and
//! state checks), protection changes (`mprotect`), the memory system calls (`madvise`,
//! `fallocate`, `mremap`), the wait for a populate ahead of the range still under way when the
//! PLUG came, and bookkeeping (the rest: bitmap, listeners, config, used ring).

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use std::time::Instant;

use serde::Serialize;

use super::request::{Answer, RequestKind};

/// The time of one request, by phase (nanoseconds), and what it was. The phases inside the
/// hotplug memory are its own [`memory::OpTimes`].
#[derive(Debug, Clone, Copy, Default)]
pub struct Sample {
    /// Bytes the request covers (0 for UNPLUG_ALL and malformed requests).
    pub bytes: u64,
    /// Validation.
    pub validate_ns: u64,
    /// Protection changes, memory system calls, the wait for a populate ahead of the range and
    /// the bytes found populated ahead.
    pub op: memory::OpTimes,
}

/// Counters and aggregates of one request type.
#[derive(Debug)]
pub struct RequestMetrics {
    count: AtomicU64,
    bytes: AtomicU64,
    answers: [AtomicU64; 4],
    total_ns: AtomicU64,
    min_ns: AtomicU64,
    max_ns: AtomicU64,
    validate_ns: AtomicU64,
    protect_ns: AtomicU64,
    syscall_ns: AtomicU64,
    ahead_wait_ns: AtomicU64,
    bookkeeping_ns: AtomicU64,
    notify_ns: AtomicU64,
    ahead_bytes: AtomicU64,
}

impl Default for RequestMetrics {
    fn default() -> Self {
        Self {
            count: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            answers: Default::default(),
            total_ns: AtomicU64::new(0),
            min_ns: AtomicU64::new(u64::MAX),
            max_ns: AtomicU64::new(0),
            validate_ns: AtomicU64::new(0),
            protect_ns: AtomicU64::new(0),
            syscall_ns: AtomicU64::new(0),
            ahead_wait_ns: AtomicU64::new(0),
            bookkeeping_ns: AtomicU64::new(0),
            notify_ns: AtomicU64::new(0),
            ahead_bytes: AtomicU64::new(0),
        }
    }
}

impl RequestMetrics {
    /// Records one request answered `answer` after `total_ns`, whose used-buffer interrupt
    /// then took `notify_ns`.
    pub fn record(&self, s: &Sample, answer: Answer, total_ns: u64, notify_ns: u64) {
        self.notify_ns.fetch_add(notify_ns, Relaxed);
        self.count.fetch_add(1, Relaxed);
        self.bytes.fetch_add(s.bytes, Relaxed);
        if let Some(a) = self.answers.get(answer as usize) {
            a.fetch_add(1, Relaxed);
        }
        self.total_ns.fetch_add(total_ns, Relaxed);
        self.min_ns.fetch_min(total_ns, Relaxed);
        self.max_ns.fetch_max(total_ns, Relaxed);
        self.validate_ns.fetch_add(s.validate_ns, Relaxed);
        self.protect_ns.fetch_add(s.op.protect_ns, Relaxed);
        self.syscall_ns.fetch_add(s.op.syscall_ns, Relaxed);
        self.ahead_wait_ns.fetch_add(s.op.ahead_wait_ns, Relaxed);
        let phases = s.validate_ns + s.op.protect_ns + s.op.syscall_ns + s.op.ahead_wait_ns;
        self.bookkeeping_ns
            .fetch_add(total_ns.saturating_sub(phases), Relaxed);
        self.ahead_bytes.fetch_add(s.op.ahead_bytes, Relaxed);
    }

    /// Requests recorded.
    pub fn count(&self) -> u64 {
        self.count.load(Relaxed)
    }

    /// Sum of the service times (ns).
    pub fn total_ns(&self) -> u64 {
        self.total_ns.load(Relaxed)
    }

    fn snapshot(&self) -> RequestSnapshot {
        let count = self.count();
        let total_ns = self.total_ns();
        let answer = |i: usize| self.answers[i].load(Relaxed);
        RequestSnapshot {
            count,
            bytes: self.bytes.load(Relaxed),
            ack: answer(0),
            nack: answer(1),
            busy: answer(2),
            error: answer(3),
            total_ns,
            min_ns: match self.min_ns.load(Relaxed) {
                u64::MAX => 0,
                m => m,
            },
            avg_ns: total_ns.checked_div(count).unwrap_or(0),
            max_ns: self.max_ns.load(Relaxed),
            validate_ns: self.validate_ns.load(Relaxed),
            protect_ns: self.protect_ns.load(Relaxed),
            syscall_ns: self.syscall_ns.load(Relaxed),
            ahead_wait_ns: self.ahead_wait_ns.load(Relaxed),
            bookkeeping_ns: self.bookkeeping_ns.load(Relaxed),
            notify_ns: self.notify_ns.load(Relaxed),
            ahead_bytes: self.ahead_bytes.load(Relaxed),
        }
    }
}

/// One request type's metrics as served (`GET /metrics`), times in nanoseconds.
#[derive(Debug, Serialize)]
pub struct RequestSnapshot {
    /// Requests.
    pub count: u64,
    /// Bytes they covered.
    pub bytes: u64,
    /// Answered ACK.
    pub ack: u64,
    /// Answered NACK.
    pub nack: u64,
    /// Answered BUSY (the host could not back a plug).
    pub busy: u64,
    /// Answered ERROR (malformed requests).
    pub error: u64,
    /// Sum of the service times.
    pub total_ns: u64,
    /// Shortest service time (0 before the first request).
    pub min_ns: u64,
    /// Mean service time.
    pub avg_ns: u64,
    /// Longest service time.
    pub max_ns: u64,
    /// Time in validation.
    pub validate_ns: u64,
    /// Time in protection changes.
    pub protect_ns: u64,
    /// Time in memory system calls.
    pub syscall_ns: u64,
    /// Time waiting for a populate ahead of the range still under way (its memory system
    /// calls, run on other threads).
    pub ahead_wait_ns: u64,
    /// The rest: bitmap, listeners, config, used ring.
    pub bookkeeping_ns: u64,
    /// After the service time: the used-buffer interrupts (irqfd writes), summed.
    pub notify_ns: u64,
    /// Bytes found populated ahead.
    pub ahead_bytes: u64,
}

/// What was populated ahead, as served.
#[derive(Debug, Serialize)]
pub struct AheadSnapshot {
    /// Bytes populated ahead.
    pub populated_bytes: u64,
    /// Bytes given back unused.
    pub released_bytes: u64,
    /// Time spent populating ahead.
    pub ns: u64,
    /// Times populate ahead held back because what it had prepared was given back unplugged
    /// and the guest has not plugged since.
    pub held_back: u64,
    /// The requested size populate ahead last finished acting on.
    pub settled_requested_bytes: u64,
}

/// The metrics of one virtio-mem device as served (`GET /metrics`).
#[derive(Debug, Serialize)]
pub struct MetricsSnapshot {
    /// PLUG requests.
    pub plug: RequestSnapshot,
    /// UNPLUG requests.
    pub unplug: RequestSnapshot,
    /// UNPLUG_ALL requests.
    pub unplug_all: RequestSnapshot,
    /// STATE requests.
    pub state: RequestSnapshot,
    /// Malformed chains and unknown request types.
    pub invalid: RequestSnapshot,
    /// Populate ahead.
    pub ahead: AheadSnapshot,
}

/// The metrics of one virtio-mem device.
#[derive(Debug, Default)]
pub struct VirtioMemMetrics {
    /// PLUG requests.
    pub plug: RequestMetrics,
    /// UNPLUG requests.
    pub unplug: RequestMetrics,
    /// UNPLUG_ALL requests.
    pub unplug_all: RequestMetrics,
    /// STATE requests.
    pub state: RequestMetrics,
    /// Malformed chains and unknown request types.
    pub invalid: RequestMetrics,
    /// Bytes populated ahead of the guest's PLUG, and given back unused (kept by the vmm).
    pub ahead_populated_bytes: AtomicU64,
    /// See [`VirtioMemMetrics::ahead_populated_bytes`].
    pub ahead_released_bytes: AtomicU64,
    /// Time spent populating ahead (ns), off the queue.
    pub ahead_ns: AtomicU64,
    /// Times populate ahead held back (the guest did not plug what was prepared).
    pub ahead_held_back: AtomicU64,
    /// The requested size the populate-ahead thread last finished acting on.
    pub ahead_settled_requested_bytes: AtomicU64,
}

impl VirtioMemMetrics {
    /// The metrics of request type `kind` (`None`: malformed chains and unknown types).
    pub fn of(&self, kind: Option<RequestKind>) -> &RequestMetrics {
        match kind {
            Some(RequestKind::Plug) => &self.plug,
            Some(RequestKind::Unplug) => &self.unplug,
            Some(RequestKind::UnplugAll) => &self.unplug_all,
            Some(RequestKind::State) => &self.state,
            None => &self.invalid,
        }
    }

    /// The metrics as one JSON object: `{"plug": {...}, "unplug": {...}, "unplug_all": {...},
    /// "state": {...}, "invalid": {...}, "ahead": {...}}`, times in nanoseconds.
    #[cfg(test)]
    fn to_json(&self) -> String {
        serde_json::to_string(&self.snapshot()).unwrap_or_default()
    }

    /// The metrics now.
    pub fn snapshot(&self) -> MetricsSnapshot {
        MetricsSnapshot {
            plug: self.plug.snapshot(),
            unplug: self.unplug.snapshot(),
            unplug_all: self.unplug_all.snapshot(),
            state: self.state.snapshot(),
            invalid: self.invalid.snapshot(),
            ahead: AheadSnapshot {
                populated_bytes: self.ahead_populated_bytes.load(Relaxed),
                released_bytes: self.ahead_released_bytes.load(Relaxed),
                ns: self.ahead_ns.load(Relaxed),
                held_back: self.ahead_held_back.load(Relaxed),
                settled_requested_bytes: self.ahead_settled_requested_bytes.load(Relaxed),
            },
        }
    }
}

/// The timing of one request while it is carried out.
pub(super) struct Timing {
    /// When the device took the chain off the queue.
    pub(super) start: Instant,
    /// The request type, once parsed.
    pub(super) kind: Option<RequestKind>,
    pub(super) sample: Sample,
    /// Whether validation time was taken already.
    pub(super) validated: bool,
}

impl Timing {
    /// The timing of a request whose chain was taken off the queue at `start`.
    pub(super) fn new(start: Instant) -> Self {
        Self {
            start,
            kind: None,
            sample: Sample::default(),
            validated: false,
        }
    }

    /// Validation ends here (the first call counts).
    pub(super) fn validated(&mut self) {
        if !self.validated {
            self.validated = true;
            self.sample.validate_ns = self.start.elapsed().as_nanos() as u64;
        }
    }

    /// Runs a memory operation, adding where its time went to the sample.
    pub(super) fn time<T>(&mut self, op: impl FnOnce(&mut memory::OpTimes) -> T) -> T {
        op(&mut self.sample.op)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aggregates_and_json() {
        let m = VirtioMemMetrics::default();
        let s = Sample {
            bytes: 4096,
            validate_ns: 10,
            op: memory::OpTimes {
                protect_ns: 20,
                syscall_ns: 30,
                ahead_bytes: 0,
                ahead_wait_ns: 15,
            },
        };
        m.of(Some(RequestKind::Plug))
            .record(&s, Answer::Ack, 100, 7);
        m.of(Some(RequestKind::Plug))
            .record(&s, Answer::Busy, 300, 7);
        m.of(None).record(&Sample::default(), Answer::Error, 5, 0);
        assert_eq!(m.plug.count(), 2);
        assert_eq!(m.plug.total_ns(), 400);
        assert_eq!(m.invalid.count(), 1);
        let j = m.to_json();
        assert!(j.contains("\"plug\":{\"count\":2,\"bytes\":8192,\"ack\":1,\"nack\":0,\"busy\":1,\"error\":0,\"total_ns\":400,\"min_ns\":100,\"avg_ns\":200,\"max_ns\":300,\"validate_ns\":20,\"protect_ns\":40,\"syscall_ns\":60,\"ahead_wait_ns\":30,\"bookkeeping_ns\":250,\"notify_ns\":14"), "{j}");
        assert!(
            j.contains("\"unplug\":{\"count\":0,") && j.contains("\"min_ns\":0"),
            "{j}"
        );
        assert!(j.ends_with("\"ahead\":{\"populated_bytes\":0,\"released_bytes\":0,\"ns\":0,\"held_back\":0,\"settled_requested_bytes\":0}}"));
    }
}
