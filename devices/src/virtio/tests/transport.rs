//! The virtio-mmio transport: registers, feature negotiation, the status machine, reset.

use super::*;

#[test]
fn identification_registers() {
    let mem = guest_mem();
    let mut t = transport(FakeRegion::new(64 * MIB), 0, &mem);
    assert_eq!(rd(&mut t, 0x0), 0x7472_6976);
    assert_eq!(rd(&mut t, 0x4), 2);
    assert_eq!(rd(&mut t, 0x8), 24);
    assert_eq!(rd(&mut t, 0xc), MMIO_VENDOR_ID);
    assert_eq!(rd(&mut t, 0x70), 0);
    assert_eq!(t.queue_evts().len(), 1);
    // Device features, 32 bits at a time.
    wr(&mut t, 0x14, 0);
    assert_eq!(rd(&mut t, 0x10), 1 << 1);
    wr(&mut t, 0x14, 1);
    assert_eq!(rd(&mut t, 0x10), 1);
    wr(&mut t, 0x14, 2);
    assert_eq!(rd(&mut t, 0x10), 0);
    // Non-4-byte and unaligned register accesses read as zero.
    let mut b = [0xffu8; 2];
    t.read(0, &mut b);
    assert_eq!(b, [0, 0]);
    let mut b = [0xffu8; 8];
    t.read(0, &mut b);
    assert_eq!(b, [0; 8]);
    assert_eq!(rd(&mut t, 0x2), 0);
    // Unknown registers read as zero; no shared memory regions.
    assert_eq!(rd(&mut t, 0x40), 0);
    assert_eq!(rd(&mut t, 0xb0), u32::MAX);
}

#[test]
fn feature_negotiation() {
    let mem = guest_mem();
    let region = FakeRegion::new(64 * MIB);
    let mut t = transport(region.clone(), 0, &mem);
    let ad = VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER;
    // Features before DRIVER are ignored; FEATURES_OK before DRIVER is out of order.
    wr(&mut t, 0x70, VIRTIO_CONFIG_S_ACKNOWLEDGE);
    set_features(&mut t, VERSION_1);
    wr(
        &mut t,
        0x70,
        VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_FEATURES_OK,
    );
    assert_eq!(rd(&mut t, 0x70), VIRTIO_CONFIG_S_ACKNOWLEDGE);
    wr(&mut t, 0x70, ad);
    // Without VERSION_1: refused.
    set_features(&mut t, UNPLUGGED_INACCESSIBLE);
    wr(&mut t, 0x70, ad | VIRTIO_CONFIG_S_FEATURES_OK);
    assert_eq!(rd(&mut t, 0x70), ad);
    // Unknown feature: refused.
    set_features(&mut t, VERSION_1 | 1 << 2);
    wr(&mut t, 0x70, ad | VIRTIO_CONFIG_S_FEATURES_OK);
    assert_eq!(rd(&mut t, 0x70), ad);
    set_features(&mut t, VERSION_1 | 1 << 40);
    wr(&mut t, 0x70, ad | VIRTIO_CONFIG_S_FEATURES_OK);
    assert_eq!(rd(&mut t, 0x70), ad);
    // Feature select past 1 is ignored.
    set_features(&mut t, VERSION_1);
    wr(&mut t, 0x24, 2);
    wr(&mut t, 0x20, 0xffff_ffff);
    wr(&mut t, 0x70, ad | VIRTIO_CONFIG_S_FEATURES_OK);
    assert_eq!(rd(&mut t, 0x70), ad | VIRTIO_CONFIG_S_FEATURES_OK);
    assert_eq!(
        *region.access.lock().unwrap(),
        Some(UnpluggedAccess::Readable)
    );
    // Features cannot change after FEATURES_OK.
    set_features(&mut t, VERSION_1 | 1 << 2);
    wr(&mut t, 0x70, ad | VIRTIO_CONFIG_S_FEATURES_OK);
    assert_eq!(rd(&mut t, 0x70), ad | VIRTIO_CONFIG_S_FEATURES_OK);

    // After a reset, acking UNPLUGGED_INACCESSIBLE makes unplugged memory inaccessible.
    wr(&mut t, 0x70, 0);
    assert_eq!(rd(&mut t, 0x70), 0);
    wr(&mut t, 0x70, VIRTIO_CONFIG_S_ACKNOWLEDGE);
    wr(&mut t, 0x70, ad);
    set_features(&mut t, VERSION_1 | UNPLUGGED_INACCESSIBLE);
    wr(&mut t, 0x70, ad | VIRTIO_CONFIG_S_FEATURES_OK);
    assert_eq!(rd(&mut t, 0x70), ad | VIRTIO_CONFIG_S_FEATURES_OK);
    assert_eq!(
        *region.access.lock().unwrap(),
        Some(UnpluggedAccess::Inaccessible)
    );
}

