//! Building a VM from a snapshot ([`RestoreConfig`]): the state file is read and checked, the
//! memory file checked against it, the hotplug region reserved again as one `MAP_NORESERVE`
//! mapping and one KVM slot on the backend asked for now, its saved plugged blocks plugged and
//! filled from the memory file (unplugged ones stay inaccessible), then the devices, the
//! in-kernel irqchip, PIT and clock, and each vCPU are put back. Everything is checked before
//! any guest code runs; the CRC-32 of the memory copied must be the one the state file holds.

use std::fs::File;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use devices::bus::{lock, Bus};
use kvm_ioctls::Kvm;
use linux_loader::cmdline::Cmdline;
use vm_memory::GuestAddress;

use super::create::segments;
use super::format::{self, SnapshotState};
use super::memfile;
use super::SnapshotError;
use crate::builder;
use crate::config::{HotplugConfig, KernelConfig, MachineConfig, VmmConfig};
use crate::vcpu::{HotplugWindow, RunState, Vcpu};
use crate::{Error, Vmm};

/// What `tide restore` is given: the snapshot and the options that may differ on this host.
#[derive(Debug, Clone)]
pub struct RestoreConfig {
    /// The state file.
    pub snapshot: PathBuf,
    /// The memory file.
    pub mem_file: PathBuf,
    /// Where to serve the API.
    pub api_socket: Option<PathBuf>,
    /// Start with the vCPUs paused.
    pub paused: bool,
    /// The hotplug region's backend on this host.
    pub backend: memory::Backend,
    /// Transparent huge pages for an anon region.
    pub thp: bool,
    /// Populate ahead.
    pub populate_ahead: bool,
}

fn vmm_err(e: Error) -> SnapshotError {
    SnapshotError::Vmm(Box::new(e))
}

/// Checks the machine a snapshot describes before anything is built.
fn check(state: &SnapshotState, cfg: &RestoreConfig, mem_len: u64) -> Result<(), SnapshotError> {
    let m = &state.machine;
    if m.cpus == 0 || m.cpus > 254 || state.vcpus.len() != usize::from(m.cpus) {
        return Err(SnapshotError::Invalid(
            "the vCPU count does not match the vCPU states",
        ));
    }
    if state
        .vcpus
        .iter()
        .enumerate()
        .any(|(i, v)| usize::from(v.id) != i)
    {
        return Err(SnapshotError::Invalid(
            "the vCPU states are not in index order",
        ));
    }
    if (m.hotplug_size == 0) != state.virtio_mem.is_none() {
        return Err(SnapshotError::Invalid(
            "the hotplug region and the virtio-mem state disagree",
        ));
    }
    let want = m
        .boot_memory
        .checked_add(m.hotplug_size)
        .ok_or(SnapshotError::Invalid("the memory sizes overflow"))?;
    if state.memory.len != want {
        return Err(SnapshotError::Invalid(
            "the memory file length is not boot RAM plus the region",
        ));
    }
    if mem_len != want {
        return Err(SnapshotError::MemoryMismatch {
            path: cfg.mem_file.clone(),
            why: format!("it is {mem_len} bytes long, the snapshot's is {want}"),
        });
    }
    Ok(())
}

