//! The edges Linux's driver reaches: a populate in flight, reset during it, the BUSY timer.

use super::*;

/// A vCPU never waits for a populate: while the queue runner is inside a populate (held there
/// by the fake region until released), guest MMIO accesses to the transport (interrupt status
/// and ack, config, generation, status) complete. Before, the worker processed the queue under
/// the transport's lock and these reads waited for the whole populate.
#[test]
fn mmio_accesses_complete_while_a_populate_runs() {
    let mem = guest_mem();
    let mut drv = Driver::new(&mem);
    let region = FakeRegion::new(64 * MIB);
    let (started_tx, started) = mpsc::channel();
    let (release, release_rx) = mpsc::channel();
    *region.populate_gate.lock().unwrap() = Some((started_tx, release_rx));
    let mut t = transport(region.clone(), 64 * MIB, &mem);
    init(&mut t, &drv);
    let runner = t.device().queue_runner();
    let t = Arc::new(Mutex::new(t));
    let (done_tx, done) = mpsc::channel();
    let resp = drv.request(PLUG, HP_BASE, 4, &mut || {
        let runner = runner.clone();
        let done_tx = done_tx.clone();
        std::thread::spawn(move || done_tx.send(runner.process()).unwrap());
        started.recv().unwrap();
        // The populate is running (and stays so until released): the guest's accesses go on.
        let (tx, rx) = mpsc::channel();
        let t2 = t.clone();
        std::thread::spawn(move || {
            let mut t = t2.lock().unwrap();
            let isr = rd(&mut *t, 0x60);
            wr(&mut *t, 0x64, isr);
            let generation = rd(&mut *t, 0xfc);
            let requested = cfg64(&mut *t, 0x30);
            let status = rd(&mut *t, 0x70);
            tx.send((requested, status, generation)).unwrap();
        });
        // A generous bound for a loaded machine; before the change this never completed.
        let got = rx.recv_timeout(std::time::Duration::from_secs(60));
        assert!(
            done.try_recv().is_err(),
            "the populate must still be running"
        );
        let (requested, status, _) = got.expect("an MMIO access waited for the populate");
        assert_eq!(requested, 64 * MIB);
        assert_eq!(status, RUNNING);
        release.send(()).unwrap();
        done.recv().unwrap().unwrap();
    });
    assert_eq!(resp, ACK);
    assert_eq!(region.plugged_bytes(), 8 * MIB);
}

/// A reset while a populate runs neither waits for it nor lets its answer reach the rings of
/// the reset device; the plug itself stays (a reset keeps the plug state).
#[test]
fn reset_during_a_populate_does_not_wait_and_drops_the_answer() {
    let mem = guest_mem();
    let mut drv = Driver::new(&mem);
    let region = FakeRegion::new(64 * MIB);
    let (started_tx, started) = mpsc::channel();
    let (release, release_rx) = mpsc::channel();
    *region.populate_gate.lock().unwrap() = Some((started_tx, release_rx));
    let mut t = transport(region.clone(), 64 * MIB, &mem);
    init(&mut t, &drv);
    let runner = t.device().queue_runner();
    drv.write_request(PLUG, HP_BASE, 1);
    drv.push(&[(REQ_BUF, 24, false), (RESP_BUF, 10, true)]);
    let worker = std::thread::spawn(move || runner.process());
    started.recv().unwrap();
    wr(&mut t, 0x70, 0);
    assert_eq!(rd(&mut t, 0x70), 0);
    release.send(()).unwrap();
    worker.join().unwrap().unwrap();
    assert_eq!(
        drv.q.used().idx().load(),
        0,
        "no used entry after the reset"
    );
    assert_eq!(region.plugged_bytes(), BS);
    assert_eq!(cfg64(&mut t, 0x28), BS);
}

