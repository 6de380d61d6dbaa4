//! Where the guest was when KVM gave up on it: a compact report of the vCPU's registers and, when
//! KVM provides them, the bytes of the instruction it could not run. Printed after the one-line
//! cause whatever the log level, since it is what turns "KVM internal error" into a diagnosis
//! (look the RIP up with `nm -n vmlinux`, decode the bytes with `objdump`).

use std::fmt::Write;

use kvm_ioctls::VcpuFd;

/// `KVM_INTERNAL_ERROR_EMULATION`: the instruction emulator failed.
const SUBERROR_EMULATION: u32 = 1;
/// `KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES`: `data[1..]` holds the instruction.
const FLAG_INSTRUCTION_BYTES: u64 = 1;

/// The instruction bytes of a `KVM_EXIT_INTERNAL_ERROR`, when KVM reported them.
pub fn internal_error_instruction(fd: &mut VcpuFd) -> (u32, Option<Vec<u8>>) {
    let run = fd.get_kvm_run();
    // SAFETY: the caller saw KVM_EXIT_INTERNAL_ERROR, so `internal` is the union member KVM
    // filled in; it is plain data whatever its content.
    let internal = unsafe { run.__bindgen_anon_1.internal };
    let ndata = (internal.ndata as usize).min(internal.data.len());
    let data = &internal.data[..ndata];
    if internal.suberror != SUBERROR_EMULATION || ndata < 2 || data[0] & FLAG_INSTRUCTION_BYTES == 0
    {
        return (internal.suberror, None);
    }
    // data[1..3]: one length byte, then up to 15 instruction bytes (little endian words).
    let bytes: Vec<u8> = data[1..].iter().flat_map(|w| w.to_le_bytes()).collect();
    let len = usize::from(bytes[0]).min(15).min(bytes.len() - 1);
    (internal.suberror, Some(bytes[1..=len].to_vec()))
}

/// A few lines describing the vCPU's state: RIP, RSP, control registers, EFER, CPL and, when
/// given, the instruction bytes at RIP. Registers KVM refuses to return are said to be unknown.
pub fn report(id: u8, fd: &VcpuFd, instruction: Option<&[u8]>) -> String {
    let mut s = format!("guest state of vCPU {id}:");
    match fd.get_regs() {
        Ok(r) => {
            let _ = write!(
                s,
                "\n  rip {:#018x}  rsp {:#018x}  rflags {:#x}",
                r.rip, r.rsp, r.rflags
            );
            let _ = write!(
                s,
                "\n  rax {:#x}  rcx {:#x}  rdx {:#x}  rbx {:#x}",
                r.rax, r.rcx, r.rdx, r.rbx
            );
        }
        Err(e) => {
            let _ = write!(s, "\n  general registers unknown ({e})");
        }
    }
    match fd.get_sregs() {
        Ok(sr) => {
            let _ = write!(
                s,
                "\n  cr0 {:#x}  cr2 {:#x}  cr3 {:#x}  cr4 {:#x}  efer {:#x}",
                sr.cr0, sr.cr2, sr.cr3, sr.cr4, sr.efer
            );
            let mode = if sr.efer & (1 << 10) != 0 && sr.cs.l != 0 {
                "64-bit"
            } else if sr.cr0 & 1 != 0 {
                "protected"
            } else {
                "real"
            };
            let _ = write!(
                s,
                "\n  cpl {}  cs {:#x}  ss {:#x}  mode {mode}",
                sr.ss.dpl, sr.cs.selector, sr.ss.selector
            );
        }
        Err(e) => {
            let _ = write!(s, "\n  special registers unknown ({e})");
        }
    }
    match instruction {
        Some(b) if !b.is_empty() => {
            let hex: Vec<String> = b.iter().map(|x| format!("{x:02x}")).collect();
            let _ = write!(s, "\n  instruction bytes at rip: {}", hex.join(" "));
        }
        _ => s.push_str("\n  instruction bytes: not reported by KVM"),
    }
    s
}