/// Builds the VM a snapshot describes, ready to [`Vmm::run`] (paused if asked).
pub fn restore(cfg: &RestoreConfig) -> Result<Vmm, SnapshotError> {
    let t = Instant::now();
    let state = format::read(&cfg.snapshot)?;
    let mem_file =
        File::open(&cfg.mem_file).map_err(|e| SnapshotError::File(cfg.mem_file.clone(), e))?;
    let mem_len = mem_file
        .metadata()
        .map_err(|e| SnapshotError::File(cfg.mem_file.clone(), e))?
        .len();
    check(&state, cfg, mem_len)?;
    let m = &state.machine;
    let config = VmmConfig {
        kernel: KernelConfig {
            path: cfg.snapshot.clone(),
            initrd: None,
            cmdline: String::new(),
        },
        machine: MachineConfig {
            cpus: m.cpus,
            memory: m.boot_memory,
        },
        hotplug: HotplugConfig {
            size: m.hotplug_size,
            block_size: m.block_size,
            backend: cfg.backend.clone(),
            requested: 0,
            thp: cfg.thp,
            populate_ahead: cfg.populate_ahead,
        },
        api_socket: cfg.api_socket.clone(),
        timeout: None,
    };
    let kvm = Kvm::new().map_err(|e| vmm_err(Error::Kvm(e)))?;
    let vm = builder::create_vm(&kvm).map_err(vmm_err)?;
    let (_layout, boot_mem, hotplug) = builder::setup_memory(&vm, &config).map_err(vmm_err)?;

    // Guest memory: plug the saved blocks, then copy boot RAM and them from the file.
    let plugged: Vec<(u64, u64)> = state
        .virtio_mem
        .as_ref()
        .map(|d| d.device.plugged.clone())
        .unwrap_or_default();
    if let Some(region) = &hotplug {
        for &(addr, len) in &plugged {
            region
                .populate(GuestAddress(addr), len)
                .map_err(SnapshotError::Memory)?;
        }
    }
    let (segs, _) = segments(&boot_mem, hotplug.as_deref(), &plugged);
    let cancel = || crate::signals::received().is_some();
    let crc = memfile::read(&mem_file, &cfg.mem_file, &segs, &cancel)?;
    if crc != state.memory.crc32 {
        return Err(SnapshotError::MemoryMismatch {
            path: cfg.mem_file.clone(),
            why: "its content is not the snapshot's (checksum mismatch)".into(),
        });
    }
    let copied = t.elapsed();

    let run_state =
        Arc::new(RunState::new().map_err(|e| vmm_err(Error::Io("cannot create an event fd", e)))?);
    let mut legacy = builder::attach_legacy_devices(&vm, &run_state).map_err(vmm_err)?;
    // The guest channel holds no state worth saving: the guest's init reports again.
    let guest_channel = builder::attach_guest_channel(&vm, &mut legacy.pio).map_err(vmm_err)?;
    lock(&legacy.serial)
        .restore_state(&state.serial, Box::new(legacy.console.clone()))
        .map_err(|e| SnapshotError::Legacy(format!("serial: {e}")))?;
    lock(&legacy.i8042)
        .restore_state(&state.i8042)
        .map_err(|e| SnapshotError::Legacy(format!("i8042: {e}")))?;
    let mut mmio = Bus::new();
    let mut cmdline =
        Cmdline::new(arch::CMDLINE_MAX_SIZE).map_err(|e| vmm_err(Error::Cmdline(e)))?;
    let mem_device = match (hotplug, &state.virtio_mem) {
        (Some(region), Some(saved)) => {
            let dev = builder::attach_mem_device(
                &vm,
                &config,
                region,
                &boot_mem,
                &mut mmio,
                &mut cmdline,
            )
            .map_err(vmm_err)?;
            {
                let mut t = lock(&dev.transport);
                t.device_mut()
                    .restore_state(&saved.device)
                    .map_err(SnapshotError::Device)?;
                let active = saved.device.active_queue.map(|q| vec![q]);
                t.restore_state(&saved.transport, active)
                    .map_err(SnapshotError::Transport)?;
                if t.is_activated() {
                    // Requests the driver made available before the snapshot are looked at
                    // once the worker runs.
                    for evt in t.queue_evts() {
                        let _ = evt.write(1);
                    }
                }
            }
            Some(dev)
        }
        _ => None,
    };
    state.vm.restore(&vm)?;

    if cfg.paused {
        run_state.pause.request();
    }
    let pio = Arc::new(legacy.pio);
    let mmio = Arc::new(mmio);
    let window = mem_device.as_ref().map(|d| HotplugWindow {
        region: d.region().clone(),
    });
    let mut vcpus = Vec::with_capacity(state.vcpus.len());
    for v in &state.vcpus {
        let fd = vm
            .create_vcpu(u64::from(v.id))
            .map_err(|e| vmm_err(Error::Vm("create a vCPU", e)))?;
        v.restore(&fd)?;
        vcpus.push(Vcpu {
            id: v.id,
            fd,
            pio: pio.clone(),
            mmio: mmio.clone(),
            hotplug: window.clone(),
            state: run_state.clone(),
            triple_fault_resets: m.triple_fault_resets,
        });
    }
    log::info!(
        "restored {} vCPUs, {} MiB boot RAM and {} MiB plugged from {} in {:.1} ms (memory copied in {:.1} ms)",
        vcpus.len(),
        m.boot_memory >> 20,
        plugged.iter().map(|p| p.1).sum::<u64>() >> 20,
        cfg.snapshot.display(),
        t.elapsed().as_secs_f64() * 1e3,
        copied.as_secs_f64() * 1e3
    );
    Ok(Vmm {
        config,
        vm: Arc::new(vm),
        boot_mem,
        vcpus,
        serial: legacy.serial,
        console: legacy.console,
        i8042: legacy.i8042,
        mem_device,
        state: run_state,
        guest_channel,
    })
}
