//! The state file: `TIDESNAP` (8 bytes), the format version (u32, little endian), the body's
//! length (u64) and CRC-32 (u32), then the body: [`SnapshotState`] as JSON.

use std::fs::File;
use std::io::{Read, Write};
use std::path::Path;

use devices::legacy::persist::{I8042State, SerialState};
use devices::virtio::mem::VirtioMemState;
use devices::virtio::mmio::MmioTransportState;
use serde::{Deserialize, Serialize};

use super::vcpu_state::VcpuState;
use super::vm_state::VmState;
use super::SnapshotError;

/// The first bytes of every state file.
pub const MAGIC: &[u8; 8] = b"TIDESNAP";
/// The format version this build writes and reads.
pub const VERSION: u32 = 1;
/// Header length: magic, version, body length, CRC-32.
pub const HEADER_LEN: usize = 8 + 4 + 8 + 4;
/// The largest body read (a state file is kilobytes per vCPU).
const MAX_BODY: u64 = 64 << 20;

/// The machine the snapshot was taken of.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineState {
    /// vCPUs.
    pub cpus: u8,
    /// Boot RAM in bytes.
    pub boot_memory: u64,
    /// Hotplug region size (0: none).
    pub hotplug_size: u64,
    /// virtio-mem block size.
    pub block_size: u64,
    /// Whether a triple fault counts as a reset (the guest's command line asked for it).
    #[serde(default)]
    pub triple_fault_resets: bool,
}

/// What the memory file holds: its length, its CRC-32, and the plugged runs written into it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryFileState {
    /// Its length in bytes: boot RAM plus the hotplug region.
    pub len: u64,
    /// The CRC-32 of every byte written (boot RAM, then each plugged run in address order).
    pub crc32: u32,
    /// The bytes written (boot RAM plus plugged).
    pub written: u64,
}

/// The virtio-mem device and its transport.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtioMemDeviceState {
    /// The virtio-mmio transport.
    pub transport: MmioTransportState,
    /// The device (sizes, plugged blocks, BUSY state, active queue).
    pub device: VirtioMemState,
}

/// Everything a snapshot holds besides guest memory.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SnapshotState {
    /// The Tide version that wrote it (for people; [`VERSION`] is what is checked).
    pub tide_version: String,
    /// The machine.
    pub machine: MachineState,
    /// The memory file.
    pub memory: MemoryFileState,
    /// Each vCPU, in index order.
    pub vcpus: Vec<VcpuState>,
    /// The in-kernel PICs, IOAPIC, PIT and clock.
    pub vm: VmState,
    /// The UART.
    pub serial: SerialState,
    /// The i8042.
    pub i8042: I8042State,
    /// The virtio-mem device, if the VM has a hotplug region.
    pub virtio_mem: Option<VirtioMemDeviceState>,
}

/// Encodes `state` as a whole state file.
pub fn encode(state: &SnapshotState) -> Result<Vec<u8>, serde_json::Error> {
    let body = serde_json::to_vec(state)?;
    let mut out = Vec::with_capacity(HEADER_LEN + body.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&(body.len() as u64).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
    out.extend_from_slice(&body);
    Ok(out)
}

/// Writes `bytes` into the new file `file` (created by the caller).
pub fn write(mut file: &File, bytes: &[u8]) -> std::io::Result<()> {
    file.write_all(bytes)
}

/// Decodes a whole state file read from `path`; every way it can be wrong is its own error.
pub fn decode(path: &Path, bytes: &[u8]) -> Result<SnapshotState, SnapshotError> {
    let p = || path.to_path_buf();
    if bytes.len() < MAGIC.len() || &bytes[..MAGIC.len()] != MAGIC {
        if bytes.len() < MAGIC.len() && MAGIC.starts_with(bytes) {
            return Err(SnapshotError::Truncated {
                path: p(),
                got: bytes.len() as u64,
                want: HEADER_LEN as u64,
            });
        }
        return Err(SnapshotError::Foreign(p()));
    }
    if bytes.len() < HEADER_LEN {
        return Err(SnapshotError::Truncated {
            path: p(),
            got: bytes.len() as u64,
            want: HEADER_LEN as u64,
        });
    }
    let u32_at = |o: usize| u32::from_le_bytes(bytes[o..o + 4].try_into().unwrap_or_default());
    let version = u32_at(8);
    if version != VERSION {
        return Err(SnapshotError::Version {
            path: p(),
            found: version,
            expected: VERSION,
        });
    }
    let len = u64::from_le_bytes(bytes[12..20].try_into().unwrap_or_default());
    let crc = u32_at(20);
    let body = &bytes[HEADER_LEN..];
    if (body.len() as u64) < len {
        return Err(SnapshotError::Truncated {
            path: p(),
            got: bytes.len() as u64,
            want: (HEADER_LEN as u64).saturating_add(len),
        });
    }
    if body.len() as u64 != len {
        return Err(SnapshotError::Invalid(
            "the state file has bytes past its body",
        ));
    }
    if crc32fast::hash(body) != crc {
        return Err(SnapshotError::Checksum(p()));
    }
    serde_json::from_slice(body).map_err(|e| SnapshotError::Body(p(), e))
}

/// Reads and decodes the state file at `path` (at most 64 MiB are read).
pub fn read(path: &Path) -> Result<SnapshotState, SnapshotError> {
    let file = File::open(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => SnapshotError::Missing(path.to_path_buf()),
        _ => SnapshotError::File(path.to_path_buf(), e),
    })?;
    let mut bytes = Vec::new();
    file.take(MAX_BODY + HEADER_LEN as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| SnapshotError::File(path.to_path_buf(), e))?;
    decode(path, &bytes)
}
