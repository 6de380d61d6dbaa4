//! Messages a guest can trigger (an invalid request, an out-of-order status write, a malformed
//! chain) are rate-limited per kind, so that no guest can make Tide write without bound. The
//! first [`BURST`] of a kind are logged; after that at most one line per [`PERIOD`] says how
//! many more came. Every kind counts all its messages, logged or not, for `GET /metrics`
//! ([`counts`]).
//!
//! Use [`guest_log!`](crate::guest_log) with a short, fixed kind name:
//! `guest_log!(Level::Warn, "virtio-mem invalid range", "virtio-mem: {op} ...")`.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Messages of one kind logged before the rate limit applies.
pub const BURST: u64 = 5;
/// After the burst, at most one line of a kind per period.
pub const PERIOD: Duration = Duration::from_secs(10);

/// One kind of guest-triggered message (one `static` per call site, made by the macro).
pub struct Kind {
    name: &'static str,
    total: AtomicU64,
    logged: AtomicU64,
    registered: AtomicBool,
    state: Mutex<Window>,
}

struct Window {
    /// When the last line of this kind was logged after the burst.
    last: Option<Instant>,
    /// Messages not logged since the last line.
    suppressed: u64,
}

/// Every kind that has been hit at least once.
static KINDS: Mutex<Vec<&'static Kind>> = Mutex::new(Vec::new());

impl Kind {
    /// A kind named `name` (shown in `/metrics`).
    pub const fn new(name: &'static str) -> Self {
        Kind {
            name,
            total: AtomicU64::new(0),
            logged: AtomicU64::new(0),
            registered: AtomicBool::new(false),
            state: Mutex::new(Window {
                last: None,
                suppressed: 0,
            }),
        }
    }

    /// Counts one message; `Some(n)` when it is to be logged, `n` being the messages of this
    /// kind not logged since the last one that was.
    pub fn hit(&'static self) -> Option<u64> {
        if !self.registered.swap(true, Ordering::AcqRel) {
            memory::lock(&KINDS).push(self);
        }
        let n = self.total.fetch_add(1, Ordering::Relaxed) + 1;
        if n <= BURST {
            self.logged.fetch_add(1, Ordering::Relaxed);
            return Some(0);
        }
        let mut w = memory::lock(&self.state);
        let now = Instant::now();
        if w.last.is_some_and(|t| now.duration_since(t) < PERIOD) {
            w.suppressed += 1;
            return None;
        }
        w.last = Some(now);
        self.logged.fetch_add(1, Ordering::Relaxed);
        Some(std::mem::take(&mut w.suppressed))
    }

    /// The kind's name.
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// Messages of this kind so far, logged or not.
    pub fn total(&self) -> u64 {
        self.total.load(Ordering::Relaxed)
    }

    /// Messages of this kind logged so far.
    pub fn logged(&self) -> u64 {
        self.logged.load(Ordering::Relaxed)
    }
}

/// The messages of one kind so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct KindCount {
    /// The kind's name.
    pub kind: &'static str,
    /// Messages so far.
    pub count: u64,
    /// Of those, the ones logged.
    pub logged: u64,
}

/// The counts of every kind seen, sorted by name.
pub fn counts() -> Vec<KindCount> {
    let mut v: Vec<_> = memory::lock(&KINDS)
        .iter()
        .map(|k| KindCount {
            kind: k.name(),
            count: k.total(),
            logged: k.logged(),
        })
        .collect();
    v.sort_unstable();
    v
}

/// One line for the end of a run: the kinds that had messages not logged, with their counts
/// (`None` when every message was logged).
pub fn summary() -> Option<String> {
    let parts: Vec<String> = counts()
        .iter()
        .filter(|k| k.count > k.logged)
        .map(|k| format!("{} {} ({} logged)", k.kind, k.count, k.logged))
        .collect();
    (!parts.is_empty()).then(|| {
        format!(
            "guest-triggered messages held back by the rate limit: {}",
            parts.join(", ")
        )
    })
}

/// Logs a guest-triggered message at `level` under a rate limit per `kind` (see the
/// [module](crate::guest_log) docs).
#[macro_export]
macro_rules! guest_log {
    ($level:expr, $kind:expr, $($arg:tt)+) => {{
        static KIND: $crate::guest_log::Kind = $crate::guest_log::Kind::new($kind);
        let level: log::Level = $level;
        // Counted whatever the log level, for /metrics.
        match KIND.hit() {
            Some(0) => log::log!(level, $($arg)+),
            Some(n) => log::log!(
                level,
                "{} ({n} more like this not logged)",
                format_args!($($arg)+)
            ),
            None => {}
        }
    }};
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flood_logs_the_burst_then_counts() {
        static K: Kind = Kind::new("test flood");
        let t = Instant::now();
        let logged: Vec<u64> = (0..100_000).filter_map(|_| K.hit()).collect();
        // The burst, one line when it ends, then one per period, however long this took.
        let periods = (t.elapsed().as_secs_f64() / PERIOD.as_secs_f64()).ceil() as u64;
        assert!(
            logged.len() as u64 <= BURST + 1 + periods,
            "{}",
            logged.len()
        );
        assert_eq!(&logged[..BURST as usize], &[0; BURST as usize]);
        assert_eq!(K.total(), 100_000);
        assert_eq!(K.logged(), logged.len() as u64);
        let c = counts()
            .into_iter()
            .find(|k| k.kind == "test flood")
            .unwrap();
        assert_eq!((c.count, c.logged), (100_000, logged.len() as u64));
        assert!(summary().unwrap().contains("test flood 100000"));
    }
}
