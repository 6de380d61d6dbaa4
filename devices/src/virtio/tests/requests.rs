//! The virtio-mem requests: what each does to the region and its answer.

use super::*;

#[test]
fn plug_unplug_state_with_real_region() {
    let mem = guest_mem();
    let mut drv = Driver::new(&mem);
    let region = real_region(64 * MIB);
    let (mut dev, interrupt) = active_device(region.clone(), 16 * MIB, &mem, &drv);
    let shared = dev.shared();
    assert_eq!(region.unplugged_access(), UnpluggedAccess::Inaccessible);
    assert_eq!(shared.usable_region_size(), 64 * MIB);

    assert_eq!(req!(drv, dev, STATE, HP_BASE, 32), UNPLUGGED);
    assert_eq!(req!(drv, dev, PLUG, HP_BASE, 2), ACK);
    assert_eq!(
        interrupt.status() & VIRTIO_MMIO_INT_VRING,
        VIRTIO_MMIO_INT_VRING
    );
    assert_eq!(interrupt.evt().read().unwrap(), 2);
    assert_eq!(shared.plugged_size(), 4 * MIB);
    assert_eq!(region.plugged_bytes(), 4 * MIB);
    assert_eq!(req!(drv, dev, STATE, HP_BASE, 2), PLUGGED);
    assert_eq!(req!(drv, dev, STATE, HP_BASE, 3), MIXED);
    assert_eq!(req!(drv, dev, STATE, HP_BASE + 4 * MIB, 1), UNPLUGGED);
    // The plugged memory is really there and writable.
    assert!(region.resident_bytes().unwrap() >= 4 * MIB);

    assert_eq!(req!(drv, dev, UNPLUG, HP_BASE + BS, 1), ACK);
    assert_eq!(shared.plugged_size(), 2 * MIB);
    assert_eq!(req!(drv, dev, STATE, HP_BASE, 2), MIXED);

    // Plug up to the requested size, then one block more is NACKed.
    assert_eq!(req!(drv, dev, PLUG, HP_BASE + 32 * MIB, 7), ACK);
    assert_eq!(shared.plugged_size(), 16 * MIB);
    assert_eq!(req!(drv, dev, PLUG, HP_BASE + 2 * BS, 1), NACK);
    assert_eq!(shared.plugged_size(), 16 * MIB);

    assert_eq!(req!(drv, dev, UNPLUG_ALL, 0, 0), ACK);
    assert_eq!(shared.plugged_size(), 0);
    assert_eq!(region.plugged_bytes(), 0);
    assert_eq!(req!(drv, dev, STATE, HP_BASE, 32), UNPLUGGED);
    // UNPLUG_ALL with nothing plugged is fine too.
    assert_eq!(req!(drv, dev, UNPLUG_ALL, 0, 0), ACK);
}

