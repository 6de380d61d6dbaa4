//! Per-vCPU state for the Linux 64-bit boot protocol: CPUID, MSRs, FPU, LAPIC, segments, control
//! registers and general registers.

use kvm_bindings::{kvm_fpu, kvm_msr_entry, kvm_regs, kvm_segment, CpuId, Msrs};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::{Error, Result, BOOT_STACK_POINTER, GDT_ADDR, IDT_ADDR, ZERO_PAGE_ADDR};

/// Code segment selector of the boot GDT (Linux's `__BOOT_CS`).
pub const BOOT_CS: u16 = 0x10;
/// Data segment selector of the boot GDT (Linux's `__BOOT_DS`).
pub const BOOT_DS: u16 = 0x18;
const BOOT_TSS: u16 = 0x20;

/// The boot GDT: null, null, 64-bit code, data, TSS (flags in the `0xf0ff` access/flags layout).
const GDT: [(u16, u32, u32); 5] = [
    (0, 0, 0),
    (0, 0, 0),
    (0xa09b, 0, 0xfffff),
    (0xc093, 0, 0xfffff),
    (0x808b, 0, 0xfffff),
];

fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    let (flags, base, limit) = (u64::from(flags), u64::from(base), u64::from(limit));
    ((base & 0xff00_0000) << 32)
        | ((base & 0x00ff_ffff) << 16)
        | (limit & 0xffff)
        | ((limit & 0xf_0000) << 32)
        | ((flags & 0xf0ff) << 40)
}

fn segment(selector: u16) -> kvm_segment {
    let (flags, base, limit) = GDT[usize::from(selector >> 3)];
    let g = (flags >> 15) & 1;
    kvm_segment {
        base: u64::from(base),
        limit: if g == 1 { (limit << 12) | 0xfff } else { limit },
        selector,
        type_: (flags & 0xf) as u8,
        present: ((flags >> 7) & 1) as u8,
        dpl: ((flags >> 5) & 3) as u8,
        db: ((flags >> 14) & 1) as u8,
        s: ((flags >> 4) & 1) as u8,
        l: ((flags >> 13) & 1) as u8,
        g: g as u8,
        avl: ((flags >> 12) & 1) as u8,
        unusable: 0,
        padding: 0,
    }
}

/// Writes the boot GDT and an empty IDT into guest memory.
pub fn write_gdt(mem: &GuestMemoryMmap) -> Result<()> {
    for (i, &(f, b, l)) in GDT.iter().enumerate() {
        mem.write_obj(gdt_entry(f, b, l), GuestAddress(GDT_ADDR + 8 * i as u64))
            .map_err(|_| Error::GuestWrite("GDT"))?;
    }
    mem.write_obj(0u64, GuestAddress(IDT_ADDR))
        .map_err(|_| Error::GuestWrite("IDT"))
}

/// Adapts the host-supported CPUID to vCPU `id` of `count`: APIC IDs, logical-processor count,
/// and the hypervisor bit.
pub fn cpuid_for(supported: &CpuId, id: u8, count: u8) -> CpuId {
    let mut cpuid = supported.clone();
    for e in cpuid.as_mut_slice() {
        match e.function {
            1 => {
                e.ebx = (e.ebx & 0x0000_ffff) | (u32::from(id) << 24) | (u32::from(count) << 16);
                e.ecx |= 1 << 31; // running on a hypervisor
                if count > 1 {
                    e.edx |= 1 << 28; // HTT: the count field is valid
                }
            }
            0xb | 0x1f => e.edx = u32::from(id),
            _ => {}
        }
    }
    cpuid
}

/// `(index, value)` pairs as the entries `KVM_SET_MSRS` takes.
pub fn msr_entries(pairs: &[(u32, u64)]) -> Vec<kvm_msr_entry> {
    pairs
        .iter()
        .map(|&(index, data)| kvm_msr_entry {
            index,
            data,
            ..Default::default()
        })
        .collect()
}

const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
const MISC_ENABLE_FAST_STRING: u64 = 1;

