//! Tide's VMM: builds a VM from one [`VmmConfig`] ([`builder`]), runs one thread per vCPU
//! ([`vcpu`]), and serves devices, the console and the API from one event loop ([`event_loop`],
//! [`api`]).

pub mod api;
pub mod builder;
pub mod config;
pub mod console;
pub mod event_loop;
pub mod exit_status;
pub mod guest_report;
pub mod logger;
pub mod panic_watch;
pub mod resident;
pub mod runner;
pub mod signals;
pub mod vcpu;
pub mod virtio_mem_wiring;

pub use builder::Vmm;
pub use config::{HotplugConfig, KernelConfig, MachineConfig, VmmConfig};

use std::path::PathBuf;

/// Errors of the VMM crate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `/dev/kvm` cannot be opened or is unusable.
    #[error("cannot use /dev/kvm")]
    Kvm(#[source] kvm_ioctls::Error),
    /// KVM reports an API version other than 12.
    #[error("KVM API version {0} is not supported (need 12)")]
    KvmApiVersion(i32),
    /// A KVM VM-level ioctl failed.
    #[error("KVM cannot {0}")]
    Vm(&'static str, #[source] kvm_ioctls::Error),
    /// Host memory set-up failed.
    #[error("guest memory")]
    Memory(#[from] memory::Error),
    /// The kernel file cannot be opened.
    #[error("cannot open kernel {}", .0.display())]
    KernelFile(PathBuf, #[source] std::io::Error),
    /// The kernel is neither a loadable bzImage nor ELF.
    #[error("cannot load kernel {}: not a usable bzImage or 64-bit ELF", .0.display())]
    KernelLoad(PathBuf, #[source] linux_loader::loader::Error),
    /// The initramfs cannot be read.
    #[error("cannot load initramfs {}", .0.display())]
    Initrd(PathBuf, #[source] std::io::Error),
    /// The initramfs does not fit between the kernel and the highest address it may use.
    #[error("cannot load initramfs {}: {size} bytes do not fit between the kernel and {top:#x}", .path.display())]
    InitrdTooLarge {
        /// The initramfs.
        path: PathBuf,
        /// Its size in bytes.
        size: u64,
        /// The end of the memory it may occupy.
        top: u64,
    },
    /// The initramfs cannot be written into guest memory.
    #[error("cannot load initramfs {}", .0.display())]
    InitrdWrite(PathBuf, #[source] vm_memory::GuestMemoryError),
    /// The kernel command line is invalid or too long.
    #[error("invalid kernel command line")]
    Cmdline(#[source] linux_loader::cmdline::Error),
    /// Writing the command line into guest memory failed.
    #[error("cannot write the kernel command line")]
    CmdlineLoad(#[source] linux_loader::loader::Error),
    /// x86_64 boot set-up failed.
    #[error("boot set-up")]
    Arch(#[from] arch::Error),
    /// A device could not be put on its bus.
    #[error("device set-up")]
    Bus(#[source] devices::bus::BusError),
    /// The virtio-mem device or its transport could not be set up.
    #[error("device set-up: virtio-mem")]
    VirtioMem(#[source] devices::virtio::Error),
    /// A vCPU count KVM and the MP table cannot take.
    #[error("invalid configuration: --cpus {0} is out of range (1 to 254)")]
    Cpus(u8),
    /// An event fd, epoll or thread operation failed.
    #[error("{0}")]
    Io(&'static str, #[source] std::io::Error),
    /// The event loop failed.
    #[error("event loop")]
    EventManager(#[source] event_manager::Error),
    /// The API socket cannot be served.
    #[error("API socket {}", .0.display())]
    ApiSocket(PathBuf, #[source] api::ApiError),
    /// The guest was stopped because of a fault (reported with its cause).
    #[error("guest stopped: {0}")]
    GuestFault(String),
}

/// Result of this crate.
pub type Result<T> = std::result::Result<T, Error>;

/// Formats an error with its whole cause chain on one line: `a: b: c`.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let m = c.to_string();
        if !s.ends_with(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        cur = c.source();
    }
    s
}