#[test]
fn invalid_requests_get_error() {
    let mem = guest_mem();
    let mut drv = Driver::new(&mem);
    let region = real_region(64 * MIB);
    let (mut dev, _) = active_device(region.clone(), 64 * MIB, &mem, &drv);
    let shared = dev.shared();

    for kind in [PLUG, UNPLUG, STATE] {
        // Misaligned.
        assert_eq!(req!(drv, dev, kind, HP_BASE + 4096, 1), ERROR);
        assert_eq!(req!(drv, dev, kind, HP_BASE + MIB, 1), ERROR);
        // No blocks.
        assert_eq!(req!(drv, dev, kind, HP_BASE, 0), ERROR);
        // Below the region.
        assert_eq!(req!(drv, dev, kind, HP_BASE - BS, 1), ERROR);
        assert_eq!(req!(drv, dev, kind, 0, 1), ERROR);
        // Past the usable region (ends one block after it).
        assert_eq!(req!(drv, dev, kind, HP_BASE + 63 * MIB - MIB, 2), ERROR);
        assert_eq!(req!(drv, dev, kind, HP_BASE + 64 * MIB, 1), ERROR);
        // Overflowing the address space.
        assert_eq!(req!(drv, dev, kind, u64::MAX - BS + 1, 2), ERROR);
        // More than requested: a PLUG gets NACK whatever its range.
        let big = if kind == PLUG { NACK } else { ERROR };
        assert_eq!(req!(drv, dev, kind, HP_BASE, u16::MAX), big);
    }
    // The last block of the region is fine.
    assert_eq!(req!(drv, dev, PLUG, HP_BASE + 62 * MIB, 1), ACK);
    // PLUG of a range not wholly unplugged.
    assert_eq!(req!(drv, dev, PLUG, HP_BASE + 62 * MIB, 1), ERROR);
    assert_eq!(req!(drv, dev, PLUG, HP_BASE + 60 * MIB, 2), ERROR);
    // UNPLUG of a range not wholly plugged.
    assert_eq!(req!(drv, dev, UNPLUG, HP_BASE, 1), ERROR);
    assert_eq!(req!(drv, dev, UNPLUG, HP_BASE + 60 * MIB, 2), ERROR);
    // Unknown request types.
    assert_eq!(req!(drv, dev, 4, HP_BASE, 1), ERROR);
    assert_eq!(req!(drv, dev, u16::MAX, HP_BASE, 1), ERROR);
    assert_eq!(shared.plugged_size(), 2 * MIB);
    assert_eq!(region.plugged_bytes(), 2 * MIB);
}

#[test]
fn nack_comes_before_state_checks() {
    let mem = guest_mem();
    let mut drv = Driver::new(&mem);
    let (mut dev, _) = active_device(real_region(64 * MIB), 0, &mem, &drv);
    // Requested size 0: any plug is NACKed, of a valid range or not (checked first, as Cloud
    // Hypervisor does: a plug racing with a shrink must never get ERROR).
    assert_eq!(req!(drv, dev, PLUG, HP_BASE, 1), NACK);
    assert_eq!(req!(drv, dev, PLUG, HP_BASE + 1, 1), NACK);
    assert_eq!(req!(drv, dev, PLUG, HP_BASE + 64 * MIB, 1), NACK);
    dev.shared().set_requested_size(2 * MIB).unwrap();
    // Within the requested size, a malformed range is ERROR.
    assert_eq!(req!(drv, dev, PLUG, HP_BASE + 1, 1), ERROR);
    assert_eq!(req!(drv, dev, PLUG, HP_BASE, 0), ERROR);
    assert_eq!(req!(drv, dev, PLUG, HP_BASE, 1), ACK);
    assert_eq!(req!(drv, dev, PLUG, HP_BASE + BS, 1), NACK);
    // Lowering the requested size does not stop unplug.
    dev.shared().set_requested_size(0).unwrap();
    assert_eq!(req!(drv, dev, UNPLUG, HP_BASE, 1), ACK);
}

#[test]
fn failed_populate_is_busy_and_leaves_nothing_plugged() {
    let mem = guest_mem();
    let mut drv = Driver::new(&mem);
    let region = FakeRegion::new(64 * MIB);
    let (mut dev, interrupt) = active_device(region.clone(), 64 * MIB, &mem, &drv);
    let shared = dev.shared();
    assert!(!shared.retry_after_busy());

    region.fail_populate.store(true, Ordering::SeqCst);
    assert_eq!(req!(drv, dev, PLUG, HP_BASE, 4), BUSY);
    assert_eq!(shared.plugged_size(), 0);
    assert_eq!(region.plugged_bytes(), 0);
    assert_eq!(req!(drv, dev, STATE, HP_BASE, 4), UNPLUGGED);

    // The host says memory is back: the driver gets a config interrupt, once.
    interrupt.ack(VIRTIO_MMIO_INT_VRING | VIRTIO_MMIO_INT_CONFIG);
    assert!(shared.retry_after_busy());
    assert_eq!(interrupt.status(), VIRTIO_MMIO_INT_CONFIG);
    assert!(!shared.retry_after_busy());

    // A resize after a BUSY raises a config interrupt too.
    assert_eq!(req!(drv, dev, PLUG, HP_BASE, 4), BUSY);
    interrupt.ack(VIRTIO_MMIO_INT_VRING | VIRTIO_MMIO_INT_CONFIG);
    shared.set_requested_size(32 * MIB).unwrap();
    assert_eq!(interrupt.status(), VIRTIO_MMIO_INT_CONFIG);
    assert!(!shared.retry_after_busy());

    region.fail_populate.store(false, Ordering::SeqCst);
    assert_eq!(req!(drv, dev, PLUG, HP_BASE, 4), ACK);
    assert_eq!(shared.plugged_size(), 8 * MIB);
}

