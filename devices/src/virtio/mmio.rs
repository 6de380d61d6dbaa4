//! A virtio-mmio transport, version 2 ("modern") only, as described in section 4.2 of the virtio
//! 1.2 specification.
//!
//! The transport owns the queue configuration until the driver sets `DRIVER_OK`; then it hands a
//! copy of every queue to the device ([`VirtioDevice::activate`]) and from then on forwards queue
//! notifications to [`VirtioDevice::process_queue`]. Every register access is guest controlled:
//! all of them get a defined answer and none can make the transport panic.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;

use log::{debug, error, warn, Level};

use crate::guest_log;
use virtio_bindings::virtio_config::*;
use virtio_bindings::virtio_mmio::*;
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::device::{VirtioDevice, VirtioInterrupt};
use super::{Error, Result};
use crate::bus::BusDevice;

/// The value of the magic register: "virt" in little endian.
pub const MMIO_MAGIC: u32 = 0x7472_6976;
/// The only transport version this implementation speaks.
pub const MMIO_VERSION: u32 = 2;
/// The vendor ID the transport reports: "TIDE" in little endian.
pub const MMIO_VENDOR_ID: u32 = 0x4544_4954;
/// The size of the MMIO window one transport needs (registers plus config space).
pub const MMIO_SIZE: u64 = 0x1000;
/// The offset of the queue notify register, where the vmm puts the queues' ioeventfds (with the
/// queue index as datamatch).
pub const NOTIFY_REG_OFFSET: u64 = VIRTIO_MMIO_QUEUE_NOTIFY as u64;
/// The offset at which the device-specific configuration space starts.
pub const CONFIG_SPACE_OFFSET: u64 = VIRTIO_MMIO_CONFIG as u64;

/// The interrupt line of one virtio-mmio transport.
///
/// It holds the interrupt status register and an event fd that the vmm registers as a KVM irqfd:
/// signalling the fd injects the transport's interrupt. Devices keep an `Arc` of it and raise
/// it from whatever thread they run on.
#[derive(Debug)]
pub struct Interrupt {
    status: AtomicU32,
    evt: EventFd,
    /// Set by a device that failed on its own thread; the transport shows DEVICE_NEEDS_RESET.
    failed: AtomicBool,
}

impl Interrupt {
    /// A new interrupt with no status bit set and a non-blocking event fd.
    pub fn new() -> Result<Self> {
        Ok(Self {
            status: AtomicU32::new(0),
            evt: EventFd::new(EFD_NONBLOCK).map_err(Error::EventFd)?,
            failed: AtomicBool::new(false),
        })
    }

    /// The event fd to register as the KVM irqfd of this transport's interrupt line.
    pub fn evt(&self) -> &EventFd {
        &self.evt
    }

    /// The current value of the interrupt status register.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::Acquire)
    }

    /// Clears the status bits set in `bits` (what a write to the interrupt ACK register does).
    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::AcqRel);
    }

    /// Whether [`Self::device_failed`] was called since the last reset.
    fn has_failed(&self) -> bool {
        self.failed.load(Ordering::Acquire)
    }

    fn clear(&self) {
        self.status.store(0, Ordering::Release);
        self.failed.store(false, Ordering::Release);
    }

    fn trigger(&self, bit: u32) -> Result<()> {
        self.status.fetch_or(bit, Ordering::AcqRel);
        self.evt.write(1).map_err(Error::Interrupt)
    }
}

impl VirtioInterrupt for Interrupt {
    fn trigger_used(&self) -> Result<()> {
        self.trigger(VIRTIO_MMIO_INT_VRING)
    }

    fn trigger_config(&self) -> Result<()> {
        self.trigger(VIRTIO_MMIO_INT_CONFIG)
    }

    /// The transport shows `DEVICE_NEEDS_RESET` until the driver resets it.
    fn device_failed(&self) {
        if !self.failed.swap(true, Ordering::AcqRel) {
            if let Err(e) = self.trigger_config() {
                error!("virtio-mmio: {e}");
            }
        }
    }
}

