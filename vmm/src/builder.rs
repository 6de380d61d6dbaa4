//! Builds a [`Vmm`] from a [`VmmConfig`] step by step: KVM VM, memory and slots, kernel and boot
//! structures, devices, vCPUs. Then [`Vmm::run`] runs it to the end.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use devices::bus::Bus;
use devices::legacy::{self, EventFdTrigger, SerialDevice, I8042};
use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Kvm, VmFd};
use linux_loader::cmdline::Cmdline;
use linux_loader::loader::{bzimage::BzImage, elf::Elf, KernelLoader};
use vm_memory::{
    Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
};

use crate::config::VmmConfig;
use crate::vcpu::{HotplugWindow, RunState, Vcpu};
use crate::virtio_mem_wiring::MemDevice;
use crate::{Error, Result};

/// Base of the MMIO window for virtio-mmio devices (inside the 32-bit MMIO gap).
pub const VIRTIO_MMIO_BASE: u64 = 0xd000_0000;
/// Size of one virtio-mmio device window (owned by the transport).
pub use devices::virtio::mmio::MMIO_SIZE as VIRTIO_MMIO_SIZE;
/// IOAPIC pin of the first virtio-mmio device.
pub const VIRTIO_IRQ_BASE: u32 = 5;

/// A built VM, ready to run.
pub struct Vmm {
    pub(crate) config: VmmConfig,
    /// Held open for the VM's life: its memory slots, ioeventfds and irqfds go with it.
    _vm: VmFd,
    pub(crate) boot_mem: GuestMemoryMmap,
    pub(crate) vcpus: Vec<Vcpu>,
    pub(crate) serial: Arc<Mutex<SerialDevice>>,
    pub(crate) console: crate::console::ConsoleOut,
    pub(crate) i8042: Arc<Mutex<I8042>>,
    pub(crate) mem_device: Option<MemDevice>,
    pub(crate) state: Arc<RunState>,
}

impl Vmm {
    /// Builds the VM described by `config`.
    pub fn new(config: VmmConfig) -> Result<Self> {
        build(config)
    }

    /// The boot memory (for tests and diagnostics).
    pub fn boot_memory(&self) -> &GuestMemoryMmap {
        &self.boot_mem
    }
}

/// The steps of [`Vmm::new`], in order.
fn build(config: VmmConfig) -> Result<Vmm> {
    check_config(&config)?;
    let kvm = Kvm::new().map_err(Error::Kvm)?;
    let vm = create_vm(&kvm)?;
    let (layout, boot_mem, hotplug) = setup_memory(&vm, &config)?;
    let state = Arc::new(RunState::new().map_err(|e| Error::Io("cannot create an event fd", e))?);
    let mut cmdline = Cmdline::new(arch::CMDLINE_MAX_SIZE).map_err(Error::Cmdline)?;
    cmdline
        .insert_str(&config.kernel.cmdline)
        .map_err(Error::Cmdline)?;
    let legacy = attach_legacy_devices(&vm, &state)?;
    let mut mmio = Bus::new();
    let mem_device = match hotplug {
        Some(region) => Some(attach_mem_device(
            &vm,
            &config,
            region,
            &boot_mem,
            &mut mmio,
            &mut cmdline,
        )?),
        None => None,
    };
    let (entry, cr3) = load_kernel_and_boot_structures(&config, &layout, &boot_mem, &cmdline)?;
    let vcpus = configure_vcpus(
        &kvm,
        &vm,
        &config,
        BootEntry { entry, cr3 },
        Arc::new(legacy.pio),
        Arc::new(mmio),
        mem_device.as_ref(),
        &state,
    )?;
    Ok(Vmm {
        config,
        _vm: vm,
        boot_mem,
        vcpus,
        serial: legacy.serial,
        console: legacy.console,
        i8042: legacy.i8042,
        mem_device,
        state,
    })
}

/// Refuses what KVM and the boot structures cannot take.
fn check_config(config: &VmmConfig) -> Result<()> {
    let m = &config.machine;
    if m.cpus == 0 || m.cpus > 254 {
        return Err(Error::Cpus(m.cpus));
    }
    Ok(())
}

