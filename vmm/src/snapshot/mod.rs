//! Snapshots: the state of a paused VM in one state file, and its memory in one memory file,
//! from which `tide restore` starts the VM again in a new process.
//!
//! - [`format`]: the state file (a magic, a version, the body's length and CRC-32, then the
//!   body as JSON) and what it holds ([`SnapshotState`]).
//! - [`vcpu_state`], [`vm_state`]: what KVM keeps of each vCPU and of the VM.
//! - [`memfile`]: the memory file: boot RAM, then the hotplug region at its offsets with only
//!   its plugged blocks written (unplugged blocks are holes).
//! - [`create`]: taking a snapshot of a paused VM; [`restore`]: building a VM from one.

pub mod create;
pub mod format;
pub mod memfile;
pub mod restore;
pub mod vcpu_state;
pub mod vm_state;

#[cfg(test)]
mod tests;

use std::path::PathBuf;

pub use format::SnapshotState;
pub use restore::RestoreConfig;

/// Why a snapshot cannot be taken or restored.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// A KVM state ioctl failed.
    #[error("{0} failed")]
    Kvm(&'static str, #[source] kvm_ioctls::Error),
    /// An MSR list does not fit KVM's wrapper.
    #[error("too many MSRs for one KVM call")]
    Msrs,
    /// KVM refused to set an MSR the snapshot holds.
    #[error("KVM refused to set MSR {0:#x}")]
    MsrRefused(u32),
    /// A CPUID table does not fit KVM's wrapper.
    #[error("the saved CPUID table is too large")]
    Cpuid,
    /// The saved FPU state has the wrong shape.
    #[error("the saved FPU state is malformed")]
    Fpu,
    /// A stop (signal or API) came while memory was being copied.
    #[error("cancelled: the VM is stopping")]
    Cancelled,
    /// The VM is not paused.
    #[error("the VM is not paused (PATCH /vm {{\"state\": \"Paused\"}} first)")]
    NotPaused,
    /// A vCPU's state could not be saved when it paused.
    #[error("vCPU {0} state: {1}")]
    VcpuSave(u8, String),
    /// A virtio-mem request is in flight.
    #[error("virtio-mem")]
    Device(#[source] devices::virtio::mem::PersistError),
    /// A transport or device state cannot be restored.
    #[error("virtio-mem transport")]
    Transport(#[source] devices::virtio::Error),
    /// A legacy device state cannot be restored.
    #[error("{0}")]
    Legacy(String),
    /// A file exists already (never overwritten).
    #[error("{} exists already (a snapshot never overwrites a file)", .0.display())]
    Exists(PathBuf),
    /// A file cannot be created, written or read.
    #[error("{}", .0.display())]
    File(PathBuf, #[source] std::io::Error),
    /// The state file cannot be found.
    #[error("snapshot {} does not exist", .0.display())]
    Missing(PathBuf),
    /// The state file is not a Tide snapshot.
    #[error("{} is not a Tide snapshot (wrong magic)", .0.display())]
    Foreign(PathBuf),
    /// The state file is of another format version.
    #[error("{} is a snapshot of format version {found}; this tide reads version {expected}", .path.display())]
    Version {
        /// The file.
        path: PathBuf,
        /// Its version.
        found: u32,
        /// The version this build reads.
        expected: u32,
    },
    /// The state file is shorter than its header says.
    #[error("{} is truncated ({got} of {want} bytes)", .path.display())]
    Truncated {
        /// The file.
        path: PathBuf,
        /// Bytes present.
        got: u64,
        /// Bytes the header says.
        want: u64,
    },
    /// The state file's body does not match its checksum.
    #[error("{} is corrupted (checksum mismatch)", .0.display())]
    Checksum(PathBuf),
    /// The state file's body cannot be decoded.
    #[error("{} has an unreadable body", .0.display())]
    Body(PathBuf, #[source] serde_json::Error),
    /// The state file holds values no VM of this Tide can have.
    #[error("invalid snapshot: {0}")]
    Invalid(&'static str),
    /// The memory file does not belong to the snapshot.
    #[error("memory file {} does not match the snapshot: {why}", .path.display())]
    MemoryMismatch {
        /// The memory file.
        path: PathBuf,
        /// What differs.
        why: String,
    },
    /// Guest memory could not be set up.
    #[error("guest memory")]
    Memory(#[source] memory::Error),
    /// VM set-up failed.
    #[error("VM set-up")]
    Vmm(#[source] Box<crate::Error>),
}
