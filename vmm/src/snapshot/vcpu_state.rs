//! One vCPU's architectural state as KVM holds it ([`VcpuState`]): saved from a vCPU parked
//! outside `KVM_RUN`, restored into a fresh one before it first runs.
//!
//! What KVM refuses to save is recorded by name in [`VcpuState::refused`] (and logged), not
//! invented: restore then leaves that part as a fresh vCPU has it. On a hardware-assisted KVM
//! nothing is refused.

use kvm_bindings::{
    kvm_cpuid_entry2, kvm_debugregs, kvm_fpu, kvm_lapic_state, kvm_mp_state, kvm_msr_entry,
    kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, CpuId, Msrs, KVM_MAX_CPUID_ENTRIES,
};
use kvm_ioctls::{Kvm, VcpuFd};
use serde::{Deserialize, Serialize};

use super::SnapshotError;

/// `MSR_IA32_TSC_DEADLINE`: KVM ignores a write to it unless the local APIC's timer is already
/// in TSC-deadline mode, so it is restored after the LAPIC (a fresh vCPU's timer is not).
const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;

/// Writes `(index, value)` pairs with `KVM_SET_MSRS`, 256 at a time; an MSR KVM refuses fails.
fn write_msrs(fd: &VcpuFd, pairs: &[(u32, u64)]) -> Result<(), SnapshotError> {
    let entries = arch::cpu::msr_entries(pairs);
    for chunk in entries.chunks(256) {
        let msrs = Msrs::from_entries(chunk).map_err(|_| SnapshotError::Msrs)?;
        let n = fd
            .set_msrs(&msrs)
            .map_err(|e| SnapshotError::Kvm("KVM_SET_MSRS", e))?;
        if n != chunk.len() {
            return Err(SnapshotError::MsrRefused(chunk[n].index));
        }
    }
    Ok(())
}

/// The x87/SSE state as `KVM_GET_FPU` gives it (kvm-bindings has no serde for `kvm_fpu`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FpuState {
    /// ST0-ST7 / MM0-MM7, 16 bytes each.
    pub fpr: Vec<[u8; 16]>,
    /// Control word.
    pub fcw: u16,
    /// Status word.
    pub fsw: u16,
    /// Abridged tag word.
    pub ftwx: u8,
    /// Last opcode.
    pub last_opcode: u16,
    /// Last instruction pointer.
    pub last_ip: u64,
    /// Last data pointer.
    pub last_dp: u64,
    /// XMM0-XMM15.
    pub xmm: Vec<[u8; 16]>,
    /// MXCSR.
    pub mxcsr: u32,
}

impl From<&kvm_fpu> for FpuState {
    fn from(f: &kvm_fpu) -> Self {
        Self {
            fpr: f.fpr.to_vec(),
            fcw: f.fcw,
            fsw: f.fsw,
            ftwx: f.ftwx,
            last_opcode: f.last_opcode,
            last_ip: f.last_ip,
            last_dp: f.last_dp,
            xmm: f.xmm.to_vec(),
            mxcsr: f.mxcsr,
        }
    }
}

impl FpuState {
    fn to_kvm(&self) -> Option<kvm_fpu> {
        Some(kvm_fpu {
            fpr: self.fpr.clone().try_into().ok()?,
            fcw: self.fcw,
            fsw: self.fsw,
            ftwx: self.ftwx,
            last_opcode: self.last_opcode,
            last_ip: self.last_ip,
            last_dp: self.last_dp,
            xmm: self.xmm.clone().try_into().ok()?,
            mxcsr: self.mxcsr,
            ..Default::default()
        })
    }
}

