//! The one configuration value a [`crate::Vmm`] is built from. The CLI only parses into it, so
//! tests and other front ends take the same path.

use std::path::PathBuf;

/// Everything needed to build and run a VM.
#[derive(Debug, Clone)]
pub struct VmmConfig {
    /// Kernel, initramfs and command line.
    pub kernel: KernelConfig,
    /// vCPUs and boot RAM.
    pub machine: MachineConfig,
    /// The virtio-mem hotplug region (size 0: none).
    pub hotplug: HotplugConfig,
    /// Where to serve the HTTP API, if anywhere.
    pub api_socket: Option<PathBuf>,
}

/// The guest kernel.
#[derive(Debug, Clone)]
pub struct KernelConfig {
    /// bzImage or ELF (vmlinux or any static ELF with a 64-bit entry).
    pub path: PathBuf,
    /// Optional initramfs.
    pub initrd: Option<PathBuf>,
    /// Kernel command line; Tide appends its device parameters.
    pub cmdline: String,
}

/// Default kernel command line.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=1 pci=off";

/// vCPUs and boot memory.
#[derive(Debug, Clone, Copy)]
pub struct MachineConfig {
    /// Number of vCPUs (1 to 254).
    pub cpus: u8,
    /// Boot RAM in bytes.
    pub memory: u64,
}

/// The hotplug region behind the virtio-mem device.
#[derive(Debug, Clone)]
pub struct HotplugConfig {
    /// Region size in bytes; 0 means no virtio-mem device.
    pub size: u64,
    /// virtio-mem block size in bytes (power of two, at least 2 MiB).
    pub block_size: u64,
    /// Host memory backend.
    pub backend: memory::Backend,
    /// Initial requested size in bytes.
    pub requested: u64,
    /// Transparent huge pages for the `anon` backend (when the block size allows).
    pub thp: bool,
    /// Populate the blocks the guest will plug as soon as the requested size grows.
    pub populate_ahead: bool,
}

impl Default for HotplugConfig {
    fn default() -> Self {
        Self {
            size: 0,
            block_size: memory::DEFAULT_BLOCK_SIZE,
            backend: memory::Backend::Anon,
            requested: 0,
            thp: true,
            populate_ahead: true,
        }
    }
}