#[test]
fn status_machine_rejects_out_of_order_writes() {
    let mem = guest_mem();
    let mut t = transport(FakeRegion::new(64 * MIB), 0, &mem);
    wr(&mut t, 0x70, VIRTIO_CONFIG_S_DRIVER_OK);
    assert_eq!(rd(&mut t, 0x70), 0);
    wr(
        &mut t,
        0x70,
        VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER | VIRTIO_CONFIG_S_DRIVER_OK,
    );
    assert_eq!(rd(&mut t, 0x70), 0);
    wr(&mut t, 0x70, VIRTIO_CONFIG_S_ACKNOWLEDGE);
    wr(
        &mut t,
        0x70,
        VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER,
    );
    // DRIVER_OK without FEATURES_OK.
    wr(
        &mut t,
        0x70,
        VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER | VIRTIO_CONFIG_S_DRIVER_OK,
    );
    assert_eq!(
        rd(&mut t, 0x70),
        VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER
    );
    assert!(!t.is_activated());
    // Clearing bits is ignored; NEEDS_RESET cannot be set by the driver.
    wr(&mut t, 0x70, VIRTIO_CONFIG_S_ACKNOWLEDGE);
    assert_eq!(
        rd(&mut t, 0x70),
        VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER
    );
    wr(
        &mut t,
        0x70,
        VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER | VIRTIO_CONFIG_S_NEEDS_RESET,
    );
    assert_eq!(
        rd(&mut t, 0x70),
        VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER
    );
    // FAILED sticks until reset.
    wr(&mut t, 0x70, VIRTIO_CONFIG_S_FAILED);
    assert_eq!(
        rd(&mut t, 0x70),
        VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER | VIRTIO_CONFIG_S_FAILED
    );
    set_features(&mut t, VERSION_1);
    wr(
        &mut t,
        0x70,
        VIRTIO_CONFIG_S_ACKNOWLEDGE
            | VIRTIO_CONFIG_S_DRIVER
            | VIRTIO_CONFIG_S_FAILED
            | VIRTIO_CONFIG_S_FEATURES_OK,
    );
    assert_eq!(rd(&mut t, 0x70) & VIRTIO_CONFIG_S_FEATURES_OK, 0);
    assert_eq!(t.failures_seen(), VIRTIO_CONFIG_S_FAILED);
    wr(&mut t, 0x70, 0);
    assert_eq!(rd(&mut t, 0x70), 0);
    // The reset clears the register, not the record that the driver once gave up.
    assert_eq!(t.failures_seen(), VIRTIO_CONFIG_S_FAILED);
}