#[test]
fn bad_chain_shapes() {
    let mem = guest_mem();
    let mut drv = Driver::new(&mem);
    let region = FakeRegion::new(64 * MIB);
    let (mut dev, _) = active_device(region.clone(), 64 * MIB, &mem, &drv);
    let req_len = REQUEST_SIZE as u32;
    let resp_len = RESPONSE_SIZE as u32;

    let mut send = |drv: &mut Driver, descs: &[(u64, u32, bool)]| {
        drv.write_request(PLUG, HP_BASE, 1);
        drv.push(descs);
        dev.process_queue(0).unwrap();
        let (_, len) = drv.pop_used().unwrap();
        (drv.read_response().0, len)
    };
    let err = VIRTIO_MEM_RESP_ERROR;
    // Only a readable descriptor: nothing to answer in.
    assert_eq!(send(&mut drv, &[(REQ_BUF, req_len, false)]).1, 0);
    // Two readable descriptors.
    assert_eq!(
        send(
            &mut drv,
            &[(REQ_BUF, req_len, false), (RESP_BUF, resp_len, false)]
        )
        .1,
        0
    );
    // Only a writable descriptor.
    assert_eq!(send(&mut drv, &[(RESP_BUF, resp_len, true)]), (err, 10));
    // Short request.
    assert_eq!(
        send(
            &mut drv,
            &[(REQ_BUF, 23, false), (RESP_BUF, resp_len, true)]
        ),
        (err, 10)
    );
    // Short response buffer: as much of the ERROR as fits.
    assert_eq!(
        send(&mut drv, &[(REQ_BUF, req_len, false), (RESP_BUF, 2, true)]),
        (err, 2)
    );
    // Writable then readable.
    assert_eq!(
        send(
            &mut drv,
            &[(RESP_BUF, resp_len, true), (REQ_BUF, req_len, false)]
        ),
        (err, 10)
    );
    // Request outside guest memory.
    assert_eq!(
        send(
            &mut drv,
            &[(0x4000_0000, req_len, false), (RESP_BUF, resp_len, true)]
        ),
        (err, 10)
    );
    // Request in unplugged hotplug memory.
    assert_eq!(
        send(
            &mut drv,
            &[(HP_BASE, req_len, false), (RESP_BUF, resp_len, true)]
        ),
        (err, 10)
    );
    // Response outside guest memory: used with length 0.
    assert_eq!(
        send(
            &mut drv,
            &[(REQ_BUF, req_len, false), (0x4000_0000, resp_len, true)]
        )
        .1,
        0
    );
    // Response address that wraps.
    assert_eq!(
        send(
            &mut drv,
            &[(REQ_BUF, req_len, false), (u64::MAX - 4, resp_len, true)]
        )
        .1,
        0
    );
    assert_eq!(region.plugged_bytes(), 0);
    // Longer chains with the right first two descriptors work.
    assert_eq!(
        send(
            &mut drv,
            &[
                (REQ_BUF, req_len, false),
                (RESP_BUF, resp_len, true),
                (RESP_BUF + 0x100, 16, true)
            ]
        ),
        (VIRTIO_MEM_RESP_ACK, 10)
    );
    assert_eq!(region.plugged_bytes(), BS);
    // The device still works after all that.
    assert_eq!(req!(drv, dev, STATE, HP_BASE, 1), PLUGGED);
}

