//! The crate's error type.

use std::io;
use std::path::PathBuf;

/// Everything that can go wrong in the `memory` crate.
///
/// Guest-supplied ranges that are malformed produce [`Error::Misaligned`], [`Error::OutOfRange`],
/// [`Error::NotUnplugged`] or [`Error::NotPlugged`] (see [`Error::is_invalid_request`]); host-side
/// failures (no memory, too many mappings, a listener veto) produce the other variants.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A size string could not be parsed.
    #[error("invalid size {input:?}: {reason}")]
    BadSize {
        /// The string that was given.
        input: String,
        /// Why it was rejected.
        reason: &'static str,
    },
    /// The boot RAM size is unusable.
    #[error("invalid boot RAM size {size:#x}: {reason}")]
    BootRam {
        /// The requested boot RAM size in bytes.
        size: u64,
        /// Why it was rejected.
        reason: &'static str,
    },
    /// The hotplug block size is unusable.
    #[error("invalid hotplug block size {block_size:#x}: {reason}")]
    BlockSize {
        /// The requested block size in bytes.
        block_size: u64,
        /// Why it was rejected.
        reason: &'static str,
    },
    /// The hotplug size is unusable.
    #[error("invalid hotplug size {size:#x} (block size {block_size:#x}): {reason}")]
    HotplugSize {
        /// The requested hotplug size in bytes.
        size: u64,
        /// The block size it was checked against.
        block_size: u64,
        /// Why it was rejected.
        reason: &'static str,
    },
    /// The guest physical range does not fit in the guest physical address space.
    #[error("guest physical range [{base:#x}, +{size:#x}) does not fit in the {bits}-bit guest physical address space")]
    AddressSpace {
        /// First guest physical address of the range.
        base: u64,
        /// Length of the range.
        size: u64,
        /// Width of the guest physical address space.
        bits: u32,
    },
    /// vm-memory refused to build the boot memory.
    #[error("cannot create boot memory: {0}")]
    BootMemory(#[source] vm_memory::mmap::FromRangesError),
    /// vm-memory refused to wrap the hotplug reservation.
    #[error("cannot wrap hotplug reservation at host {host:#x} (size {size:#x}) as a guest region: {reason}")]
    GuestRegion {
        /// Host virtual address of the reservation.
        host: u64,
        /// Size of the reservation.
        size: u64,
        /// What vm-memory said.
        reason: String,
    },
    /// A backend string could not be parsed.
    #[error("invalid memory backend {input:?}: expected anon, memfd, hugetlb or file:/path")]
    BadBackend {
        /// The string that was given.
        input: String,
    },
    /// Reserving the host address range failed.
    #[error("cannot reserve {size:#x} bytes of host address space: {source}")]
    Mmap {
        /// Size of the reservation.
        size: u64,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Creating or sizing the memfd failed.
    #[error("cannot create a memfd of {size:#x} bytes: {source}")]
    Memfd {
        /// Requested size.
        size: u64,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The backend's file system cannot punch holes, so unplugged memory could never be
    /// given back (ramfs, some FUSE or network file systems).
    #[error("the {backend} backend cannot give unplugged memory back: its file system does not punch holes (fallocate PUNCH_HOLE): {source}")]
    NoHolePunch {
        /// The backend, as given.
        backend: String,
        /// The OS error of the probe.
        #[source]
        source: io::Error,
    },
    /// Creating or sizing the backing file failed.
    #[error("cannot create backing file {path:?} of {size:#x} bytes: {source}")]
    File {
        /// Path of the backing file.
        path: PathBuf,
        /// Requested size.
        size: u64,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// `file:PATH` names something Tide must not use (see the backend's policy).
    #[error("backing file {path:?} {reason}")]
    BackingFileRefused {
        /// The path given.
        path: PathBuf,
        /// Why it is refused.
        reason: &'static str,
    },
    /// The hugetlb backend was requested, but the 2 MiB huge page pool has no free pages.
    #[error("hugetlb backend: the 2 MiB huge page pool is empty (free_hugepages is 0 in /sys/kernel/mm/hugepages/hugepages-2048kB); raise /proc/sys/vm/nr_hugepages")]
    HugetlbPoolEmpty,
    /// The hugetlb backend needs blocks made of whole 2 MiB pages.
    #[error("hugetlb backend: block size {block_size:#x} is not a multiple of 2 MiB")]
    HugetlbBlockSize {
        /// The block size in bytes.
        block_size: u64,
    },
    /// A range is empty or not aligned to the block size.
    #[error(
        "range [{addr:#x}, +{len:#x}) is empty or not aligned to the block size {block_size:#x}"
    )]
    Misaligned {
        /// First guest physical address of the range.
        addr: u64,
        /// Length of the range.
        len: u64,
        /// The region's block size.
        block_size: u64,
    },
    /// A range is not inside the hotplug region (or its end overflows).
    #[error(
        "range [{addr:#x}, +{len:#x}) is not inside the hotplug region [{base:#x}, +{size:#x})"
    )]
    OutOfRange {
        /// First guest physical address of the range.
        addr: u64,
        /// Length of the range.
        len: u64,
        /// First guest physical address of the region.
        base: u64,
        /// Size of the region.
        size: u64,
    },
    /// A populate was asked for a range that is not wholly unplugged.
    #[error("cannot populate [{addr:#x}, +{len:#x}): some blocks are already plugged")]
    NotUnplugged {
        /// First guest physical address of the range.
        addr: u64,
        /// Length of the range.
        len: u64,
    },
    /// A discard was asked for a range that is not wholly plugged.
    #[error("cannot discard [{addr:#x}, +{len:#x}): some blocks are not plugged")]
    NotPlugged {
        /// First guest physical address of the range.
        addr: u64,
        /// Length of the range.
        len: u64,
    },
    /// The change would split the reservation into more mappings than the budget allows.
    #[error("cannot change [{addr:#x}, +{len:#x}): it would split the reservation into {runs} mappings, over the budget of {budget} (vm.max_map_count / 2)")]
    TooFragmented {
        /// First guest physical address of the range.
        addr: u64,
        /// Length of the range.
        len: u64,
        /// Number of protection runs the change would create.
        runs: u64,
        /// The allowed number of runs.
        budget: u64,
    },
    /// The host could not back the range with memory (it was rolled back).
    #[error("cannot populate [{addr:#x}, +{len:#x}) with host memory: {source}")]
    Populate {
        /// First guest physical address of the range.
        addr: u64,
        /// Length of the range.
        len: u64,
        /// The OS error (ENOMEM, EFAULT for a full tmpfs or empty hugetlb pool, ...).
        #[source]
        source: io::Error,
    },
    /// The VMM is stopping: the populate stopped between two slices (it was rolled back).
    #[error("populate of [{addr:#x}, +{len:#x}) stopped: the VMM is stopping")]
    Stopped {
        /// First guest physical address of the range.
        addr: u64,
        /// Length of the range.
        len: u64,
    },
    /// Releasing the host memory of a range failed.
    #[error("cannot discard host memory of [{addr:#x}, +{len:#x}): {source}")]
    Discard {
        /// First guest physical address of the range.
        addr: u64,
        /// Length of the range.
        len: u64,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Changing the protection of a range failed.
    #[error("cannot change protection of [{addr:#x}, +{len:#x}): {source}")]
    Protect {
        /// First guest physical address of the range.
        addr: u64,
        /// Length of the range.
        len: u64,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// A listener refused a populate; the populate was rolled back.
    #[error("populate of [{addr:#x}, +{len:#x}) vetoed by a listener: {reason}")]
    ListenerVeto {
        /// First guest physical address of the range.
        addr: u64,
        /// Length of the range.
        len: u64,
        /// What the listener said.
        #[source]
        reason: crate::ListenerError,
    },
    /// Reading the resident memory (`fstat` or `/proc/self/smaps`) failed.
    #[error("cannot read the resident memory (fstat or /proc/self/smaps): {0}")]
    Smaps(#[source] io::Error),
}

impl Error {
    /// True for errors caused by a malformed request (a bad range or a range in the wrong
    /// state), as opposed to the host being unable to do it right now.
    pub fn is_invalid_request(&self) -> bool {
        matches!(
            self,
            Error::Misaligned { .. }
                | Error::OutOfRange { .. }
                | Error::NotUnplugged { .. }
                | Error::NotPlugged { .. }
        )
    }
}

/// The crate's result type.
pub type Result<T> = std::result::Result<T, Error>;