#[test]
fn full_driver_sequence_and_reset_keeps_the_plug_state() {
    let mem = guest_mem();
    let mut drv = Driver::new(&mem);
    let region = FakeRegion::new(64 * MIB);
    let mut t = transport(region.clone(), 8 * MIB, &mem);
    let shared = t.device().shared();
    let interrupt = t.interrupt();
    // Queue registers cannot be written before FEATURES_OK.
    wr(&mut t, 0x38, 64);
    assert_eq!(rd(&mut t, 0x38), 128);
    init(&mut t, &drv);
    assert_eq!(rd(&mut t, 0x70), RUNNING);
    assert!(t.is_activated());
    // Queue registers cannot be written after DRIVER_OK.
    wr(&mut t, 0x38, 64);
    assert_eq!(rd(&mut t, 0x38), 128);
    assert_eq!(rd(&mut t, 0x80), drv.q.desc_table_addr().0 as u32);

    // A notify written as an access processes the queue directly.
    let r = drv.request(PLUG, HP_BASE, 2, &mut || wr(&mut t, 0x50, 0));
    assert_eq!(r, ACK);
    assert_eq!(rd(&mut t, 0x60), VIRTIO_MMIO_INT_VRING);
    wr(&mut t, 0x64, VIRTIO_MMIO_INT_VRING);
    assert_eq!(rd(&mut t, 0x60), 0);
    // A notify through the ioeventfd.
    let r = drv.request(STATE, HP_BASE, 2, &mut || {
        t.queue_evts()[0].write(1).unwrap();
        t.handle_queue_event(0);
    });
    assert_eq!(r, PLUGGED);
    // Notifies of queues that do not exist are ignored.
    wr(&mut t, 0x50, 7);
    t.handle_queue_event(7);
    assert_eq!(rd(&mut t, 0x70), RUNNING);

    // Config space: 64-bit fields as two 32-bit reads.
    assert_eq!(cfg64(&mut t, 0x00), BS);
    assert_eq!(cfg64(&mut t, 0x10), HP_BASE);
    assert_eq!(cfg64(&mut t, 0x18), 64 * MIB);
    assert_eq!(cfg64(&mut t, 0x20), 64 * MIB);
    assert_eq!(cfg64(&mut t, 0x28), 4 * MIB);
    assert_eq!(cfg64(&mut t, 0x30), 8 * MIB);
    // Other widths.
    let mut b8 = [0u8; 8];
    t.read(0x130, &mut b8);
    assert_eq!(u64::from_le_bytes(b8), 8 * MIB);
    let mut b2 = [0xffu8; 2];
    t.read(0x108, &mut b2);
    assert_eq!(b2, [0, 0]);
    let mut b1 = [0u8; 1];
    t.read(0x100 + 2, &mut b1);
    assert_eq!(b1[0], (BS >> 16) as u8);
    // Odd widths and offsets past the config space read as zero.
    let mut b3 = [0xffu8; 3];
    t.read(0x100, &mut b3);
    assert_eq!(b3, [0; 3]);
    assert_eq!(rd(&mut t, 0x100 + 0x38), 0);
    assert_eq!(rd(&mut t, 0x100 + 0x34), ((8 * MIB) >> 32) as u32);
    assert_eq!(rd(&mut t, 0xffc), 0);
    let mut b8 = [0xffu8; 8];
    t.read(0x134, &mut b8);
    assert_eq!(b8, [0; 8]);
    // Config writes are ignored.
    wr(&mut t, 0x130, 0);
    assert_eq!(cfg64(&mut t, 0x30), 8 * MIB);

    // A resize bumps the generation and raises a config interrupt.
    wr(&mut t, 0x64, VIRTIO_MMIO_INT_VRING | VIRTIO_MMIO_INT_CONFIG);
    let generation = rd(&mut t, 0xfc);
    shared.set_requested_size(16 * MIB).unwrap();
    assert_ne!(rd(&mut t, 0xfc), generation);
    assert_eq!(rd(&mut t, 0x60), VIRTIO_MMIO_INT_CONFIG);
    assert_eq!(cfg64(&mut t, 0x30), 16 * MIB);
    assert!(interrupt.evt().read().unwrap() > 0);

    // Reset: the plug state stays (virtio 1.2 5.15.5: the device MUST NOT change the state of
    // memory blocks during device reset), queues back to their defaults, no interrupt pending.
    wr(&mut t, 0x70, 0);
    assert_eq!(rd(&mut t, 0x70), 0);
    assert_eq!(rd(&mut t, 0x60), 0);
    assert_eq!(rd(&mut t, 0x44), 0);
    assert!(!t.is_activated());
    assert_eq!(region.plugged_bytes(), 4 * MIB);
    assert_eq!(shared.plugged_size(), 4 * MIB);
    assert_eq!(cfg64(&mut t, 0x28), 4 * MIB);
    // A resize while the driver is not running raises no interrupt.
    shared.set_requested_size(8 * MIB).unwrap();
    assert_eq!(rd(&mut t, 0x60), 0);

    // The next driver (kexec, a rebind) finds plugged_size != 0 and sends UNPLUG_ALL first,
    // as Linux's driver does at probe.
    let mut drv = Driver::new(&mem);
    init(&mut t, &drv);
    assert_eq!(rd(&mut t, 0x70), RUNNING);
    assert_eq!(cfg64(&mut t, 0x28), 4 * MIB);
    let r = drv.request(STATE, HP_BASE, 2, &mut || wr(&mut t, 0x50, 0));
    assert_eq!(r, PLUGGED);
    let r = drv.request(UNPLUG_ALL, 0, 0, &mut || wr(&mut t, 0x50, 0));
    assert_eq!(r, ACK);
    assert_eq!(cfg64(&mut t, 0x28), 0);
    assert_eq!(region.plugged_bytes(), 0);
    let r = drv.request(PLUG, HP_BASE, 1, &mut || wr(&mut t, 0x50, 0));
    assert_eq!(r, ACK);
}

