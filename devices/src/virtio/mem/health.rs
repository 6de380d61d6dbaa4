//! What the device knows of its driver's health: whether a driver is there, negotiating,
//! running the device, or has failed it (it set FAILED, the device needs a reset, or the device
//! answered one of its requests ERROR, after which Linux's driver stops using the device for
//! good), when it last sent a request, and the last request answered ERROR with the reason.
//!
//! The transport reports the status register ([`crate::virtio::VirtioDevice::driver_status`]);
//! the queue reports requests and answers. A resize before any driver exists is still accepted
//! (the driver plugs toward the requested size once it comes): the health then says so.

use std::time::Instant;

use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE as STATUS_ACKNOWLEDGE,
    VIRTIO_CONFIG_S_DRIVER_OK as STATUS_DRIVER_OK, VIRTIO_CONFIG_S_FAILED as STATUS_FAILED,
    VIRTIO_CONFIG_S_NEEDS_RESET as STATUS_DEVICE_NEEDS_RESET,
};

use super::spec::*;

/// Where the guest's driver is with the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DriverState {
    /// No driver has touched the device since it was created or last reset.
    Absent,
    /// A driver found the device and is negotiating (before `DRIVER_OK`).
    Negotiating,
    /// The driver runs the device (`DRIVER_OK`) and has not failed it.
    Active,
    /// The driver set FAILED, the device needs a reset, or a request was answered ERROR.
    Failed,
}

impl DriverState {
    /// The state's name in the API: `absent`, `negotiating`, `active`, `failed`.
    pub fn name(self) -> &'static str {
        match self {
            DriverState::Absent => "absent",
            DriverState::Negotiating => "negotiating",
            DriverState::Active => "active",
            DriverState::Failed => "failed",
        }
    }
}

/// A request as the driver sent it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestRecord {
    /// The request type (`VIRTIO_MEM_REQ_*`, or any other number the driver wrote).
    pub kind: u16,
    /// Its guest physical address.
    pub addr: u64,
    /// Its number of blocks.
    pub nb_blocks: u16,
}

impl RequestRecord {
    /// The type's name: `plug`, `unplug`, `unplug_all`, `state`, or `type N`.
    pub fn kind_name(&self) -> String {
        match self.kind {
            VIRTIO_MEM_REQ_PLUG => "plug".into(),
            VIRTIO_MEM_REQ_UNPLUG => "unplug".into(),
            VIRTIO_MEM_REQ_UNPLUG_ALL => "unplug_all".into(),
            VIRTIO_MEM_REQ_STATE => "state".into(),
            other => format!("type {other}"),
        }
    }
}

/// A request the device answered ERROR, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorAnswer {
    /// The request; `None` when the chain was too malformed to read one.
    pub request: Option<RequestRecord>,
    /// Why it was answered ERROR.
    pub reason: String,
    /// When.
    pub at: Instant,
}

/// The driver's health at one instant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DriverHealth {
    /// Where the driver is.
    pub state: DriverState,
    /// The device status register as the driver reads it.
    pub status: u32,
    /// Why the state is [`DriverState::Failed`]; `None` otherwise.
    pub failure: Option<String>,
    /// Requests the driver sent since the device was created.
    pub requests: u64,
    /// When the driver's last request was taken off the queue.
    pub last_request: Option<Instant>,
    /// The last request answered ERROR (kept across resets: it says why a driver gave up).
    pub last_error: Option<ErrorAnswer>,
    /// Whether a driver ever touched the device.
    pub ever_bound: bool,
}

impl DriverHealth {
    /// One line for people: `no driver yet`, `negotiating`, `active`, or `failed: WHY`.
    pub fn summary(&self) -> String {
        match self.state {
            DriverState::Absent if self.ever_bound => "no driver (its driver reset it)".into(),
            DriverState::Absent => "no driver yet".into(),
            DriverState::Failed => {
                format!("failed: {}", self.failure.as_deref().unwrap_or("unknown"))
            }
            s => s.name().into(),
        }
    }
}

/// The health record the device keeps (under [`super::VirtioMemShared`]'s lock of its own).
#[derive(Debug, Default)]
pub(super) struct Health {
    status: u32,
    /// Why the device needs a reset (the transport's or the queue's reason), until the reset.
    needs_reset: Option<String>,
    /// A request was answered ERROR since the last reset.
    error_since_reset: bool,
    requests: u64,
    last_request: Option<Instant>,
    last_error: Option<ErrorAnswer>,
    ever_bound: bool,
}

