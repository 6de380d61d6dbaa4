//! How unplugged blocks are protected, and the plug state of a range of blocks.

/// How unplugged blocks of the reservation are protected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum UnpluggedAccess {
    /// `PROT_NONE`: any access to an unplugged block faults (the default).
    #[default]
    Inaccessible,
    /// `PROT_READ`: unplugged blocks read as zeros (anonymous memory maps the shared zero page;
    /// shared backends may allocate page cache on read).
    Readable,
}

impl UnpluggedAccess {
    pub(crate) fn prot(self) -> libc::c_int {
        match self {
            UnpluggedAccess::Inaccessible => libc::PROT_NONE,
            UnpluggedAccess::Readable => libc::PROT_READ,
        }
    }
}

/// The plug state of a range of blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RangeState {
    /// Every block is plugged.
    Plugged,
    /// Every block is unplugged.
    Unplugged,
    /// Some blocks are plugged, some are not.
    Mixed,
}