/// A virtio-mmio version 2 transport for the device `D`.
///
/// Put it on the MMIO bus with a window of [`MMIO_SIZE`] bytes; register each of
/// [`Self::queue_evts`] as an ioeventfd at `base + NOTIFY_REG_OFFSET` with the queue index as
/// datamatch and call [`Self::handle_queue_event`] when it fires; register
/// `self.interrupt().evt()` as the irqfd of the transport's interrupt line.
pub struct MmioTransport<D: VirtioDevice> {
    device: D,
    mem: GuestMemoryMmap,
    queues: Vec<Queue>,
    queue_evts: Vec<EventFd>,
    interrupt: Arc<Interrupt>,
    device_features_select: u32,
    driver_features_select: u32,
    driver_features: u64,
    queue_select: u32,
    /// The status bits the driver set (DEVICE_NEEDS_RESET is kept apart in `needs_reset`).
    status: u32,
    needs_reset: bool,
    activated: bool,
    /// FAILED and DEVICE_NEEDS_RESET as the status register showed them before resets.
    failures_before_reset: u32,
}

impl<D: VirtioDevice> MmioTransport<D> {
    /// A transport for `device` whose queues live in `mem`.
    ///
    /// Fails if the device offers a queue size that is not a power of two in 1..=32768 or if an
    /// event fd cannot be created.
    pub fn new(device: D, mem: GuestMemoryMmap) -> Result<Self> {
        let mut queues = Vec::new();
        let mut queue_evts = Vec::new();
        for &max in device.queue_max_sizes() {
            queues.push(Queue::new(max).map_err(Error::Queue)?);
            queue_evts.push(EventFd::new(EFD_NONBLOCK).map_err(Error::EventFd)?);
        }
        Ok(Self {
            device,
            mem,
            queues,
            queue_evts,
            interrupt: Arc::new(Interrupt::new()?),
            device_features_select: 0,
            driver_features_select: 0,
            driver_features: 0,
            queue_select: 0,
            status: 0,
            needs_reset: false,
            activated: false,
            failures_before_reset: 0,
        })
    }

    /// One event fd per queue, in queue order, to register as ioeventfds.
    pub fn queue_evts(&self) -> &[EventFd] {
        &self.queue_evts
    }

    /// The transport's interrupt line.
    pub fn interrupt(&self) -> Arc<Interrupt> {
        self.interrupt.clone()
    }

    /// The device behind the transport.
    pub fn device(&self) -> &D {
        &self.device
    }

    /// The device status register as the driver reads it.
    pub fn status(&self) -> u32 {
        self.status
            | if self.needs_reset || self.interrupt.has_failed() {
                VIRTIO_CONFIG_S_NEEDS_RESET
            } else {
                0
            }
    }

    /// The FAILED and DEVICE_NEEDS_RESET bits the status register has shown, resets included.
    pub fn failures_seen(&self) -> u32 {
        (self.failures_before_reset | self.status())
            & (VIRTIO_CONFIG_S_FAILED | VIRTIO_CONFIG_S_NEEDS_RESET)
    }

    /// Whether the device was activated (the driver set `DRIVER_OK` and activation succeeded).
    pub fn is_activated(&self) -> bool {
        self.activated
    }

    /// The ioeventfd of queue `index` fired: consume it and, if the device is active, process
    /// the queue. Out-of-range indices are ignored.
    pub fn handle_queue_event(&mut self, index: usize) {
        let Some(evt) = self.queue_evts.get(index) else {
            guest_log!(
                Level::Warn,
                "virtio-mmio bad queue event",
                "virtio-mmio: event for nonexistent queue {index}"
            );
            return;
        };
        if let Err(e) = evt.read() {
            if e.kind() != std::io::ErrorKind::WouldBlock {
                warn!("virtio-mmio: cannot read queue {index} event fd: {e}");
            }
        }
        self.process(index);
    }

    fn process(&mut self, index: usize) {
        if !self.activated
            || self.needs_reset
            || self.interrupt.has_failed()
            || index >= self.queues.len()
        {
            return;
        }
        if let Err(e) = self.device.process_queue(index) {
            self.device_failed(&format!("queue {index} processing failed: {e}"));
        }
    }