/// Creates the KVM VM with its in-kernel irqchip and PIT.
fn create_vm(kvm: &Kvm) -> Result<VmFd> {
    let version = kvm.get_api_version();
    if version != 12 {
        return Err(Error::KvmApiVersion(version));
    }
    let vm = kvm.create_vm().map_err(Error::Kvm)?;
    vm.set_tss_address(arch::KVM_TSS_ADDR as usize)
        .map_err(|e| Error::Vm("set the TSS address", e))?;
    vm.set_identity_map_address(arch::KVM_IDENTITY_MAP_ADDR)
        .map_err(|e| Error::Vm("set the identity map address", e))?;
    vm.create_irq_chip()
        .map_err(|e| Error::Vm("create the in-kernel irqchip", e))?;
    let pit = kvm_pit_config {
        flags: kvm_bindings::KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    };
    vm.create_pit2(pit)
        .map_err(|e| Error::Vm("create the PIT", e))?;
    Ok(vm)
}

/// Maps boot RAM and reserves the hotplug region, each registered as KVM memory slots (boot RAM
/// slots first, then the one hotplug slot).
fn setup_memory(
    vm: &VmFd,
    config: &VmmConfig,
) -> Result<(
    memory::MemoryLayout,
    GuestMemoryMmap,
    Option<Arc<memory::HotplugRegion>>,
)> {
    let h = &config.hotplug;
    let layout = memory::MemoryLayout::new(config.machine.memory, h.size, h.block_size)?;
    let boot_mem = memory::create_boot_memory(&layout)?;
    let mut slot = 0u32;
    for region in boot_mem.iter() {
        register_slot(
            vm,
            slot,
            region.start_addr().raw_value(),
            region.len(),
            region.as_ptr() as u64,
        )?;
        slot += 1;
    }
    let hotplug = match &layout.hotplug {
        Some(hl) => {
            let options = memory::RegionOptions { thp: h.thp };
            let region = Arc::new(memory::HotplugRegion::with_options(
                hl,
                h.backend.clone(),
                options,
            )?);
            let t = Instant::now();
            register_slot(
                vm,
                slot,
                region.base().raw_value(),
                region.size(),
                region.host_addr(),
            )?;
            log::info!(
                "hotplug region: {} MiB at {:#x} ({}, THP {}), one KVM slot registered in {:.1} ms",
                region.size() >> 20,
                region.base().raw_value(),
                region.backend(),
                if region.thp() { "on" } else { "off" },
                t.elapsed().as_secs_f64() * 1e3
            );
            Some(region)
        }
        None => None,
    };
    Ok((layout, boot_mem, hotplug))
}

/// The legacy devices on the port-I/O bus, and the console they write to.
struct LegacyDevices {
    pio: Bus,
    serial: Arc<Mutex<SerialDevice>>,
    i8042: Arc<Mutex<I8042>>,
    console: crate::console::ConsoleOut,
}

/// Creates the serial port and the i8042 with their irqfds, and the debug-exit port, on a new
/// port-I/O bus.
fn attach_legacy_devices(vm: &VmFd, state: &Arc<RunState>) -> Result<LegacyDevices> {
    let irq = || EventFdTrigger::new().map_err(|e| Error::Io("cannot create an event fd", e));
    // Guest output never blocks a vCPU: bounded buffer, dropped and counted when unread.
    let console = crate::console::ConsoleOut::stdout()
        .map_err(|e| Error::Io("cannot start the console output thread", e))?;
    // Every byte passes the panic watch, whether or not stdout is read.
    let out = crate::panic_watch::PanicWatch::new(console.clone(), state.clone());
    let serial = Arc::new(Mutex::new(
        SerialDevice::new(irq()?, Box::new(out))
            .map_err(|e| Error::Io("cannot create an event fd", e))?,
    ));
    vm.register_irqfd(devices::bus::lock(&serial).irq_evt(), legacy::COM1_IRQ)
        .map_err(|e| Error::Vm("register the serial irqfd", e))?;
    let i8042 = Arc::new(Mutex::new(I8042::new(irq()?, irq()?)));
    vm.register_irqfd(devices::bus::lock(&i8042).kbd_irq_evt(), legacy::KBD_IRQ)
        .map_err(|e| Error::Vm("register the keyboard irqfd", e))?;
    let mut pio = Bus::new();
    pio.insert(serial.clone(), legacy::COM1_PORT, legacy::COM1_LEN)
        .map_err(Error::Bus)?;
    pio.insert(i8042.clone(), legacy::I8042_PORT, legacy::I8042_LEN)
        .map_err(Error::Bus)?;
    // Stops the VM on the vCPU thread of the write, before the guest runs on (so before any
    // reset it does next).
    let stop = state.clone();
    let debug_exit = legacy::DebugExit::new(Box::new(move |n| {
        stop.request_exit(
            i32::from(n),
            format!(
                "the guest wrote {n} to the debug-exit port {:#x}",
                legacy::DEBUG_EXIT_PORT
            ),
        )
    }));
    pio.insert(
        Arc::new(Mutex::new(debug_exit)),
        legacy::DEBUG_EXIT_PORT,
        legacy::DEBUG_EXIT_LEN,
    )
    .map_err(Error::Bus)?;
    Ok(LegacyDevices {
        pio,
        serial,
        i8042,
        console,
    })
}