#[test]
fn queue_with_bad_addresses_needs_reset() {
    let mem = guest_mem();
    let mut t = transport(FakeRegion::new(64 * MIB), 0, &mem);
    let ad = VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER;
    wr(&mut t, 0x70, VIRTIO_CONFIG_S_ACKNOWLEDGE);
    wr(&mut t, 0x70, ad);
    set_features(&mut t, VERSION_1);
    wr(&mut t, 0x70, ad | VIRTIO_CONFIG_S_FEATURES_OK);
    // Used ring outside guest memory.
    wr(&mut t, 0xa0, 0);
    wr(&mut t, 0xa4, 1);
    wr(&mut t, 0x44, 1);
    assert_eq!(rd(&mut t, 0x44), 0);
    assert_ne!(rd(&mut t, 0x70) & VIRTIO_CONFIG_S_NEEDS_RESET, 0);
    wr(
        &mut t,
        0x70,
        ad | VIRTIO_CONFIG_S_FEATURES_OK | VIRTIO_CONFIG_S_DRIVER_OK,
    );
    assert!(!t.is_activated());
    assert_eq!(rd(&mut t, 0x70), RUNNING | VIRTIO_CONFIG_S_NEEDS_RESET);
    assert_eq!(rd(&mut t, 0x60), VIRTIO_MMIO_INT_CONFIG);
    wr(&mut t, 0x70, 0);
    assert_eq!(rd(&mut t, 0x70), 0);
}

#[test]
fn processing_failure_sets_needs_reset() {
    let mem = guest_mem();
    let drv = Driver::new(&mem);
    let mut t = transport(FakeRegion::new(64 * MIB), 0, &mem);
    init(&mut t, &drv);
    // The driver claims far more buffers than the queue holds.
    drv.q.avail().idx().store(1000);
    wr(&mut t, 0x50, 0);
    assert_eq!(rd(&mut t, 0x70), RUNNING | VIRTIO_CONFIG_S_NEEDS_RESET);
    assert_eq!(
        rd(&mut t, 0x60) & VIRTIO_MMIO_INT_CONFIG,
        VIRTIO_MMIO_INT_CONFIG
    );
    // Further notifies are ignored until reset.
    wr(&mut t, 0x50, 0);
    wr(&mut t, 0x70, 0);
    assert_eq!(rd(&mut t, 0x70), 0);
    assert_eq!(t.failures_seen(), VIRTIO_CONFIG_S_NEEDS_RESET);
}

