//! virtio-mmio registers: the input is a sequence of (offset, size, read/write, value) accesses
//! applied to an MmioTransport<VirtioMem> over a real 32 MiB HotplugRegion. Ring addresses are
//! among the values written, so that the queue can become valid and notifications reach the
//! device.
//!
//! Checked: no panic; the identification registers never change; the status register holds only
//! defined bits; the device and the region agree on the plugged size; a reset unplugs everything.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tide_fuzz::*;

use devices::bus::BusDevice;
use devices::virtio::VirtioMem;

const MAX_OPS: usize = 256;

/// Registers (and a few holes and unaligned offsets) an access is aimed at.
const OFFSETS: [u64; 36] = [
    0x000, 0x004, 0x008, 0x00c, 0x010, 0x014, 0x020, 0x024, 0x030, 0x034, 0x038, 0x044, 0x050,
    0x060, 0x064, 0x070, 0x080, 0x084, 0x090, 0x094, 0x0a0, 0x0a4, 0x0b0, 0x0b4, 0x0b8, 0x0bc,
    0x0fc, 0x100, 0x120, 0x128, 0x130, 0x137, 0x138, 0x0ff, 0x071, 0xfff,
];

fuzz_target!(|data: &[u8]| {
    let mut inp = Input::new(data);
    let mem = guest_mem();
    let region = region();
    let requested = u64::from(inp.u8() % 17) * BS;
    let dev = VirtioMem::new(region.clone(), requested).unwrap();
    let mut t: Transport = devices::virtio::MmioTransport::new(dev, mem.clone()).unwrap();
    // Values worth writing: the ring addresses, features, status steps, queue sizes.
    let addrs = [DESC_ADDR, AVAIL_ADDR, USED_ADDR];
    let value = |inp: &mut Input| -> u32 {
        match inp.u8() % 8 {
            0 => u32::from(inp.u8()),
            1 => addrs[usize::from(inp.u8() % 3)] as u32,
            2 => [0, 1, 3, 7, 11, 15, 0x80, 0x8b][usize::from(inp.u8() % 8)],
            3 => [1u32, 2, 1 << 1 | 1, 1 << 2][usize::from(inp.u8() % 4)],
            4 => 1 << (inp.u8() % 32),
            5 => 128 >> (inp.u8() % 9),
            _ => inp.u32(),
        }
    };
    let mut ops = 0;
    while !inp.is_empty() && ops < MAX_OPS {
        ops += 1;
        let op = inp.u8();
        match op % 6 {
            // A 4-byte write to a register.
            0 | 1 => {
                let off = OFFSETS[usize::from(inp.u8()) % OFFSETS.len()];
                let v = value(&mut inp);
                wr(&mut t, off, v);
            }
            // A 4-byte read of a register.
            2 => {
                let off = OFFSETS[usize::from(inp.u8()) % OFFSETS.len()];
                let v = rd(&mut t, off);
                match off {
                    0x000 => assert_eq!(v, 0x7472_6976),
                    0x004 => assert_eq!(v, 2),
                    0x008 => assert_eq!(v, 24),
                    0x070 => assert_eq!(v & !(1 | 2 | 4 | 8 | 64 | 128), 0, "status {v:#x}"),
                    0x034 => assert!(v == 0 || v == 128, "queue num max {v}"),
                    _ => {}
                }
            }
            // Any access: offset, size (valid or not), direction, value.
            3 | 4 => {
                let off = u64::from(inp.u16()) % 0x1100;
                let size = [0usize, 1, 2, 3, 4, 5, 8, 9][usize::from(inp.u8() % 8)];
                let mut b = [0u8; 9];
                if inp.u8() & 1 == 0 {
                    t.read(off, &mut b[..size]);
                } else {
                    let v = inp.bytes_up_to(size);
                    b[..v.len()].copy_from_slice(v);
                    t.write(off, &b[..size]);
                }
            }
            // The queue event fires (from the ioeventfd), for a queue that may not exist.
            _ => t.handle_queue_event(usize::from(inp.u8() % 3)),
        }
        check_sizes(&t);
    }
    reset_and_check(&mut t);
});