    /// The device cannot go on: set DEVICE_NEEDS_RESET and tell a running driver.
    fn device_failed(&mut self, why: &str) {
        guest_log!(
            Level::Error,
            "virtio-mmio device needs reset",
            "virtio-mmio: device {} needs reset: {why}",
            self.device.device_type()
        );
        self.needs_reset = true;
        if self.status & VIRTIO_CONFIG_S_DRIVER_OK != 0 {
            if let Err(e) = self.interrupt.trigger_config() {
                error!("virtio-mmio: {e}");
            }
        }
    }

    fn selected_queue(&self) -> Option<&Queue> {
        self.queues.get(self.queue_select as usize)
    }

    /// The selected queue if the driver may change its configuration now: after FEATURES_OK,
    /// before DRIVER_OK, and (unless `even_if_ready`) while the queue is not ready.
    fn configurable_queue(&mut self, even_if_ready: bool) -> Option<&mut Queue> {
        if self.status & VIRTIO_CONFIG_S_FEATURES_OK == 0
            || self.status & (VIRTIO_CONFIG_S_DRIVER_OK | VIRTIO_CONFIG_S_FAILED) != 0
        {
            return None;
        }
        let queue = self.queues.get_mut(self.queue_select as usize)?;
        if queue.ready() && !even_if_ready {
            return None;
        }
        Some(queue)
    }

    fn reset(&mut self) {
        debug!("virtio-mmio: reset of device {}", self.device.device_type());
        self.failures_before_reset = self.failures_seen();
        self.device.reset();
        for queue in &mut self.queues {
            queue.reset();
        }
        for evt in &self.queue_evts {
            // Drop any notification left over from before the reset.
            let _ = evt.read();
        }
        self.interrupt.clear();
        self.device_features_select = 0;
        self.driver_features_select = 0;
        self.driver_features = 0;
        self.queue_select = 0;
        self.status = 0;
        self.needs_reset = false;
        self.activated = false;
    }

