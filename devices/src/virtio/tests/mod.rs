//! Tests of the virtio-mmio transport and the virtio-mem device, driven the way a guest driver
//! would: descriptors and rings in guest memory (through virtio-queue's mock), registers through
//! the `BusDevice` interface. The harness is [`super::test_utils`]'s.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};

use memory::{GIB, MIB};
use virtio_bindings::virtio_config::*;
use virtio_bindings::virtio_mmio::{VIRTIO_MMIO_INT_CONFIG, VIRTIO_MMIO_INT_VRING};
use virtio_bindings::virtio_ring::VRING_DESC_F_NEXT;
use virtio_queue::desc::split::Descriptor as SplitDescriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemoryMmap};

use super::device::VirtioDevice;
use super::mem::*;
use super::mmio::*;
use super::test_utils::*;
use super::Error;
use crate::bus::BusDevice;

const ACK: Resp = (VIRTIO_MEM_RESP_ACK, 0, 10);
const NACK: Resp = (VIRTIO_MEM_RESP_NACK, 0, 10);
const BUSY: Resp = (VIRTIO_MEM_RESP_BUSY, 0, 10);
const ERROR: Resp = (VIRTIO_MEM_RESP_ERROR, 0, 10);
const PLUGGED: Resp = (VIRTIO_MEM_RESP_ACK, VIRTIO_MEM_STATE_PLUGGED, 10);
const UNPLUGGED: Resp = (VIRTIO_MEM_RESP_ACK, VIRTIO_MEM_STATE_UNPLUGGED, 10);
const MIXED: Resp = (VIRTIO_MEM_RESP_ACK, VIRTIO_MEM_STATE_MIXED, 10);

macro_rules! req {
    ($drv:expr, $dev:expr, $kind:expr, $addr:expr, $nb:expr) => {
        $drv.request($kind, $addr, $nb, &mut || $dev.process_queue(0).unwrap())
    };
}

use super::mem::{
    VIRTIO_MEM_REQ_PLUG as PLUG, VIRTIO_MEM_REQ_STATE as STATE, VIRTIO_MEM_REQ_UNPLUG as UNPLUG,
    VIRTIO_MEM_REQ_UNPLUG_ALL as UNPLUG_ALL,
};

/// Runs the driver's initialization up to and including DRIVER_OK.
fn init(t: &mut impl BusDevice, drv: &Driver) {
    wr(t, 0x70, 0);
    wr(t, 0x70, VIRTIO_CONFIG_S_ACKNOWLEDGE);
    wr(
        t,
        0x70,
        VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER,
    );
    set_features(t, VERSION_1 | UNPLUGGED_INACCESSIBLE);
    wr(
        t,
        0x70,
        VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER | VIRTIO_CONFIG_S_FEATURES_OK,
    );
    assert_ne!(rd(t, 0x70) & VIRTIO_CONFIG_S_FEATURES_OK, 0);
    wr(t, 0x30, 0);
    assert_eq!(rd(t, 0x34), 128);
    assert_eq!(rd(t, 0x44), 0);
    wr(t, 0x38, 128);
    let addr = |a: GuestAddress| (a.0 as u32, (a.0 >> 32) as u32);
    let (l, h) = addr(drv.q.desc_table_addr());
    wr(t, 0x80, l);
    wr(t, 0x84, h);
    let (l, h) = addr(drv.q.avail_addr());
    wr(t, 0x90, l);
    wr(t, 0x94, h);
    let (l, h) = addr(drv.q.used_addr());
    wr(t, 0xa0, l);
    wr(t, 0xa4, h);
    wr(t, 0x44, 1);
    assert_eq!(rd(t, 0x44), 1);
    wr(
        t,
        0x70,
        VIRTIO_CONFIG_S_ACKNOWLEDGE
            | VIRTIO_CONFIG_S_DRIVER
            | VIRTIO_CONFIG_S_FEATURES_OK
            | VIRTIO_CONFIG_S_DRIVER_OK,
    );
}

const RUNNING: u32 = VIRTIO_CONFIG_S_ACKNOWLEDGE
    | VIRTIO_CONFIG_S_DRIVER
    | VIRTIO_CONFIG_S_FEATURES_OK
    | VIRTIO_CONFIG_S_DRIVER_OK;

fn transport(
    region: Arc<FakeRegion>,
    requested: u64,
    mem: &GuestMemoryMmap,
) -> MmioTransport<VirtioMem<FakeRegion>> {
    MmioTransport::new(VirtioMem::new(region, requested).unwrap(), mem.clone()).unwrap()
}

mod concurrency;
mod requests;
mod transport;
