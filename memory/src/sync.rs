//! The one poison-tolerant lock helper of Tide's crates.

use std::sync::{Mutex, MutexGuard};

/// Locks `m`, going on with the data of a lock whose previous holder panicked: every lock in
/// Tide guards state kept valid between updates (device models, sizes, bookkeeping), so a
/// poisoned lock is no reason to stop the VM.
pub fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