/// Sets up a vCPU for the 64-bit boot protocol. Every vCPU gets CPUID, MSRs, FPU and LAPIC; the
/// boot vCPU (id 0) also gets long-mode segments, paging and registers that enter `entry` with
/// RSI pointing at the zero page. Other vCPUs wait for the guest's INIT/SIPI.
pub fn configure_vcpu(vcpu: &VcpuFd, id: u8, cpuid: &CpuId, entry: u64, cr3: u64) -> Result<()> {
    let err = |what| {
        move |source| Error::Vcpu {
            what,
            cpu: id,
            source,
        }
    };
    vcpu.set_cpuid2(cpuid).map_err(err("set CPUID"))?;

    let entries = msr_entries(&[
        (MSR_IA32_SYSENTER_CS, 0),
        (MSR_IA32_SYSENTER_ESP, 0),
        (MSR_IA32_SYSENTER_EIP, 0),
        (MSR_STAR, 0),
        (MSR_CSTAR, 0),
        (MSR_KERNEL_GS_BASE, 0),
        (MSR_SYSCALL_MASK, 0),
        (MSR_LSTAR, 0),
        (MSR_IA32_TSC, 0),
        (MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
    ]);
    let msrs = Msrs::from_entries(&entries).expect("ten MSR entries fit a FAM wrapper");
    vcpu.set_msrs(&msrs).map_err(err("set MSRs"))?;

    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(err("set FPU"))?;

    // LINT0 as ExtINT (the PIC), LINT1 as NMI, as a BIOS would leave them.
    let mut lapic = vcpu.get_lapic().map_err(err("get LAPIC"))?;
    set_lapic_reg(&mut lapic.regs, 0x350, 0x700);
    set_lapic_reg(&mut lapic.regs, 0x360, 0x400);
    vcpu.set_lapic(&lapic).map_err(err("set LAPIC"))?;

    if id != 0 {
        return Ok(());
    }
    let mut sregs = vcpu.get_sregs().map_err(err("get special registers"))?;
    sregs.gdt.base = GDT_ADDR;
    sregs.gdt.limit = (GDT.len() * 8 - 1) as u16;
    sregs.idt.base = IDT_ADDR;
    sregs.idt.limit = 7;
    sregs.cs = segment(BOOT_CS);
    let ds = segment(BOOT_DS);
    (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss) = (ds, ds, ds, ds, ds);
    sregs.tr = segment(BOOT_TSS);
    sregs.cr3 = cr3;
    sregs.cr4 |= 1 << 5; // PAE
    sregs.cr0 = 0x8005_0033; // PG | AM | WP | NE | ET | MP | PE
    sregs.efer |= 0x500; // LME | LMA
    vcpu.set_sregs(&sregs)
        .map_err(err("set special registers"))?;

    let regs = kvm_regs {
        rflags: 0x2,
        rip: entry,
        rsp: BOOT_STACK_POINTER,
        rbp: BOOT_STACK_POINTER,
        rsi: ZERO_PAGE_ADDR,
        ..Default::default()
    };
    vcpu.set_regs(&regs).map_err(err("set registers"))
}

fn set_lapic_reg(regs: &mut [std::os::raw::c_char; 1024], offset: usize, value: u32) {
    for (i, b) in value.to_le_bytes().iter().enumerate() {
        regs[offset + i] = *b as std::os::raw::c_char;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_entries_match_the_boot_protocol() {
        assert_eq!(gdt_entry(0xa09b, 0, 0xfffff), 0x00af_9b00_0000_ffff);
        assert_eq!(gdt_entry(0xc093, 0, 0xfffff), 0x00cf_9300_0000_ffff);
        let cs = segment(BOOT_CS);
        assert_eq!((cs.l, cs.db, cs.type_, cs.limit), (1, 0, 0xb, 0xffff_ffff));
        let ds = segment(BOOT_DS);
        assert_eq!((ds.l, ds.db, ds.type_), (0, 1, 0x3));
    }
}
