//! Taking a snapshot of a paused VM: the memory file first (boot RAM and the plugged blocks),
//! then the state file, both new files (mode 0600, never an existing one). A failure removes
//! whatever of the two this snapshot created; the VM stays as it was (paused).

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use devices::bus::lock;
use devices::legacy::{SerialDevice, I8042};
use kvm_ioctls::VmFd;
use serde::Serialize;
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use super::format::{self, MachineState, MemoryFileState, SnapshotState, VirtioMemDeviceState};
use super::memfile::{self, Created, Segment};
use super::vm_state::VmState;
use super::SnapshotError;
use crate::vcpu::RunState;
use crate::virtio_mem_wiring::Transport;

/// What a snapshot reads of a running VM.
pub struct Sources {
    /// The KVM VM.
    pub vm: Arc<VmFd>,
    /// The run state (with the pause and the vCPUs' saved states).
    pub state: Arc<RunState>,
    /// The UART.
    pub serial: Arc<Mutex<SerialDevice>>,
    /// The i8042.
    pub i8042: Arc<Mutex<I8042>>,
    /// The virtio-mem transport and its region.
    pub mem: Option<(Arc<Mutex<Transport>>, Arc<memory::HotplugRegion>)>,
    /// Boot RAM.
    pub boot_mem: GuestMemoryMmap,
    /// The machine's shape.
    pub machine: MachineState,
}

/// What `PUT /snapshot/create` answers.
#[derive(Debug, Clone, Serialize)]
pub struct SnapshotInfo {
    /// Bytes of the state file.
    pub state_bytes: u64,
    /// Bytes written into the memory file (boot RAM plus plugged).
    pub memory_bytes_written: u64,
    /// The memory file's length (boot RAM plus the whole hotplug region; the rest are holes).
    pub memory_file_len: u64,
    /// Of which plugged hotplug memory.
    pub plugged_bytes: u64,
    /// Time taken, in milliseconds.
    pub elapsed_ms: f64,
}

fn boot_segments(boot_mem: &GuestMemoryMmap) -> (Vec<Segment>, u64) {
    let mut offset = 0;
    let segs = boot_mem
        .iter()
        .map(|r| {
            let s = Segment {
                host: r.as_ptr() as u64,
                len: r.len(),
                offset,
            };
            offset += r.len();
            s
        })
        .collect();
    (segs, offset)
}

/// The memory file's segments: boot RAM, then the runs `plugged` of `region`.
pub(crate) fn segments(
    boot_mem: &GuestMemoryMmap,
    region: Option<&memory::HotplugRegion>,
    plugged: &[(u64, u64)],
) -> (Vec<Segment>, u64) {
    let (mut segs, boot) = boot_segments(boot_mem);
    if let Some(r) = region {
        let base = r.base().0;
        segs.extend(plugged.iter().map(|&(addr, len)| Segment {
            host: r.host_addr() + (addr - base),
            len,
            offset: boot + (addr - base),
        }));
    }
    (segs, boot)
}

fn device_state(
    mem: &Option<(Arc<Mutex<Transport>>, Arc<memory::HotplugRegion>)>,
) -> Result<Option<VirtioMemDeviceState>, SnapshotError> {
    let Some((transport, _)) = mem else {
        return Ok(None);
    };
    let t = lock(transport);
    Ok(Some(VirtioMemDeviceState {
        transport: t.save_state(),
        device: t.device().save_state().map_err(SnapshotError::Device)?,
    }))
}

/// Takes a snapshot of the paused VM into the new files `snapshot_path` and `mem_path`.
pub fn create(
    src: &Sources,
    snapshot_path: &Path,
    mem_path: &Path,
) -> Result<SnapshotInfo, SnapshotError> {
    let t = Instant::now();
    if !src.state.pause.is_paused() {
        return Err(SnapshotError::NotPaused);
    }
    let vcpus = src
        .state
        .pause
        .saved_states()
        .ok_or(SnapshotError::NotPaused)?
        .into_iter()
        .enumerate()
        .map(|(i, r)| r.map_err(|e| SnapshotError::VcpuSave(i as u8, e)))
        .collect::<Result<Vec<_>, _>>()?;
    for v in &vcpus {
        if !v.refused.is_empty() {
            log::warn!(
                "snapshot: KVM refused to save part of vCPU {}: {}",
                v.id,
                v.refused.join("; ")
            );
        }
    }
    let vm = VmState::save(&src.vm)?;
    let virtio_mem = device_state(&src.mem)?;
    let plugged: Vec<(u64, u64)> = virtio_mem
        .as_ref()
        .map(|d| d.device.plugged.clone())
        .unwrap_or_default();
    let region = src.mem.as_ref().map(|(_, r)| r.as_ref());
    let (segs, boot) = segments(&src.boot_mem, region, &plugged);
    let len = boot + src.machine.hotplug_size;
    let written: u64 = segs.iter().map(|s| s.len).sum();

    // Both files are new; until both are complete, dropping the guards removes them.
    let state_file = memfile::create_new(snapshot_path)?;
    let state_guard = Created::new(snapshot_path, &state_file)?;
    let mem_file = memfile::create_new(mem_path)?;
    let mem_guard = Created::new(mem_path, &mem_file)?;
    let cancel = || src.state.stopping() || crate::signals::received().is_some();
    let crc32 = memfile::write(&mem_file, mem_path, &segs, len, &cancel)?;
    // A request that slipped in while the memory was copied would make the copy a mix.
    if device_state(&src.mem)? != virtio_mem {
        return Err(SnapshotError::Device(
            devices::virtio::mem::PersistError::RequestInFlight,
        ));
    }
    let state = SnapshotState {
        tide_version: env!("CARGO_PKG_VERSION").into(),
        machine: src.machine.clone(),
        memory: MemoryFileState {
            len,
            crc32,
            written,
        },
        vcpus,
        vm,
        serial: lock(&src.serial).save_state(),
        i8042: lock(&src.i8042).save_state(),
        virtio_mem,
    };
    let bytes = format::encode(&state).map_err(|e| SnapshotError::Body(snapshot_path.into(), e))?;
    format::write(&state_file, &bytes).map_err(|e| SnapshotError::File(snapshot_path.into(), e))?;
    mem_guard.keep();
    state_guard.keep();
    Ok(SnapshotInfo {
        state_bytes: bytes.len() as u64,
        memory_bytes_written: written,
        memory_file_len: len,
        plugged_bytes: written - boot,
        elapsed_ms: t.elapsed().as_secs_f64() * 1e3,
    })
}