    fn set_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        // DEVICE_NEEDS_RESET belongs to the device; the driver cannot set or clear it.
        let value = value & !VIRTIO_CONFIG_S_NEEDS_RESET;
        if value & VIRTIO_CONFIG_S_FAILED != 0 {
            debug!("virtio-mmio: driver marked the device FAILED");
            self.status |= VIRTIO_CONFIG_S_FAILED;
            return;
        }
        let current = self.status;
        if value & current != current {
            guest_log!(
                Level::Warn,
                "virtio-mmio status write out of order",
                "virtio-mmio: status write {value:#x} clears bits of {current:#x}; ignored"
            );
            return;
        }
        let added = value & !current;
        const AD: u32 = VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER;
        const ADF: u32 = AD | VIRTIO_CONFIG_S_FEATURES_OK;
        match (current, added) {
            (_, 0) => {}
            (0, VIRTIO_CONFIG_S_ACKNOWLEDGE) => self.status = VIRTIO_CONFIG_S_ACKNOWLEDGE,
            (VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER) => self.status = AD,
            (AD, VIRTIO_CONFIG_S_FEATURES_OK) => self.negotiate_features(),
            (ADF, VIRTIO_CONFIG_S_DRIVER_OK) => self.activate(),
            _ => guest_log!(
                Level::Warn,
                "virtio-mmio status write out of order",
                "virtio-mmio: status {current:#x} -> {value:#x} out of order; ignored"
            ),
        }
    }

    fn negotiate_features(&mut self) {
        let offered = self.device.avail_features();
        let acked = self.driver_features;
        if acked & !offered != 0 {
            guest_log!(Level::Warn, "virtio-mmio features refused", 
                "virtio-mmio: driver acked features {:#x} that were not offered; FEATURES_OK refused",
                acked & !offered
            );
            return;
        }
        if acked & (1 << VIRTIO_F_VERSION_1) == 0 {
            guest_log!(
                Level::Warn,
                "virtio-mmio features refused",
                "virtio-mmio: driver did not ack VIRTIO_F_VERSION_1; FEATURES_OK refused"
            );
            return;
        }
        match self.device.set_acked_features(acked) {
            Ok(()) => self.status |= VIRTIO_CONFIG_S_FEATURES_OK,
            Err(e) => guest_log!(
                Level::Warn,
                "virtio-mmio features refused",
                "virtio-mmio: device refused features {acked:#x}: {e}"
            ),
        }
    }

    fn activate(&mut self) {
        self.status |= VIRTIO_CONFIG_S_DRIVER_OK;
        if self.needs_reset {
            // A queue failed validation earlier: the driver must reset.
            self.device_failed("driver set DRIVER_OK on a device that needs reset");
            return;
        }
        let mut copies = Vec::with_capacity(self.queues.len());
        for (index, queue) in self.queues.iter().enumerate() {
            if queue.ready() && !queue.is_valid(&self.mem) {
                self.device_failed(&format!("queue {index} has invalid addresses or size"));
                return;
            }
            // virtio-queue's own state snapshot, restored into a fresh queue.
            match Queue::try_from(queue.state()).map_err(Error::Queue) {
                Ok(copy) => copies.push(copy),
                Err(e) => {
                    self.device_failed(&format!("cannot copy queue {index}: {e}"));
                    return;
                }
            }
        }
        match self
            .device
            .activate(self.mem.clone(), copies, self.interrupt.clone())
        {
            Ok(()) => self.activated = true,
            Err(e) => self.device_failed(&format!("activation failed: {e}")),
        }
    }

    fn set_queue_ready(&mut self, value: u32) {
        let mem = self.mem.clone();
        let Some(queue) = self.configurable_queue(true) else {
            return;
        };
        match value {
            0 => queue.set_ready(false),
            1 => {
                queue.set_ready(true);
                if !queue.is_valid(&mem) {
                    queue.set_ready(false);
                    let index = self.queue_select;
                    self.device_failed(&format!("queue {index} made ready with invalid rings"));
                }
            }
            _ => {}
        }
    }

    fn read_register(&self, offset: u64) -> u32 {
        // Registers lie below the configuration space: the offset fits.
        let Ok(offset) = u32::try_from(offset) else {
            return 0;
        };
        let queue = self.selected_queue();
        match offset {
            VIRTIO_MMIO_MAGIC_VALUE => MMIO_MAGIC,
            VIRTIO_MMIO_VERSION => MMIO_VERSION,
            VIRTIO_MMIO_DEVICE_ID => self.device.device_type(),
            VIRTIO_MMIO_VENDOR_ID => MMIO_VENDOR_ID,
            VIRTIO_MMIO_DEVICE_FEATURES => match self.device_features_select {
                0 => self.device.avail_features() as u32,
                1 => (self.device.avail_features() >> 32) as u32,
                _ => 0,
            },
            VIRTIO_MMIO_QUEUE_NUM_MAX => queue.map_or(0, |q| u32::from(q.max_size())),
            VIRTIO_MMIO_QUEUE_NUM => queue.map_or(0, |q| u32::from(q.size())),
            VIRTIO_MMIO_QUEUE_READY => queue.map_or(0, |q| u32::from(q.ready())),
            VIRTIO_MMIO_INTERRUPT_STATUS => self.interrupt.status(),
            VIRTIO_MMIO_STATUS => self.status(),
            VIRTIO_MMIO_QUEUE_DESC_LOW => queue.map_or(0, |q| q.desc_table() as u32),
            VIRTIO_MMIO_QUEUE_DESC_HIGH => queue.map_or(0, |q| (q.desc_table() >> 32) as u32),
            VIRTIO_MMIO_QUEUE_AVAIL_LOW => queue.map_or(0, |q| q.avail_ring() as u32),
            VIRTIO_MMIO_QUEUE_AVAIL_HIGH => queue.map_or(0, |q| (q.avail_ring() >> 32) as u32),
            VIRTIO_MMIO_QUEUE_USED_LOW => queue.map_or(0, |q| q.used_ring() as u32),
            VIRTIO_MMIO_QUEUE_USED_HIGH => queue.map_or(0, |q| (q.used_ring() >> 32) as u32),
            // No shared memory regions: their length reads as all ones ("no such region").
            VIRTIO_MMIO_SHM_LEN_LOW
            | VIRTIO_MMIO_SHM_LEN_HIGH
            | VIRTIO_MMIO_SHM_BASE_LOW
            | VIRTIO_MMIO_SHM_BASE_HIGH => u32::MAX,
            VIRTIO_MMIO_CONFIG_GENERATION => self.device.config_generation(),
            _ => 0,
        }
    }

    fn write_register(&mut self, offset: u64, value: u32) {
        let Ok(offset) = u32::try_from(offset) else {
            return;
        };
        match offset {
            VIRTIO_MMIO_DEVICE_FEATURES_SEL => self.device_features_select = value,
            VIRTIO_MMIO_DRIVER_FEATURES => {
                let negotiating = self.status & VIRTIO_CONFIG_S_DRIVER != 0
                    && self.status & (VIRTIO_CONFIG_S_FEATURES_OK | VIRTIO_CONFIG_S_FAILED) == 0;
                if !negotiating {
                    return;
                }
                match self.driver_features_select {
                    0 => {
                        self.driver_features =
                            (self.driver_features & !0xffff_ffff) | u64::from(value);
                    }
                    1 => {
                        self.driver_features =
                            (self.driver_features & 0xffff_ffff) | (u64::from(value) << 32);
                    }
                    // Features past bit 63 do not exist; the driver must write 0 there.
                    _ => {}
                }
            }
            VIRTIO_MMIO_DRIVER_FEATURES_SEL => self.driver_features_select = value,
            VIRTIO_MMIO_QUEUE_SEL => self.queue_select = value,
            VIRTIO_MMIO_QUEUE_NUM => {
                if let Some(q) = self.configurable_queue(false) {
                    // Invalid sizes (0, not a power of two, over the max) are ignored.
                    if q.try_set_size(value.try_into().unwrap_or(0)).is_err() {
                        debug!("virtio-mmio: queue size {value} refused");
                    }
                }
            }
            VIRTIO_MMIO_QUEUE_READY => self.set_queue_ready(value),
            VIRTIO_MMIO_QUEUE_NOTIFY => self.process(value as usize),
            VIRTIO_MMIO_INTERRUPT_ACK => self.interrupt.ack(value),
            VIRTIO_MMIO_STATUS => self.set_status(value),
            VIRTIO_MMIO_QUEUE_DESC_LOW => {
                self.set_queue_address(|q| q.set_desc_table_address(Some(value), None))
            }
            VIRTIO_MMIO_QUEUE_DESC_HIGH => {
                self.set_queue_address(|q| q.set_desc_table_address(None, Some(value)))
            }
            VIRTIO_MMIO_QUEUE_AVAIL_LOW => {
                self.set_queue_address(|q| q.set_avail_ring_address(Some(value), None))
            }
            VIRTIO_MMIO_QUEUE_AVAIL_HIGH => {
                self.set_queue_address(|q| q.set_avail_ring_address(None, Some(value)))
            }
            VIRTIO_MMIO_QUEUE_USED_LOW => {
                self.set_queue_address(|q| q.set_used_ring_address(Some(value), None))
            }
            VIRTIO_MMIO_QUEUE_USED_HIGH => {
                self.set_queue_address(|q| q.set_used_ring_address(None, Some(value)))
            }
            _ => {
                debug!("virtio-mmio: write {value:#x} to read-only or unknown register {offset:#x}")
            }
        }
    }

    fn set_queue_address(&mut self, set: impl FnOnce(&mut Queue)) {
        if let Some(q) = self.configurable_queue(false) {
            set(q);
        }
    }
}

impl<D: VirtioDevice> BusDevice for MmioTransport<D> {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_SPACE_OFFSET {
            data.fill(0);
            if matches!(data.len(), 1 | 2 | 4 | 8) {
                self.device.read_config(offset - CONFIG_SPACE_OFFSET, data);
            }
            return;
        }
        // Registers are 32 bits wide and 4-byte aligned: other accesses read as zero.
        if data.len() != 4 || offset & 3 != 0 {
            data.fill(0);
            return;
        }
        data.copy_from_slice(&self.read_register(offset).to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG_SPACE_OFFSET {
            if matches!(data.len(), 1 | 2 | 4 | 8) {
                self.device.write_config(offset - CONFIG_SPACE_OFFSET, data);
            }
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            debug!(
                "virtio-mmio: {}-byte register write at {offset:#x} ignored",
                data.len()
            );
            return;
        };
        if offset & 3 != 0 {
            return;
        }
        self.write_register(offset, u32::from_le_bytes(bytes));
    }
}
