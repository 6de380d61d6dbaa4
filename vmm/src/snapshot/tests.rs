//! Tier 2 (needs `/dev/kvm`): every state ioctl a snapshot uses, probed on a fresh VM and
//! vCPU, and the state saved from one VM restored into another that then saves the same
//! state. Prints what KVM refused (nothing on this project's machines, and nothing expected on
//! hardware-assisted KVM).

use kvm_bindings::{kvm_regs, CpuId, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::Kvm;

use super::vcpu_state::{msr_index_list, VcpuState};
use super::vm_state::VmState;

fn kvm_or_skip() -> Option<Kvm> {
    match Kvm::new() {
        Ok(k) => Some(k),
        Err(e) => {
            println!("SKIP: /dev/kvm not usable: {e}");
            None
        }
    }
}

fn vm_and_vcpu(kvm: &Kvm, cpuid: &CpuId) -> (kvm_ioctls::VmFd, kvm_ioctls::VcpuFd) {
    let vm = crate::builder::create_vm(kvm).unwrap();
    let vcpu = vm.create_vcpu(0).unwrap();
    vcpu.set_cpuid2(cpuid).unwrap();
    (vm, vcpu)
}

#[test]
fn every_state_ioctl_round_trips_into_a_new_vm() {
    let Some(kvm) = kvm_or_skip() else {
        return;
    };
    let supported = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).unwrap();
    let cpuid = arch::cpu::cpuid_for(&supported, 0, 1);
    let (vm, vcpu) = vm_and_vcpu(&kvm, &cpuid);
    let regs = kvm_regs {
        rax: 0x1234_5678,
        rbx: 0xdead_beef,
        rip: 0x10_0000,
        rflags: 0x2,
        ..Default::default()
    };
    vcpu.set_regs(&regs).unwrap();
    let index = msr_index_list(&kvm).unwrap();
    let saved = VcpuState::save(&index, &vcpu, 0).unwrap();
    println!(
        "KVM state probe: {} of {} listed MSRs readable; refused: {:?}",
        saved.msrs.len(),
        index.len(),
        saved.refused
    );
    let vm_saved = VmState::save(&vm).unwrap();
    // Through JSON, as in a state file.
    let saved: VcpuState = serde_json::from_str(&serde_json::to_string(&saved).unwrap()).unwrap();
    let vm_saved: VmState =
        serde_json::from_str(&serde_json::to_string(&vm_saved).unwrap()).unwrap();

    let (vm2, vcpu2) = vm_and_vcpu(&kvm, &cpuid);
    vm_saved.restore(&vm2).unwrap();
    saved.restore(&vcpu2).unwrap();
    let again = VcpuState::save(&index, &vcpu2, 0).unwrap();
    assert_eq!(again.regs.rax, 0x1234_5678);
    assert_eq!(again.regs.rbx, 0xdead_beef);
    assert_eq!(again.regs.rip, 0x10_0000);
    assert_eq!(
        serde_json::to_value(again.sregs).unwrap(),
        serde_json::to_value(saved.sregs).unwrap()
    );
    assert_eq!(again.xsave, saved.xsave);
    assert_eq!(again.xcrs.is_some(), saved.xcrs.is_some());
    assert_eq!(
        serde_json::to_value(again.lapic).unwrap(),
        serde_json::to_value(saved.lapic).unwrap()
    );
    assert_eq!(again.refused, saved.refused);
    let again_vm = VmState::save(&vm2).unwrap();
    for (a, b) in [
        (&again_vm.pic_master, &vm_saved.pic_master),
        (&again_vm.pic_slave, &vm_saved.pic_slave),
        (&again_vm.ioapic, &vm_saved.ioapic),
    ] {
        assert_eq!(
            serde_json::to_value(a).unwrap(),
            serde_json::to_value(b).unwrap()
        );
    }
}

/// Writes a 32-bit local APIC register into a `kvm_lapic_state` image.
fn set_apic_reg(lapic: &mut kvm_bindings::kvm_lapic_state, offset: usize, value: u32) {
    for (i, b) in value.to_le_bytes().iter().enumerate() {
        lapic.regs[offset + i] = *b as _;
    }
}

/// A guest whose LAPIC timer is armed in TSC-deadline mode (Linux's usual clock event) keeps
/// its deadline through save and restore. KVM drops a deadline written while the timer is not
/// yet in that mode, so the restore writes it after the LAPIC: written with the other MSRs, a
/// restored Linux guest never got another timer interrupt.
#[test]
fn an_armed_tsc_deadline_timer_survives_restore() {
    const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;
    const APIC_SPIV: usize = 0xf0;
    const APIC_LVTT: usize = 0x320;
    const LVTT_TSC_DEADLINE: u32 = 0b10 << 17;
    let Some(kvm) = kvm_or_skip() else {
        return;
    };
    let supported = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).unwrap();
    let cpuid = arch::cpu::cpuid_for(&supported, 0, 1);
    let (_vm, vcpu) = vm_and_vcpu(&kvm, &cpuid);
    let mut lapic = vcpu.get_lapic().unwrap();
    set_apic_reg(&mut lapic, APIC_SPIV, 0x1ff); // software-enabled, spurious vector 0xff
    set_apic_reg(&mut lapic, APIC_LVTT, LVTT_TSC_DEADLINE | 0xec);
    vcpu.set_lapic(&lapic).unwrap();
    // Far in the future of a fresh vCPU's TSC (about 0): it cannot expire during the test.
    let deadline = 1u64 << 50;
    let msrs = kvm_bindings::Msrs::from_entries(&[kvm_bindings::kvm_msr_entry {
        index: MSR_IA32_TSC_DEADLINE,
        data: deadline,
        ..Default::default()
    }])
    .unwrap();
    assert_eq!(vcpu.set_msrs(&msrs).unwrap(), 1);
    let index = msr_index_list(&kvm).unwrap();
    let saved = VcpuState::save(&index, &vcpu, 0).unwrap();
    let read = |s: &VcpuState| {
        s.msrs
            .iter()
            .find(|&&(i, _)| i == MSR_IA32_TSC_DEADLINE)
            .map(|&(_, v)| v)
    };
    assert_eq!(
        read(&saved),
        Some(deadline),
        "the armed deadline was not saved"
    );

    let (_vm2, vcpu2) = vm_and_vcpu(&kvm, &cpuid);
    saved.restore(&vcpu2).unwrap();
    let again = VcpuState::save(&index, &vcpu2, 0).unwrap();
    assert_eq!(
        read(&again),
        Some(deadline),
        "the restored vCPU lost its timer deadline"
    );
}
