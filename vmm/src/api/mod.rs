//! Tide's control API: HTTP/1.1 over a UNIX socket (like Firecracker and Cloud Hypervisor), so
//! `curl --unix-socket S http://localhost/vm` works.
//!
//! The [`server`] runs inside the VMM's event loop ([`server::ApiServer`] is an
//! `event_manager::MutEventSubscriber`) and never blocks it; the VMM answers through the
//! [`ApiBackend`] trait. The [`client`] is `tide ctl`.
//!
//! # Endpoints
//!
//! | Method  | Path              | Answer |
//! |---------|-------------------|--------|
//! | `GET`   | `/hotplug/memory` | 200 [`MemoryStatus`]; 404 if the VM has no hotplug region |
//! | `GET`   | `/hotplug/memory?wait_for=plugged_size&timeout_ms=N` | long poll, see below |
//! | `PATCH` | `/hotplug/memory` | body `{"requested_size": BYTES}` or `{"requested_size_mib": MIB}`; 204, or 400 |
//! | `GET`   | `/vm`             | 200 [`VmInfo`] |
//! | `PUT`   | `/vm/shutdown`    | 204, then [`ApiBackend::shutdown`] |
//! | `GET`   | `/metrics`        | 200 the virtio-mem device's per-request metrics; 404 without one |
//! | `GET`   | `/version`        | 200 `{"tide_version": "..."}` |
//!
//! The same API is described in `openapi.yaml` beside this file; a test checks that the server
//! and the document list the same paths and methods (`routes::ROUTES`).
//!
//! The long poll answers 200 as soon as `plugged_size == requested_size`, or when `timeout_ms`
//! (default 30000, at most 600000; larger values are clamped) has passed. Its body is the
//! [`MemoryStatus`] with one more field, `"settled": true|false`, telling which of the two
//! happened. A plain `GET /hotplug/memory` has no `settled` field.
//!
//! Every error answer has a JSON body `{"error": "...", "fault_message": "..."}` (the same
//! message; `fault_message` as Firecracker names it): 400 malformed request or bad body,
//! 404 unknown path, 405 wrong method (with `Allow`), 408 request not received in time, 411
//! `Transfer-Encoding` (only `Content-Length` bodies are accepted), 413 body over 64 KiB, 431
//! header section over 8 KiB, 503 too many connections (64 besides parked long polls), too many
//! long polls (64 parked) or the VM shutting down (a stop answers every parked long poll so). The server answers one request per
//! connection and then closes it (`Connection: close`).

pub mod client;
mod http;
mod http_client;
mod progress;
mod routes;
pub mod server;
mod socket;
#[cfg(test)]
mod tests;
mod units;

pub use server::{ApiError, ApiServer, StopHandle};

use serde::{Deserialize, Serialize};

/// Why an [`ApiBackend`] refused a request, with its cause chain.
pub type BackendError = Box<dyn std::error::Error + Send + Sync>;

/// The state of the VM's hotpluggable (virtio-mem) memory region, in bytes.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct MemoryStatus {
    /// Size of the hotplug region.
    pub region_size: u64,
    /// Plug granularity.
    pub block_size: u64,
    /// What the host asked the guest to have plugged.
    pub requested_size: u64,
    /// What the guest has plugged.
    pub plugged_size: u64,
    /// The part of the region the guest may currently use.
    pub usable_region_size: u64,
    /// What backs the region (for example "anonymous" or a file).
    pub backend: String,
    /// Host memory resident for the plugged blocks. For anon, the latest page-table walk
    /// (taken off the event loop) moved by what was plugged and unplugged since it began.
    pub resident_bytes: u64,
    /// How old the measurement `resident_bytes` builds on is, in milliseconds (0 for fd
    /// backends, read at once; absent before the first walk of an anon region taken with no
    /// plug or unplug under way, when `resident_bytes` is the latest walk as it is).
    #[serde(default)]
    pub resident_age_ms: Option<u64>,
    /// Host memory populated ahead of the guest's plugs (not plugged, not visible to the
    /// guest, not in `resident_bytes`).
    #[serde(default)]
    pub ahead_bytes: u64,
}

/// General information about the VM.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct VmInfo {
    /// `"running"` or `"stopped"`.
    pub state: String,
    /// Exit code once stopped.
    pub exit_code: Option<i32>,
    /// Why the VM stopped, once stopped.
    pub exit_reason: Option<String>,
    /// Number of vCPUs.
    pub vcpus: u8,
    /// Boot memory size in bytes.
    pub boot_memory: u64,
}

/// What the VMM provides to the API server. Called on the event loop thread: must not block.
pub trait ApiBackend: Send + Sync {
    /// The hotplug region's state; `None` when the VM has none (the API answers 404).
    fn memory_status(&self) -> Option<MemoryStatus>;
    /// Like [`ApiBackend::memory_status`], for callers that need only the sizes (PATCH, the
    /// long poll's checks): must not ask for a fresh `resident_bytes` reading.
    fn memory_sizes(&self) -> Option<MemoryStatus> {
        self.memory_status()
    }
    /// Whether `resident_bytes` reflects every plug and unplug so far (it may be read off the
    /// event loop and lag): a long poll answers settled only when it does. Cheap.
    fn resident_current(&self) -> bool {
        true
    }
    /// Asks the guest to have `requested_size` bytes plugged. An error is answered as 400
    /// `{"error": ...}` with its cause chain.
    fn resize(&self, requested_size: u64) -> Result<(), BackendError>;
    /// The VM's general state.
    fn vm_info(&self) -> VmInfo;
    /// Starts an ordered stop of the VM.
    fn shutdown(&self);
    /// The virtio-mem device's metrics as a JSON object (`GET /metrics`); `None` without one.
    fn metrics(&self) -> Option<serde_json::Value> {
        None
    }
}