#[test]
fn invalid_queue_sizes_and_selects_are_ignored() {
    let mem = guest_mem();
    let mut t = transport(FakeRegion::new(64 * MIB), 0, &mem);
    let ad = VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER;
    wr(&mut t, 0x70, VIRTIO_CONFIG_S_ACKNOWLEDGE);
    wr(&mut t, 0x70, ad);
    set_features(&mut t, VERSION_1);
    wr(&mut t, 0x70, ad | VIRTIO_CONFIG_S_FEATURES_OK);
    for bad in [0, 3, 256, 0x1_0000, u32::MAX] {
        wr(&mut t, 0x38, bad);
        assert_eq!(rd(&mut t, 0x38), 128);
    }
    wr(&mut t, 0x38, 64);
    assert_eq!(rd(&mut t, 0x38), 64);
    // Unaligned ring addresses are refused.
    wr(&mut t, 0x80, 0x1001);
    assert_eq!(rd(&mut t, 0x80), 0);
    // A queue that does not exist.
    wr(&mut t, 0x30, 1);
    assert_eq!(rd(&mut t, 0x34), 0);
    assert_eq!(rd(&mut t, 0x38), 0);
    wr(&mut t, 0x38, 64);
    wr(&mut t, 0x44, 1);
    assert_eq!(rd(&mut t, 0x44), 0);
    wr(&mut t, 0x30, u32::MAX);
    wr(&mut t, 0x44, 1);
    assert_eq!(rd(&mut t, 0x44), 0);
    assert_eq!(rd(&mut t, 0x70) & VIRTIO_CONFIG_S_NEEDS_RESET, 0);
    assert_eq!(t.failures_seen(), 0);
}

#[test]
fn hostile_register_sequences_do_not_panic() {
    let mem = guest_mem();
    let drv = Driver::new(&mem);
    let region = FakeRegion::new(64 * MIB);
    let mut t = transport(region, 32 * MIB, &mem);
    let mut seed = 0x1234_5678_9abc_def0u64;
    let mut next = || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let interesting = [
        0u32,
        1,
        2,
        3,
        4,
        8,
        0x7f,
        0xff,
        128,
        0x1000,
        u32::MAX,
        RUNNING,
        VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER,
    ];
    for round in 0..20_000 {
        if round % 2000 == 0 {
            init(&mut t, &drv);
        }
        let r = next();
        let offset = if r & 1 == 0 {
            ((r >> 8) % 0x120) & !3
        } else {
            (r >> 8) % 0x1100
        };
        let len = [1usize, 2, 3, 4, 4, 4, 8][((r >> 40) % 7) as usize];
        let value = if r & 2 == 0 {
            interesting[((r >> 48) % interesting.len() as u64) as usize]
        } else {
            (r >> 16) as u32
        };
        if r & 4 == 0 {
            let mut b = vec![0u8; len];
            t.read(offset, &mut b);
        } else {
            let mut b = value.to_le_bytes().to_vec();
            b.resize(len, 0);
            t.write(offset, &b);
        }
        if round % 97 == 0 {
            t.handle_queue_event((r >> 20) as usize % 3);
        }
        if round % 131 == 0 {
            // Garbage in the ring as well.
            drv.q.avail().idx().store((r >> 24) as u16);
            drv.q
                .avail()
                .ring()
                .ref_at(((r >> 32) % 128) as usize)
                .unwrap()
                .store((r >> 36) as u16);
        }
    }
    // The device can always be reset and brought up again.
    let mut drv = Driver::new(&mem);
    init(&mut t, &drv);
    assert_eq!(rd(&mut t, 0x70), RUNNING);
    let r = drv.request(UNPLUG_ALL, 0, 0, &mut || wr(&mut t, 0x50, 0));
    assert_eq!(r, ACK);
    assert_eq!(t.device().shared().plugged_size(), 0);
}

#[test]
fn activate_needs_one_queue() {
    let mem = guest_mem();
    let mut dev = VirtioMem::new(FakeRegion::new(64 * MIB), 0).unwrap();
    let interrupt = Arc::new(Interrupt::new().unwrap());
    assert!(matches!(
        dev.activate(mem.clone(), vec![], interrupt.clone()),
        Err(Error::QueueCount {
            expected: 1,
            got: 0
        })
    ));
    let qs = vec![Queue::new(128).unwrap(), Queue::new(128).unwrap()];
    assert!(matches!(
        dev.activate(mem, qs, interrupt),
        Err(Error::QueueCount { got: 2, .. })
    ));
    assert!(matches!(dev.process_queue(0), Err(Error::NotActivated)));
}

#[test]
fn shared_types_are_send_and_sync() {
    fn send_sync<T: Send + Sync>() {}
    fn send<T: Send>() {}
    send_sync::<Interrupt>();
    send_sync::<VirtioMemShared>();
    send::<MmioTransport<VirtioMem<memory::HotplugRegion>>>();
}