/// A driver that does not accept UNPLUGGED_INACCESSIBLE gets FEATURES_OK refused where a read of
/// unplugged memory would allocate host memory (shared file-backed backends); on anonymous
/// memory it is accepted and unplugged memory becomes readable.
#[test]
fn features_ok_needs_unplugged_inaccessible_where_reads_allocate() {
    let mem = guest_mem();
    let ad = VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER;
    for (reads_allocate, want_ok) in [(true, false), (false, true)] {
        let region = FakeRegion::new(64 * MIB);
        region
            .reads_allocate
            .store(reads_allocate, Ordering::SeqCst);
        let mut t = transport(region.clone(), 0, &mem);
        wr(&mut t, 0x70, VIRTIO_CONFIG_S_ACKNOWLEDGE);
        wr(&mut t, 0x70, ad);
        set_features(&mut t, VERSION_1);
        wr(&mut t, 0x70, ad | VIRTIO_CONFIG_S_FEATURES_OK);
        let ok = rd(&mut t, 0x70) & VIRTIO_CONFIG_S_FEATURES_OK != 0;
        assert_eq!(ok, want_ok, "reads allocate: {reads_allocate}");
        let access = *region.access.lock().unwrap();
        let want = want_ok.then_some(UnpluggedAccess::Readable);
        assert_eq!(access, want);
        // With the feature, it is accepted everywhere.
        set_features(&mut t, VERSION_1 | UNPLUGGED_INACCESSIBLE);
        wr(&mut t, 0x70, ad | VIRTIO_CONFIG_S_FEATURES_OK);
        if !want_ok {
            assert_eq!(rd(&mut t, 0x70), ad | VIRTIO_CONFIG_S_FEATURES_OK);
            assert_eq!(
                *region.access.lock().unwrap(),
                Some(UnpluggedAccess::Inaccessible)
            );
        }
    }
}

/// After BUSY the driver is told when to try again: a config-change interrupt after a bounded,
/// doubling delay (Linux would otherwise wait 50-300 s), or at once on the next resize.
#[test]
fn busy_is_followed_by_a_timed_config_interrupt() {
    use std::time::Instant;
    let mem = guest_mem();
    let mut drv = Driver::new(&mem);
    let region = FakeRegion::new(64 * MIB);
    let (mut dev, interrupt) = active_device(region.clone(), 64 * MIB, &mem, &drv);
    let shared = dev.shared();
    let t0 = Instant::now();
    assert_eq!(shared.poll_busy_retry(t0), None, "nothing pending");

    region.fail_populate.store(true, Ordering::SeqCst);
    assert_eq!(req!(drv, dev, PLUG, HP_BASE, 4), BUSY);
    interrupt.ack(VIRTIO_MMIO_INT_VRING | VIRTIO_MMIO_INT_CONFIG);
    let at = Instant::now();
    assert!(shared
        .poll_busy_retry(at)
        .is_some_and(|d| d <= BUSY_RETRY_MIN));
    assert_eq!(interrupt.status(), 0);
    let generation = shared.config_generation();
    assert_eq!(shared.poll_busy_retry(at + BUSY_RETRY_MIN), None);
    assert_eq!(interrupt.status(), VIRTIO_MMIO_INT_CONFIG);
    assert_ne!(shared.config_generation(), generation);
    // Once only.
    interrupt.ack(VIRTIO_MMIO_INT_CONFIG);
    assert_eq!(shared.poll_busy_retry(at + 10 * BUSY_RETRY_MAX), None);
    assert_eq!(interrupt.status(), 0);

    // The retry fails again: the next delay is twice as long, and bounded.
    assert_eq!(req!(drv, dev, PLUG, HP_BASE, 4), BUSY);
    let at = Instant::now();
    let due = shared.poll_busy_retry(at).unwrap();
    assert!(due > BUSY_RETRY_MIN && due <= 2 * BUSY_RETRY_MIN, "{due:?}");
    for _ in 0..10 {
        let _ = shared.poll_busy_retry(Instant::now() + 10 * BUSY_RETRY_MAX);
        assert_eq!(req!(drv, dev, PLUG, HP_BASE, 4), BUSY);
    }
    let due = shared.poll_busy_retry(Instant::now()).unwrap();
    assert!(due <= BUSY_RETRY_MAX && due > BUSY_RETRY_MAX / 2, "{due:?}");

    // A resize raises the interrupt at once and starts the delays over.
    interrupt.ack(VIRTIO_MMIO_INT_VRING | VIRTIO_MMIO_INT_CONFIG);
    shared.set_requested_size(32 * MIB).unwrap();
    assert_eq!(interrupt.status(), VIRTIO_MMIO_INT_CONFIG);
    assert_eq!(shared.poll_busy_retry(Instant::now()), None);
    region.fail_populate.store(false, Ordering::SeqCst);
    assert_eq!(req!(drv, dev, PLUG, HP_BASE, 4), ACK);
}

