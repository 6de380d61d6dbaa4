//! virtio-mem request queue: the input builds descriptor chains, requests, avail-ring entries
//! and notifications over a split queue in a 1 MiB guest memory, and drives a VirtioMem
//! over a real 32 MiB HotplugRegion (2 MiB blocks) through the MmioTransport.
//!
//! Checked: no panic; the device and the region agree on the plugged size, nothing is plugged
//! past the usable region; the usable region never shrinks unless nothing is plugged any more
//! (only UNPLUG_ALL shrinks it); a used element never claims more than the 10-byte response;
//! after a notification that left the device running, every available chain got a used-ring
//! entry; a reset keeps the plug state.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tide_fuzz::*;
use vm_memory::{Bytes, GuestAddress};

use devices::bus::BusDevice;
use devices::virtio::mem::request::VirtioMemReq;
use devices::virtio::VirtioMem;

/// Most operations taken from one input (each plug may populate up to 32 MiB).
const MAX_OPS: usize = 96;
const REQ_SLOTS: u64 = 8;
const REQ_STRIDE: u64 = 32;

struct Driver<'a> {
    q: Rings<'a>,
    used_seen: u16,
    /// A descriptor pointed into the used ring: the device may have written a response there,
    /// so the used ring no longer says only what the device put in it.
    used_ring_exposed: bool,
    /// Likewise for the avail ring: the device's responses may have moved its index.
    avail_ring_exposed: bool,
}

/// An address for a descriptor. `rings_end`: the end of the descriptor table and avail ring
/// (the used ring after them is left to the device, so that the used elements can be checked).
fn pick_addr(inp: &mut Input, rings_end: u64) -> u64 {
    match inp.u8() % 8 {
        0..=3 => DATA + u64::from(inp.u8()) * 8,
        4 => inp.u64(),
        5 => MEM_SIZE - u64::from(inp.u8()),
        6 => HP_BASE + u64::from(inp.u16()) * 4096,
        _ => u64::from(inp.u16()) % rings_end,
    }
}

fn pick_len(inp: &mut Input) -> u32 {
    match inp.u8() % 4 {
        0 => 24,
        1 => 10,
        2 => u32::from(inp.u8()),
        _ => inp.u32(),
    }
}

fn pick_block_addr(inp: &mut Input) -> u64 {
    match inp.u8() % 4 {
        0..=2 => HP_BASE + u64::from(inp.u8() % 18) * BS,
        _ => inp.u64(),
    }
}

impl Driver<'_> {
    /// Checks the used elements the device added since last time.
    fn check_used(&mut self, op: u8) {
        let idx = self.q.used_idx();
        if self.used_ring_exposed {
            self.used_seen = idx;
            return;
        }
        let new = idx.wrapping_sub(self.used_seen);
        // Per notification the device uses at most one ring of chains, or its limit of 512 per
        // call if its own responses move the avail index forward while it drains.
        assert!(
            usize::from(new) <= 4 * usize::from(QSIZE),
            "used idx jumped by {new} ({} -> {idx}) after op {op}",
            self.used_seen
        );
        for i in 0..new.min(self.q.qsize) {
            let slot = self.used_seen.wrapping_add(i) % self.q.qsize;
            let (id, len) = self.q.used_elem(slot);
            assert!(len <= 10, "used length {len} > response size");
            assert!(id < u32::from(QSIZE), "used id {id}");
        }
        self.used_seen = idx;
    }
}