/// Puts the virtio-mem device over `region` on the MMIO bus and names it on the command line.
fn attach_mem_device(
    vm: &VmFd,
    config: &VmmConfig,
    region: Arc<memory::HotplugRegion>,
    boot_mem: &GuestMemoryMmap,
    mmio: &mut Bus,
    cmdline: &mut Cmdline,
) -> Result<MemDevice> {
    let h = &config.hotplug;
    let dev = MemDevice::new(
        vm,
        region,
        h.requested,
        boot_mem.clone(),
        VIRTIO_MMIO_BASE,
        VIRTIO_IRQ_BASE,
        h.populate_ahead,
    )?;
    mmio.insert(dev.bus_device(), VIRTIO_MMIO_BASE, VIRTIO_MMIO_SIZE)
        .map_err(Error::Bus)?;
    cmdline
        .add_virtio_mmio_device(
            VIRTIO_MMIO_SIZE,
            GuestAddress(VIRTIO_MMIO_BASE),
            VIRTIO_IRQ_BASE,
            None,
        )
        .map_err(Error::Cmdline)?;
    Ok(dev)
}

/// Loads the kernel, the initramfs and the command line, and writes the boot structures (zero
/// page and e820, MP table, GDT, page tables). Returns the entry point and the page table root.
fn load_kernel_and_boot_structures(
    config: &VmmConfig,
    layout: &memory::MemoryLayout,
    boot_mem: &GuestMemoryMmap,
    cmdline: &Cmdline,
) -> Result<(GuestAddress, u64)> {
    let (entry, setup_header, kernel_end) = load_kernel(boot_mem, &config.kernel.path)?;
    let initrd = match &config.kernel.initrd {
        Some(p) => Some(load_initrd(boot_mem, p, kernel_end, setup_header.as_ref())?),
        None => None,
    };
    linux_loader::loader::load_cmdline(boot_mem, GuestAddress(arch::CMDLINE_ADDR), cmdline)
        .map_err(Error::CmdlineLoad)?;
    let cmdline_size = cmdline
        .as_cstring()
        .map_err(Error::Cmdline)?
        .as_bytes_with_nul()
        .len() as u32;
    let info = arch::boot::BootInfo {
        setup_header,
        cmdline_size,
        initrd,
    };
    arch::boot::write_zero_page(boot_mem, &info, &arch::boot::e820_map(&layout.boot_ranges))?;
    arch::mptable::write(boot_mem, config.machine.cpus)?;
    arch::cpu::write_gdt(boot_mem)?;
    let cr3 = arch::boot::write_page_tables(boot_mem)?;
    Ok((entry, cr3))
}

/// Where the vCPUs start: the kernel's 64-bit entry point and the page table root.
struct BootEntry {
    entry: GuestAddress,
    cr3: u64,
}

