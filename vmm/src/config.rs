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
    /// Longest time the whole run may take: then Tide stops the guest, reports where its vCPUs
    /// were and exits with [`crate::exit_status::TIMEOUT`].
    pub timeout: Option<std::time::Duration>,
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

/// Parses a duration for `--timeout`: a whole number with an optional unit, `ms`, `s` (the
/// default), `m` or `h`: `90`, `90s`, `1500ms`, `5m`, `1h`. Zero is refused (it would stop the
/// guest before it ran).
pub fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    use std::time::Duration;
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let bad = || format!("invalid duration {s:?} (a whole number with ms, s, m or h: 90s, 5m)");
    let n: u64 = num.parse().map_err(|_| bad())?;
    let d = match unit {
        "ms" => Some(Duration::from_millis(n)),
        "" | "s" => Some(Duration::from_secs(n)),
        "m" => n.checked_mul(60).map(Duration::from_secs),
        "h" => n.checked_mul(3600).map(Duration::from_secs),
        _ => None,
    }
    .ok_or_else(bad)?;
    if d.is_zero() {
        return Err(format!("duration {s:?} must be more than zero"));
    }
    Ok(d)
}

/// The kernel parameter through which `tide run --exec CMD` hands CMD to the project's guest
/// init: `tide.exec=` and CMD's bytes in lowercase hexadecimal, since a kernel parameter cannot
/// carry double quotes and the kernel splits at spaces outside them.
pub fn exec_param(cmd: &str) -> String {
    let mut p = String::with_capacity(10 + 2 * cmd.len());
    p.push_str("tide.exec=");
    for b in cmd.bytes() {
        p.push_str(&format!("{b:02x}"));
    }
    p
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("90"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("1500ms"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
        for bad in [
            "",
            "s",
            "0",
            "0s",
            "1.5s",
            "-1",
            "5d",
            "99999999999999999999",
            "18446744073709551615h",
        ] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn exec_param_survives_quotes_and_spaces() {
        assert_eq!(
            exec_param("exit 7"),
            "tide.exec=6578697420 37".replace(' ', "")
        );
        let cmd = "echo \"a b\" 'c'; exit 7";
        let p = exec_param(cmd);
        assert!(p["tide.exec=".len()..]
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()));
        assert_eq!(p.len(), "tide.exec=".len() + 2 * cmd.len());
    }
}