fuzz_target!(|data: &[u8]| {
    let mut inp = Input::new(data);
    let mem = guest_mem();
    let region = region();
    let flags = inp.u8();
    let features = VERSION_1
        | if flags & 1 != 0 {
            UNPLUGGED_INACCESSIBLE
        } else {
            0
        };
    let qsize = 1u16 << ((flags >> 1) % 8);
    let requested = u64::from(inp.u8() % 17) * BS;
    let dev = VirtioMem::new(region.clone(), requested).unwrap();
    let shared = dev.shared();
    let mut t: Transport = devices::virtio::MmioTransport::new(dev, mem.clone()).unwrap();
    let mut drv = Driver {
        q: Rings::new(&mem, qsize),
        used_seen: 0,
        used_ring_exposed: false,
        avail_ring_exposed: false,
    };
    let rings_end = USED_ADDR;
    let used_ring = USED_ADDR..USED_END;
    let (d, a, u) = (
        GuestAddress(DESC_ADDR),
        GuestAddress(AVAIL_ADDR),
        GuestAddress(USED_ADDR),
    );
    driver_init(&mut t, features, qsize, d, a, u);
    assert!(
        t.is_activated(),
        "a well-behaved driver could not start the device"
    );

    let mut ops = 0;
    let mut prev_usable = shared.usable_region_size();
    while !inp.is_empty() && ops < MAX_OPS {
        ops += 1;
        let op = inp.u8() % 12;
        let mut notified_queue_0 = false;
        match op {
            // One descriptor, any shape.
            0 => {
                let idx = u16::from(inp.u8()) % QSIZE;
                let addr = pick_addr(&mut inp, rings_end);
                let len = pick_len(&mut inp);
                let f = match inp.u8() {
                    b if b < 0xf0 => u16::from(b & 7),
                    _ => inp.u16(),
                };
                let next = match inp.u8() {
                    b if b < 0xf0 => u16::from(b) % QSIZE,
                    _ => inp.u16(),
                };
                if addr < used_ring.end && addr.saturating_add(10) > used_ring.start {
                    drv.used_ring_exposed = true;
                }
                if addr < USED_ADDR && addr.saturating_add(10) > AVAIL_ADDR {
                    drv.avail_ring_exposed = true;
                }
                drv.q.set_desc(idx, addr, len, f, next);
            }
            // A request in one of the buffer slots.
            1 => {
                let slot = u64::from(inp.u8()) % REQ_SLOTS;
                let kind = match inp.u8() % 6 {
                    5 => inp.u16(),
                    k => u16::from(k),
                };
                let addr = pick_block_addr(&mut inp);
                let nb = match inp.u8() % 3 {
                    0 | 1 => u16::from(inp.u8() % 20),
                    _ => inp.u16(),
                };
                let req = VirtioMemReq {
                    req_type: kind.into(),
                    addr: addr.into(),
                    nb_blocks: nb.into(),
                    ..Default::default()
                };
                mem.write_obj(req, GuestAddress(DATA + slot * REQ_STRIDE))
                    .unwrap();
            }
            // Make a head available.
            2 => {
                let head = match inp.u8() {
                    b if b < 0xf0 => u16::from(b) % QSIZE,
                    _ => inp.u16(),
                };
                drv.q.push(head);
            }
            // A well-formed request chain (request slot, response slot), made available.
            3 => {
                let idx = u16::from(inp.u8()) % QSIZE;
                let slot = u64::from(inp.u8()) % REQ_SLOTS;
                let next = (idx + 1) % QSIZE;
                drv.q.set_desc(idx, DATA + slot * REQ_STRIDE, 24, 1, next);
                drv.q.set_desc(next, DATA + 0x1000 + slot * 16, 10, 2, 0);
                drv.q.push(idx);
            }
            // Notify through the register, or through the ioeventfd path.
            4 => {
                let v = if inp.u8() < 0xf0 { 0 } else { inp.u32() };
                wr(&mut t, 0x50, v);
                notified_queue_0 = v == 0;
            }
            5 => {
                let q = usize::from(inp.u8() % 2);
                t.handle_queue_event(q);
                notified_queue_0 = q == 0;
            }
            // The host changes the requested size.
            6 => {
                let r = match inp.u8() {
                    b if b < 0xf0 => u64::from(b % 17) * BS,
                    _ => inp.u64(),
                };
                let _ = shared.set_requested_size(r);
            }
            // The driver sets the avail index to anything.
            7 => {
                drv.q.set_avail_idx(inp.u16());
            }
            // The driver scribbles on the descriptor table and the avail ring (flags, used_event).
            8 => {
                let off = u64::from(inp.u16()) % rings_end;
                let b = inp.u8();
                mem.write_obj(b, GuestAddress(off)).unwrap();
            }
            // Reset and start again.
            9 => {
                reset_and_check(&mut t);
                drv.used_seen = 0;
                drv.q.set_avail_idx(0);
                drv.q.set_used_idx(0);
                driver_init(&mut t, features, qsize, d, a, u);
            }
            // Read the configuration space as the driver does.
            10 => {
                let off = u64::from(inp.u8() % 0x40);
                let size = [1usize, 2, 4, 8][usize::from(inp.u8() % 4)];
                let mut b = [0u8; 8];
                t.read(0x100 + off, &mut b[..size]);
                if off == 0x28 && size == 8 {
                    assert_eq!(u64::from_le_bytes(b), shared.plugged_size());
                }
            }
            // The host says memory may be back.
            _ => {
                let _ = shared.retry_after_busy();
            }
        }
        check_sizes(&t);
        let usable = shared.usable_region_size();
        assert!(
            usable >= prev_usable || shared.plugged_size() == 0,
            "usable shrank {prev_usable:#x} -> {usable:#x} with memory plugged (op {op})"
        );
        prev_usable = usable;
        if notified_queue_0
            && t.is_activated()
            && t.status() & 64 == 0
            && !drv.used_ring_exposed
            && !drv.avail_ring_exposed
        {
            // Every chain made available got a used-ring entry.
            let avail: u16 = mem.read_obj(GuestAddress(AVAIL_ADDR + 2)).unwrap();
            assert_eq!(
                drv.q.used_idx(),
                avail,
                "a chain was left without a used-ring entry (op {op})"
            );
        }
        drv.check_used(op);
    }
    reset_and_check(&mut t);
});