/// Creates the vCPUs, each with CPUID, MSRs and registers set for a 64-bit boot, and the buses
/// and hotplug window its exits need.
#[allow(clippy::too_many_arguments)]
fn configure_vcpus(
    kvm: &Kvm,
    vm: &VmFd,
    config: &VmmConfig,
    boot: BootEntry,
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
    mem_device: Option<&MemDevice>,
    state: &Arc<RunState>,
) -> Result<Vec<Vcpu>> {
    let cpus = config.machine.cpus;
    let supported = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(Error::Kvm)?;
    let window = mem_device.map(|d| HotplugWindow {
        region: d.region().clone(),
    });
    let mut vcpus = Vec::with_capacity(usize::from(cpus));
    for id in 0..cpus {
        let fd = vm
            .create_vcpu(u64::from(id))
            .map_err(|e| Error::Vm("create a vCPU", e))?;
        let cpuid = arch::cpu::cpuid_for(&supported, id, cpus);
        arch::cpu::configure_vcpu(&fd, id, &cpuid, boot.entry.raw_value(), boot.cr3)?;
        vcpus.push(Vcpu {
            id,
            fd,
            pio: pio.clone(),
            mmio: mmio.clone(),
            hotplug: window.clone(),
            state: state.clone(),
            triple_fault_resets: crate::exit_status::triple_fault_is_reset(&config.kernel.cmdline),
        });
    }
    Ok(vcpus)
}

fn register_slot(vm: &VmFd, slot: u32, guest: u64, size: u64, host: u64) -> Result<()> {
    let region = kvm_userspace_memory_region {
        slot,
        flags: 0,
        guest_phys_addr: guest,
        memory_size: size,
        userspace_addr: host,
    };
    // SAFETY: `host..host+size` is a live mapping owned by the boot memory or the hotplug region,
    // both of which the Vmm keeps until the VM fd is closed.
    unsafe { vm.set_user_memory_region(region) }.map_err(|e| Error::Vm("register a memory slot", e))
}

/// Loads an ELF or bzImage kernel; returns the 64-bit entry point, the bzImage setup header and
/// the end of the loaded image.
fn load_kernel(
    mem: &GuestMemoryMmap,
    path: &std::path::Path,
) -> Result<(
    GuestAddress,
    Option<linux_loader::bootparam::setup_header>,
    u64,
)> {
    let mut f = File::open(path).map_err(|e| Error::KernelFile(path.to_owned(), e))?;
    let mut magic = [0u8; 4];
    let n = f
        .read(&mut magic)
        .map_err(|e| Error::KernelFile(path.to_owned(), e))?;
    f.seek(SeekFrom::Start(0))
        .map_err(|e| Error::KernelFile(path.to_owned(), e))?;
    let load_err = |e| Error::KernelLoad(path.to_owned(), e);
    if n == 4 && magic == *b"\x7fELF" {
        let r = Elf::load(mem, None, &mut f, Some(arch::HIMEM_START)).map_err(load_err)?;
        Ok((r.kernel_load, None, r.kernel_end))
    } else {
        let r = BzImage::load(mem, None, &mut f, Some(arch::HIMEM_START)).map_err(load_err)?;
        // The 64-bit entry point sits 0x200 bytes into the protected-mode kernel.
        let entry = r.kernel_load.checked_add(0x200).ok_or_else(|| {
            Error::KernelLoad(
                path.to_owned(),
                linux_loader::loader::Error::InvalidKernelStartAddress,
            )
        })?;
        Ok((entry, r.setup_header, r.kernel_end))
    }
}

/// Places the initramfs as high as the kernel allows in low boot RAM, page aligned.
fn load_initrd(
    mem: &GuestMemoryMmap,
    path: &std::path::Path,
    kernel_end: u64,
    hdr: Option<&linux_loader::bootparam::setup_header>,
) -> Result<(GuestAddress, u32)> {
    let err = |e| Error::Initrd(path.to_owned(), e);
    let mut f = File::open(path).map_err(err)?;
    let size = f.metadata().map_err(err)?.len();
    let max = hdr
        .map(|h| u64::from(h.initrd_addr_max))
        .filter(|&m| m != 0)
        .unwrap_or(0x37ff_ffff);
    let low_end = mem
        .iter()
        .next()
        .map(|r| r.start_addr().raw_value() + r.len())
        .unwrap_or(0);
    let top = low_end.min(max + 1);
    let start = top
        .checked_sub(size)
        .map(|s| s & !0xfff)
        .filter(|&s| s >= kernel_end && size <= u64::from(u32::MAX))
        .ok_or_else(|| Error::InitrdTooLarge {
            path: path.to_owned(),
            size,
            top,
        })?;
    let mut buf = vec![0u8; size as usize];
    f.read_exact(&mut buf).map_err(err)?;
    mem.write_slice(&buf, GuestAddress(start))
        .map_err(|e| Error::InitrdWrite(path.to_owned(), e))?;
    Ok((GuestAddress(start), size as u32))
}