impl Health {
    /// The status register changed to `status`; `why` when the device now needs a reset.
    pub(super) fn set_status(&mut self, status: u32, why: Option<&str>) {
        self.status = status;
        if status == 0 {
            // A reset: a new driver starts afresh (the last ERROR stays on record).
            self.needs_reset = None;
            self.error_since_reset = false;
            return;
        }
        self.ever_bound = true;
        if let Some(why) = why {
            self.needs_reset = Some(why.to_string());
        }
    }

    /// The queue failed: the device needs a reset.
    pub(super) fn queue_failed(&mut self, why: String) {
        self.needs_reset = Some(why);
    }

    /// A request was taken off the queue at `at`.
    pub(super) fn request(&mut self, at: Instant) {
        self.requests += 1;
        self.last_request = Some(at);
    }

    /// A request was answered ERROR.
    pub(super) fn error(&mut self, request: Option<RequestRecord>, reason: String) {
        self.error_since_reset = true;
        self.last_error = Some(ErrorAnswer {
            request,
            reason,
            at: Instant::now(),
        });
    }

    pub(super) fn snapshot(&self) -> DriverHealth {
        let needs_reset = self
            .needs_reset
            .as_ref()
            .filter(|_| self.status != 0)
            .map(|why| format!("the device needs a reset (DEVICE_NEEDS_RESET): {why}"))
            .or_else(|| {
                (self.status & STATUS_DEVICE_NEEDS_RESET != 0)
                    .then(|| "the device needs a reset (DEVICE_NEEDS_RESET)".to_string())
            });
        let failure = if self.status & STATUS_FAILED != 0 {
            Some("the driver set FAILED".to_string())
        } else if needs_reset.is_some() {
            needs_reset
        } else if self.error_since_reset {
            let why = self.last_error.as_ref().map_or("", |e| e.reason.as_str());
            Some(format!("a request was answered ERROR ({why})"))
        } else {
            None
        };
        let state = if failure.is_some() {
            DriverState::Failed
        } else if self.status & STATUS_DRIVER_OK != 0 {
            DriverState::Active
        } else if self.status & STATUS_ACKNOWLEDGE != 0 {
            DriverState::Negotiating
        } else {
            DriverState::Absent
        };
        DriverHealth {
            state,
            status: self.status,
            failure,
            requests: self.requests,
            last_request: self.last_request,
            last_error: self.last_error.clone(),
            ever_bound: self.ever_bound,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_bindings::virtio_config::{
        VIRTIO_CONFIG_S_DRIVER as STATUS_DRIVER, VIRTIO_CONFIG_S_FEATURES_OK as STATUS_FEATURES_OK,
    };

    #[test]
    fn states_follow_the_status_and_the_answers() {
        let mut h = Health::default();
        let s = h.snapshot();
        assert_eq!(
            (s.state, s.summary().as_str()),
            (DriverState::Absent, "no driver yet")
        );
        h.set_status(STATUS_ACKNOWLEDGE | STATUS_DRIVER, None);
        assert_eq!(h.snapshot().state, DriverState::Negotiating);
        let ok = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK;
        h.set_status(ok, None);
        assert_eq!(h.snapshot().state, DriverState::Active);
        let t = Instant::now();
        h.request(t);
        let bad = RequestRecord {
            kind: VIRTIO_MEM_REQ_PLUG,
            addr: 0x1000,
            nb_blocks: 1,
        };
        h.error(Some(bad), "not block aligned".into());
        let s = h.snapshot();
        assert_eq!(s.state, DriverState::Failed);
        assert_eq!(s.requests, 1);
        assert_eq!(s.last_request, Some(t));
        assert!(
            s.summary().contains("answered ERROR (not block aligned)"),
            "{}",
            s.summary()
        );
        assert_eq!(s.last_error.as_ref().unwrap().request, Some(bad));
        assert_eq!(bad.kind_name(), "plug");
        // The driver resets: absent again, the ERROR stays on record.
        h.set_status(0, None);
        let s = h.snapshot();
        assert_eq!(s.state, DriverState::Absent);
        assert_eq!(s.summary(), "no driver (its driver reset it)");
        assert!(s.last_error.is_some());
        // FAILED, and DEVICE_NEEDS_RESET with the transport's reason.
        h.set_status(ok | STATUS_FAILED, None);
        assert_eq!(h.snapshot().summary(), "failed: the driver set FAILED");
        h.set_status(0, None);
        h.set_status(
            ok | STATUS_DEVICE_NEEDS_RESET,
            Some("queue 0 has invalid rings"),
        );
        assert!(h.snapshot().summary().contains("invalid rings"));
        h.set_status(ok | STATUS_DEVICE_NEEDS_RESET, None);
        assert!(h.snapshot().summary().contains("invalid rings"));
        h.set_status(0, None);
        h.set_status(ok, None);
        h.queue_failed("bad ring".into());
        assert!(h.snapshot().summary().contains("bad ring"));
    }
}