/// Everything KVM keeps of one vCPU. A part KVM refused to save is `None` and named in
/// `refused`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VcpuState {
    /// The vCPU's index (and APIC ID).
    pub id: u8,
    /// The CPUID table the vCPU was given.
    pub cpuid: Vec<kvm_cpuid_entry2>,
    /// General-purpose registers, RIP and RFLAGS.
    pub regs: kvm_regs,
    /// Segment, control and descriptor-table registers, EFER, APIC base.
    pub sregs: kvm_sregs,
    /// x87 and SSE state.
    pub fpu: Option<FpuState>,
    /// The 4 KiB XSAVE area (FPU, SSE, AVX...) as 1024 words.
    pub xsave: Option<Vec<u32>>,
    /// Extended control registers (XCR0).
    pub xcrs: Option<kvm_xcrs>,
    /// Every MSR KVM lists that it could read, as (index, value).
    pub msrs: Vec<(u32, u64)>,
    /// The local APIC's registers.
    pub lapic: Option<kvm_lapic_state>,
    /// Pending exceptions, interrupts, NMIs and SMIs.
    pub events: Option<kvm_vcpu_events>,
    /// Runnable, halted, waiting for INIT/SIPI...
    pub mp_state: Option<kvm_mp_state>,
    /// DR0-DR3, DR6, DR7.
    pub debug_regs: Option<kvm_debugregs>,
    /// The guest TSC frequency in kHz.
    pub tsc_khz: Option<u32>,
    /// The parts KVM refused to save, each as "ioctl: error".
    pub refused: Vec<String>,
}

fn get<T>(r: Result<T, kvm_ioctls::Error>, what: &str, refused: &mut Vec<String>) -> Option<T> {
    match r {
        Ok(v) => Some(v),
        Err(e) => {
            refused.push(format!("{what}: {e}"));
            None
        }
    }
}

/// Reads every MSR of `indices` that KVM lets this vCPU read: `KVM_GET_MSRS` stops at the
/// first one it cannot read; that one is left out and the rest read on.
fn read_msrs(fd: &VcpuFd, indices: &[u32]) -> Result<Vec<(u32, u64)>, SnapshotError> {
    let mut out = Vec::with_capacity(indices.len());
    let mut rest = indices;
    while !rest.is_empty() {
        let chunk = &rest[..rest.len().min(256)];
        let entries: Vec<kvm_msr_entry> = chunk
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries).map_err(|_| SnapshotError::Msrs)?;
        let n = fd
            .get_msrs(&mut msrs)
            .map_err(|e| SnapshotError::Kvm("KVM_GET_MSRS", e))?;
        out.extend(msrs.as_slice()[..n].iter().map(|e| (e.index, e.data)));
        // The entry at n (if any) could not be read: skip it.
        rest = &rest[(n + 1).min(rest.len())..];
    }
    Ok(out)
}

/// KVM's list of the MSRs it saves and restores (`KVM_GET_MSR_INDEX_LIST`).
pub fn msr_index_list(kvm: &Kvm) -> Result<Vec<u32>, SnapshotError> {
    Ok(kvm
        .get_msr_index_list()
        .map_err(|e| SnapshotError::Kvm("KVM_GET_MSR_INDEX_LIST", e))?
        .as_slice()
        .to_vec())
}

impl VcpuState {
    /// Saves the state of vCPU `id`. Must be called on a vCPU outside `KVM_RUN` whose last
    /// exit was completed (see [`crate::vcpu`]'s pause).
    pub fn save(msr_index: &[u32], fd: &VcpuFd, id: u8) -> Result<Self, SnapshotError> {
        let mut refused = Vec::new();
        let cpuid = fd
            .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
            .map_err(|e| SnapshotError::Kvm("KVM_GET_CPUID2", e))?
            .as_slice()
            .to_vec();
        let regs = fd
            .get_regs()
            .map_err(|e| SnapshotError::Kvm("KVM_GET_REGS", e))?;
        let sregs = fd
            .get_sregs()
            .map_err(|e| SnapshotError::Kvm("KVM_GET_SREGS", e))?;
        let msrs = read_msrs(fd, msr_index)?;
        let fpu = get(fd.get_fpu(), "KVM_GET_FPU", &mut refused).map(|f| FpuState::from(&f));
        let xsave = get(fd.get_xsave(), "KVM_GET_XSAVE", &mut refused).map(|x| x.region.to_vec());
        let xcrs = get(fd.get_xcrs(), "KVM_GET_XCRS", &mut refused);
        let lapic = get(fd.get_lapic(), "KVM_GET_LAPIC", &mut refused);
        let events = get(fd.get_vcpu_events(), "KVM_GET_VCPU_EVENTS", &mut refused);
        let mp_state = get(fd.get_mp_state(), "KVM_GET_MP_STATE", &mut refused);
        let debug_regs = get(fd.get_debug_regs(), "KVM_GET_DEBUGREGS", &mut refused);
        let tsc_khz = get(fd.get_tsc_khz(), "KVM_GET_TSC_KHZ", &mut refused);
        Ok(Self {
            id,
            cpuid,
            regs,
            sregs,
            fpu,
            xsave,
            xcrs,
            msrs,
            lapic,
            events,
            mp_state,
            debug_regs,
            tsc_khz,
            refused,
        })
    }