#[test]
fn looping_and_hostile_chains_do_not_hang() {
    let mem = guest_mem();
    let drv = Driver::new(&mem);
    let region = FakeRegion::new(64 * MIB);
    let (mut dev, _) = active_device(region, 64 * MIB, &mem, &drv);
    // A descriptor that points at itself.
    let d = SplitDescriptor::new(REQ_BUF, 24, VRING_DESC_F_NEXT as u16, 0);
    drv.q.desc_table().store(0, RawDescriptor::from(d)).unwrap();
    drv.q.avail().ring().ref_at(0).unwrap().store(0);
    drv.q.avail().idx().store(1);
    dev.process_queue(0).unwrap();
    assert_eq!(drv.q.used().idx().load(), 1);
    // A head index past the queue: the used ring refuses it, the device needs reset.
    drv.q.avail().ring().ref_at(1).unwrap().store(500);
    drv.q.avail().idx().store(2);
    assert!(dev.process_queue(0).is_err());
    // An avail index far ahead of the device.
    drv.q.avail().idx().store(1000);
    assert!(matches!(dev.process_queue(0), Err(Error::Queue(_))));
    // Bad queue index.
    assert!(matches!(dev.process_queue(1), Err(Error::BadQueueIndex(1))));
}

#[test]
fn usable_region_size_follows_requested_and_plugged() {
    let region = FakeRegion::new(8 * GIB);
    let dev = VirtioMem::new(region.clone(), 0).unwrap();
    let shared = dev.shared();
    assert_eq!(shared.region_size(), 8 * GIB);
    assert_eq!(shared.block_size(), BS);
    assert_eq!(shared.addr(), GuestAddress(HP_BASE));
    assert_eq!(shared.usable_region_size(), GIB);
    shared.set_requested_size(512 * MIB).unwrap();
    assert_eq!(shared.usable_region_size(), 512 * MIB + GIB);
    shared.set_requested_size(3 * GIB).unwrap();
    assert_eq!(shared.usable_region_size(), 6 * GIB);
    shared.set_requested_size(5 * GIB).unwrap();
    assert_eq!(shared.usable_region_size(), 8 * GIB);
    assert_eq!(shared.requested_size(), 5 * GIB);

    assert!(matches!(
        shared.set_requested_size(MIB),
        Err(Error::RequestedSizeUnaligned { .. })
    ));
    assert!(matches!(
        shared.set_requested_size(8 * GIB + BS),
        Err(Error::RequestedSizeTooLarge { .. })
    ));
    assert_eq!(shared.requested_size(), 5 * GIB);

    // The usable region never shrinks with the requested size: only UNPLUG_ALL shrinks it.
    shared.set_requested_size(0).unwrap();
    assert_eq!(shared.usable_region_size(), 8 * GIB);
    let mem = guest_mem();
    let mut drv = Driver::new(&mem);
    let (mut dev, _) = active_device(region, 5 * GIB, &mem, &drv);
    let shared = dev.shared();
    assert_eq!(shared.usable_region_size(), 8 * GIB);
    assert_eq!(req!(drv, dev, PLUG, HP_BASE + 4 * GIB, 1), ACK);
    shared.set_requested_size(0).unwrap();
    assert_eq!(shared.usable_region_size(), 8 * GIB);
    assert_eq!(req!(drv, dev, UNPLUG, HP_BASE + 4 * GIB, 1), ACK);
    assert_eq!(shared.usable_region_size(), 8 * GIB);
    assert_eq!(req!(drv, dev, STATE, HP_BASE + 4 * GIB, 1), UNPLUGGED);
    assert_eq!(req!(drv, dev, UNPLUG_ALL, 0, 0), ACK);
    assert_eq!(shared.usable_region_size(), GIB);
    // Requests past the usable region are now errors.
    assert_eq!(req!(drv, dev, STATE, HP_BASE + 4 * GIB, 1), ERROR);
}