/// Figures (printed, not asserted: timings depend on the machine): the
/// longest a guest MMIO access (interrupt status, config, generation) took while the queue
/// runner populated a large plug of 4 KiB pages in a real region.
/// `TIDE_MMIO_PROBE_MIB` sets the plug size (default 256 MiB; the figure in docs/memory.md uses 4096).
#[test]
fn mmio_latency_during_a_real_populate() {
    let mib: u64 = std::env::var("TIDE_MMIO_PROBE_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256);
    let size = mib * MIB;
    let layout = memory::HotplugLayout {
        base: GuestAddress(HP_BASE),
        size: size * 2,
        block_size: BS,
    };
    let region = Arc::new(
        memory::HotplugRegion::with_options(
            &layout,
            memory::Backend::Anon,
            memory::RegionOptions { thp: false },
        )
        .unwrap(),
    );
    let mem = guest_mem();
    let mut drv = Driver::new(&mem);
    let t = MmioTransport::new(VirtioMem::new(region.clone(), size).unwrap(), mem.clone());
    let mut t = t.unwrap();
    init(&mut t, &drv);
    let runner = t.device().queue_runner();
    let t = Arc::new(Mutex::new(t));
    let nb = (size / BS) as u16;
    let mut stats = (0u32, std::time::Duration::ZERO, std::time::Duration::ZERO);
    let mut populate_time = std::time::Duration::ZERO;
    let resp = drv.request(PLUG, HP_BASE, nb, &mut || {
        let running = Arc::new(AtomicBool::new(true));
        let r2 = running.clone();
        let runner = runner.clone();
        let start = std::time::Instant::now();
        let worker = std::thread::spawn(move || {
            let r = runner.process();
            r2.store(false, Ordering::SeqCst);
            r
        });
        while running.load(Ordering::SeqCst) {
            let t0 = std::time::Instant::now();
            {
                let mut t = t.lock().unwrap();
                let isr = rd(&mut *t, 0x60);
                wr(&mut *t, 0x64, isr);
                let _ = rd(&mut *t, 0xfc);
                let _ = cfg64(&mut *t, 0x28);
            }
            let took = t0.elapsed();
            if running.load(Ordering::SeqCst) {
                stats.0 += 1;
                stats.1 = stats.1.max(took);
                stats.2 += took;
            }
            std::thread::yield_now();
        }
        worker.join().unwrap().unwrap();
        populate_time = start.elapsed();
    });
    assert_eq!(resp, ACK);
    assert_eq!(region.plugged_bytes(), size);
    let (n, max, total) = stats;
    println!(
        "mmio_latency_during_a_real_populate: {mib} MiB of 4 KiB pages populated in {:.0} ms; \
         {n} MMIO access groups (ISR read+ack, generation, config) during it: max {:.1} us, \
         mean {:.1} us",
        populate_time.as_secs_f64() * 1e3,
        max.as_secs_f64() * 1e6,
        if n > 0 {
            total.as_secs_f64() * 1e6 / f64::from(n)
        } else {
            0.0
        }
    );
}