    /// Restores this state into a fresh vCPU, in the order KVM needs (CPUID first, the local
    /// APIC before the TSC deadline and the pending events). A part the snapshot lacks keeps the fresh vCPU's
    /// value; a setter KVM refuses fails the restore, except the TSC frequency (a host that
    /// cannot scale the TSC runs the guest at its own, as Firecracker does).
    pub fn restore(&self, fd: &VcpuFd) -> Result<(), SnapshotError> {
        let k = |what: &'static str| move |e| SnapshotError::Kvm(what, e);
        let cpuid = CpuId::from_entries(&self.cpuid).map_err(|_| SnapshotError::Cpuid)?;
        fd.set_cpuid2(&cpuid).map_err(k("KVM_SET_CPUID2"))?;
        if let Some(khz) = self.tsc_khz {
            if fd.get_tsc_khz().ok() != Some(khz) {
                if let Err(e) = fd.set_tsc_khz(khz) {
                    log::warn!("vCPU {}: cannot set the TSC to {khz} kHz: {e}", self.id);
                }
            }
        }
        let (deadline, msrs): (Vec<_>, Vec<_>) = self
            .msrs
            .iter()
            .partition(|&&(index, _)| index == MSR_IA32_TSC_DEADLINE);
        write_msrs(fd, &msrs)?;
        fd.set_sregs(&self.sregs).map_err(k("KVM_SET_SREGS"))?;
        fd.set_regs(&self.regs).map_err(k("KVM_SET_REGS"))?;
        if let Some(f) = &self.fpu {
            let f = f.to_kvm().ok_or(SnapshotError::Fpu)?;
            fd.set_fpu(&f).map_err(k("KVM_SET_FPU"))?;
        }
        if let Some(words) = &self.xsave {
            let mut x = kvm_xsave::default();
            if words.len() != x.region.len() {
                return Err(SnapshotError::Invalid("the saved XSAVE area is not 4 KiB"));
            }
            x.region.copy_from_slice(words);
            // SAFETY: `x` is a whole `kvm_xsave` (4 KiB, the size KVM_SET_XSAVE reads; no
            // extended FAM part is used), and KVM checks its contents.
            unsafe { fd.set_xsave(&x) }.map_err(k("KVM_SET_XSAVE"))?;
        }
        if let Some(x) = &self.xcrs {
            fd.set_xcrs(x).map_err(k("KVM_SET_XCRS"))?;
        }
        if let Some(d) = &self.debug_regs {
            fd.set_debug_regs(d).map_err(k("KVM_SET_DEBUGREGS"))?;
        }
        if let Some(l) = &self.lapic {
            fd.set_lapic(l).map_err(k("KVM_SET_LAPIC"))?;
        }
        // The timer's deadline only after the LAPIC has put the timer in TSC-deadline mode:
        // written before, KVM drops it and the restored guest never gets another timer tick.
        write_msrs(fd, &deadline)?;
        if let Some(m) = self.mp_state {
            fd.set_mp_state(m).map_err(k("KVM_SET_MP_STATE"))?;
        }
        if let Some(e) = &self.events {
            fd.set_vcpu_events(e).map_err(k("KVM_SET_VCPU_EVENTS"))?;
        }
        Ok(())
    }
}