/// A probe with a real driver: requested 6 GiB, 3 GiB plugged, then requested 1 GiB while the
/// driver plugs. Its next plug must be NACK (Linux retries), never ERROR (Linux marks the
/// device broken until reboot); every growth of the usable region raises a config interrupt.
#[test]
fn resize_reversed_during_a_plug_gets_nack_never_error() {
    let mem = guest_mem();
    let mut drv = Driver::new(&mem);
    let region = FakeRegion::new(16 * GIB);
    let (mut dev, interrupt) = active_device(region, 6 * GIB, &mem, &drv);
    let shared = dev.shared();
    let usable = shared.usable_region_size();
    assert_eq!(usable, 12 * GIB);
    let block = 128 * MIB;
    let nb = (block / BS) as u16;
    for i in 0..24 {
        assert_eq!(req!(drv, dev, PLUG, HP_BASE + i * block, nb), ACK);
    }
    assert_eq!(shared.plugged_size(), 3 * GIB);
    interrupt.ack(VIRTIO_MMIO_INT_CONFIG | VIRTIO_MMIO_INT_VRING);
    shared.set_requested_size(GIB).unwrap();
    assert_eq!(
        interrupt.status() & VIRTIO_MMIO_INT_CONFIG,
        VIRTIO_MMIO_INT_CONFIG
    );
    assert_eq!(shared.usable_region_size(), usable);
    assert_eq!(req!(drv, dev, PLUG, HP_BASE + 24 * block, nb), NACK);
    assert_eq!(req!(drv, dev, PLUG, HP_BASE + 11 * GIB, nb), NACK);
    // The driver turns around and unplugs 2 MiB sub-blocks from the top.
    for i in 0..4 {
        let top = HP_BASE + 3 * GIB - (i + 1) * BS;
        assert_eq!(req!(drv, dev, UNPLUG, top, 1), ACK);
    }
    assert_eq!(shared.usable_region_size(), usable);
    // Growing past the old usable region raises the usable size and a config interrupt.
    interrupt.ack(VIRTIO_MMIO_INT_CONFIG | VIRTIO_MMIO_INT_VRING);
    let generation = shared.config_generation();
    shared.set_requested_size(7 * GIB).unwrap();
    assert_eq!(shared.usable_region_size(), 14 * GIB);
    assert_ne!(shared.config_generation(), generation);
    assert_eq!(
        interrupt.status() & VIRTIO_MMIO_INT_CONFIG,
        VIRTIO_MMIO_INT_CONFIG
    );
}

/// Bookkeeping follows the request, not the region: an UNPLUG, PLUG or STATE of one block in a
/// 1 TiB region looks at that block only (it used to search the whole region for the highest
/// plugged block after every unplug).
#[test]
fn one_block_requests_look_at_one_block() {
    let mem = guest_mem();
    let mut drv = Driver::new(&mem);
    let region = FakeRegion::new(1 << 40);
    let (mut dev, _) = active_device(region.clone(), 1 << 39, &mem, &drv);
    assert_eq!(req!(drv, dev, PLUG, HP_BASE + (1 << 38), 1), ACK);
    assert_eq!(req!(drv, dev, PLUG, HP_BASE + (1 << 38) + BS, 1), ACK);
    region.state_blocks.store(0, Ordering::SeqCst);
    assert_eq!(req!(drv, dev, UNPLUG, HP_BASE + (1 << 38) + BS, 1), ACK);
    assert_eq!(req!(drv, dev, STATE, HP_BASE + (1 << 38), 1), PLUGGED);
    assert_eq!(req!(drv, dev, PLUG, HP_BASE + (1 << 38) + BS, 1), ACK);
    // Per request: one state check of the range, plus the buffer checks (outside the region).
    assert!(region.state_blocks.load(Ordering::SeqCst) <= 3);
}

#[test]
fn new_rejects_bad_geometry_and_sizes() {
    assert!(matches!(
        VirtioMem::new(FakeRegion::new(64 * MIB), MIB),
        Err(Error::RequestedSizeUnaligned { .. })
    ));
    assert!(matches!(
        VirtioMem::new(FakeRegion::new(64 * MIB), 66 * MIB),
        Err(Error::RequestedSizeTooLarge { .. })
    ));
    let mut bad = Arc::into_inner(FakeRegion::new(64 * MIB)).unwrap();
    bad.base = HP_BASE + MIB;
    let bad = Arc::new(bad);
    assert!(matches!(
        VirtioMem::new(bad, 0),
        Err(Error::BadRegion { .. })
    ));
}
