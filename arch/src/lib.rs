//! x86_64 boot for Tide: where things go in low guest memory, the zero page (`boot_params`) with its
//! e820 map, the MP table, CPUID, MSRs, FPU, LAPIC, segment and page-table set-up for the Linux
//! 64-bit boot protocol. Nothing here knows about devices or the hotplug region's contents.

#![forbid(unsafe_code)]

pub mod boot;
pub mod cpu;
pub mod mptable;

use vm_memory::GuestAddress;

/// GDT location in guest memory.
pub const GDT_ADDR: u64 = 0x500;
/// Empty IDT location in guest memory.
pub const IDT_ADDR: u64 = 0x520;
/// The zero page (`struct boot_params`) handed to the kernel in RSI.
pub const ZERO_PAGE_ADDR: u64 = 0x7000;
/// Initial stack pointer of the boot vCPU.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// PML4 of the boot page tables; PDPT and four PDs follow (identity map of the first 4 GiB).
pub const PML4_ADDR: u64 = 0x9000;
/// Kernel command line location and its maximum size (including the NUL).
pub const CMDLINE_ADDR: u64 = 0x20000;
/// Largest kernel command line Tide writes.
pub const CMDLINE_MAX_SIZE: usize = 0x10000;
/// End of usable base memory (below the EBDA).
pub const EBDA_START: u64 = 0x9fc00;
/// Where the MP table lives (in the BIOS area Linux scans).
pub const MPTABLE_ADDR: u64 = 0xf0000;
/// Start of high memory: kernels are loaded at or above this.
pub const HIMEM_START: GuestAddress = GuestAddress(0x10_0000);
/// Local APIC base.
pub const APIC_BASE: u64 = 0xfee0_0000;
/// IOAPIC base.
pub const IOAPIC_BASE: u64 = 0xfec0_0000;
/// Number of IOAPIC pins KVM's in-kernel IOAPIC offers.
pub const IOAPIC_PINS: u8 = 24;
/// TSS address for `KVM_SET_TSS_ADDR` (three pages inside the 32-bit MMIO gap).
pub const KVM_TSS_ADDR: u64 = 0xfffb_d000;
/// Identity-map page for `KVM_SET_IDENTITY_MAP_ADDR` (the page just below the TSS).
pub const KVM_IDENTITY_MAP_ADDR: u64 = 0xfffb_c000;

/// Errors of the x86_64 boot set-up.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A KVM ioctl for vCPU set-up failed.
    #[error("cannot {what} of vCPU {cpu}")]
    Vcpu {
        /// What was being set.
        what: &'static str,
        /// vCPU index.
        cpu: u8,
        /// The ioctl's error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// Writing a boot structure into guest memory failed.
    #[error("cannot write the {0} into guest memory: it does not fit in boot RAM")]
    GuestWrite(&'static str),
    /// The MP table cannot describe that many vCPUs.
    #[error("{0} vCPUs do not fit in the MP table (at most 254)")]
    TooManyCpus(u8),
    /// The e820 map has more entries than the zero page can hold.
    #[error("the e820 map has {0} entries, more than the zero page holds (128)")]
    E820Full(usize),
}

/// Result of this crate.
pub type Result<T> = std::result::Result<T, Error>;
