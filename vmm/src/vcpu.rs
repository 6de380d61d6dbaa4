//! One thread per vCPU: runs `KVM_RUN`, sends port-I/O and MMIO exits to the buses, and turns
//! guest stops (reset, power-off, faults) into a [`VmExit`] for the event loop.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::exit_status::{KVM_GAVE_UP, TIDE_ERROR, UNPLUGGED_ACCESS};
use crate::guest_report;
use devices::bus::Bus;
use kvm_ioctls::{VcpuExit, VcpuFd};
use vmm_sys_util::eventfd::EventFd;

/// `KVM_EXIT_MEMORY_FAULT` (Linux 6.8+): `KVM_RUN` failed with EFAULT on a guest physical address.
const KVM_EXIT_MEMORY_FAULT: u32 = 39;
/// `KVM_SYSTEM_EVENT_CRASH`: the guest reported a crash (e.g. through Hyper-V's crash MSRs).
const KVM_SYSTEM_EVENT_CRASH: u32 = 3;

/// Why the VM stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmExit {
    /// Exit status for `tide` ([`crate::exit_status`]).
    pub code: i32,
    /// What happened, in words.
    pub reason: String,
    /// Where the guest was, when KVM gave up on it ([`crate::guest_report`]): printed after the
    /// reason whatever the log level.
    pub report: Option<String>,
}

/// The VM's run state shared by vCPUs, the event loop and the API: the first stop wins.
pub struct RunState {
    exit: Mutex<Option<VmExit>>,
    stop: AtomicBool,
    evt: EventFd,
    /// The guest kernel's panic line, once the console showed one.
    panic: Mutex<Option<String>>,
    /// Each vCPU thread adds its guest report when it stops.
    want_reports: AtomicBool,
    reports: Mutex<Vec<(u8, String)>>,
}

impl RunState {
    /// A running VM.
    pub fn new() -> std::io::Result<Self> {
        Ok(Self {
            exit: Mutex::new(None),
            stop: AtomicBool::new(false),
            evt: EventFd::new(libc::EFD_NONBLOCK)?,
            panic: Mutex::new(None),
            want_reports: AtomicBool::new(false),
            reports: Mutex::new(Vec::new()),
        })
    }

    /// The guest kernel panicked (the first line counts): a stop that would read as the guest's
    /// own reset or halt, or as KVM giving up on it, is this panic.
    pub fn record_panic(&self, line: String) {
        let mut p = devices::bus::lock(&self.panic);
        if p.is_none() {
            *p = Some(line);
        }
    }

    /// Stops the VM, and has every vCPU thread add where its vCPU was to the exit's report.
    pub fn request_exit_reporting_vcpus(&self, code: i32, reason: impl Into<String>) {
        self.want_reports.store(true, Ordering::SeqCst);
        self.request_exit(code, reason)
    }

    /// Whether the vCPU threads should report where they stopped.
    pub fn wants_vcpu_reports(&self) -> bool {
        self.want_reports.load(Ordering::SeqCst)
    }

    /// A vCPU thread's report, for [`Self::take_vcpu_reports`].
    pub fn add_vcpu_report(&self, id: u8, report: String) {
        devices::bus::lock(&self.reports).push((id, report));
    }

    /// The vCPU reports added so far, in vCPU order, as one text.
    pub fn take_vcpu_reports(&self) -> Option<String> {
        let mut r = std::mem::take(&mut *devices::bus::lock(&self.reports));
        r.sort_by_key(|(id, _)| *id);
        let text: Vec<String> = r.into_iter().map(|(_, t)| t).collect();
        (!text.is_empty()).then(|| text.join("\n"))
    }

    /// Records why the VM stops (only the first call counts) and wakes the event loop.
    pub fn request_exit(&self, code: i32, reason: impl Into<String>) {
        self.request_exit_with_report(code, reason, None)
    }

    /// Like [`Self::request_exit`], with a report of the guest's state.
    pub fn request_exit_with_report(
        &self,
        code: i32,
        reason: impl Into<String>,
        report: Option<String>,
    ) {
        let mut e = devices::bus::lock(&self.exit);
        if e.is_none() {
            let mut reason = reason.into();
            let mut code = code;
            let panic = devices::bus::lock(&self.panic).clone();
            if let Some(line) = panic {
                use crate::exit_status::{GUEST_PANIC, SUCCESS};
                if [SUCCESS, KVM_GAVE_UP, GUEST_PANIC].contains(&code) {
                    reason = format!("guest kernel panic: {line} (then: {reason})");
                    code = GUEST_PANIC;
                }
            }
            *e = Some(VmExit {
                code,
                reason,
                report,
            });
        }
        self.stop.store(true, Ordering::SeqCst);
        let _ = self.evt.write(1);
    }

    /// Whether a stop was requested.
    pub fn stopping(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    /// The recorded exit, if any.
    pub fn exit(&self) -> Option<VmExit> {
        devices::bus::lock(&self.exit).clone()
    }

    /// Signalled when a stop is requested.
    pub fn evt(&self) -> &EventFd {
        &self.evt
    }
}

/// A guest physical range that is guest RAM only when plugged: an MMIO exit there (this machine's
/// emulating KVM) or an EFAULT (hardware KVM) means the guest touched unplugged memory.
#[derive(Debug, Clone)]
pub struct HotplugWindow {
    /// The hotplug region: its geometry, and the plug state of the faulting block.
    pub region: Arc<memory::HotplugRegion>,
}

impl HotplugWindow {
    fn contains(&self, addr: u64) -> bool {
        let layout = self.region.layout();
        addr >= layout.base.0 && addr - layout.base.0 < layout.size
    }

    /// Whether the block holding `addr` (inside the window) is plugged, asked of the region.
    fn is_plugged(&self, addr: u64) -> bool {
        let layout = self.region.layout();
        let block = addr - (addr - layout.base.0) % layout.block_size;
        matches!(
            self.region
                .state(memory::GuestAddress(block), layout.block_size),
            Ok(memory::RangeState::Plugged)
        )
    }
}

/// One vCPU and what it needs to handle exits.
pub struct Vcpu {
    /// Index (and APIC ID).
    pub id: u8,
    /// The KVM vCPU.
    pub fd: VcpuFd,
    /// Port-I/O bus.
    pub pio: Arc<Bus>,
    /// MMIO bus.
    pub mmio: Arc<Bus>,
    /// The hotplug region, if any.
    pub hotplug: Option<HotplugWindow>,
    /// Shared run state.
    pub state: Arc<RunState>,
    /// A triple fault is the guest's way to reset (`reboot=t`), not a failure.
    pub triple_fault_resets: bool,
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// The signal that kicks a vCPU thread out of `KVM_RUN`.
fn kick_signal() -> libc::c_int {
    vmm_sys_util::signal::SIGRTMIN()
}

/// Installs the (empty) handler of the kick signal; call once before starting vCPU threads.
pub fn install_kick_handler() -> crate::Result<()> {
    vmm_sys_util::signal::register_signal_handler(kick_signal(), kick_handler)
        .map_err(|e| crate::Error::Io("cannot install the vCPU kick signal handler", e.into()))
}

impl Vcpu {
    /// Starts the vCPU on its own thread.
    pub fn start(self) -> crate::Result<JoinHandle<()>> {
        std::thread::Builder::new()
            .name(format!("vcpu{}", self.id))
            .spawn(move || self.run())
            .map_err(|e| crate::Error::Io("cannot start a vCPU thread", e))
    }

    fn run(mut self) {
        let (id, pio, mmio, state) = (
            self.id,
            self.pio.clone(),
            self.mmio.clone(),
            self.state.clone(),
        );
        let window = self.hotplug.clone();
        let in_hotplug = |addr: u64| window.as_ref().is_some_and(|w| w.contains(addr));
        let unplugged_access = |addr: u64, what: &str| {
            let plugged = window
                .as_ref()
                .is_some_and(|w| w.contains(addr) && w.is_plugged(addr));
            if plugged {
                // The host's failure, not the guest's.
                state.request_exit(
                    TIDE_ERROR,
                    format!(
                        "vCPU {id} {what} plugged hotplug memory at guest physical address {addr:#x} \
                         that the host could not back; the guest was stopped"
                    ),
                )
            } else {
                state.request_exit(
                    UNPLUGGED_ACCESS,
                    format!(
                        "vCPU {id} {what} unplugged hotplug memory at guest physical address {addr:#x}; \
                         the guest was stopped and no host memory was allocated for it"
                    ),
                )
            }
        };
        while !state.stopping() {
            match self.fd.run() {
                Ok(VcpuExit::IoIn(port, data)) => {
                    if !pio.read(u64::from(port), data) {
                        data.fill(0xff);
                    }
                }
                Ok(VcpuExit::IoOut(port, data)) => {
                    pio.write(u64::from(port), data);
                }
                Ok(VcpuExit::MmioRead(addr, data)) => {
                    if in_hotplug(addr) {
                        data.fill(0xff);
                        unplugged_access(addr, "read");
                    } else if !mmio.read(addr, data) {
                        data.fill(0xff);
                    }
                }
                Ok(VcpuExit::MmioWrite(addr, data)) => {
                    if in_hotplug(addr) {
                        unplugged_access(addr, "wrote");
                    } else {
                        mmio.write(addr, data);
                    }
                }
                Ok(VcpuExit::Hlt) => state.request_exit(0, "guest halted"),
                Ok(VcpuExit::Shutdown) if self.triple_fault_resets => {
                    state.request_exit(0, "guest reset (triple fault, as reboot=t asks)")
                }
                Ok(VcpuExit::Shutdown) => state.request_exit_with_report(
                    KVM_GAVE_UP,
                    format!("vCPU {id} triple-faulted (KVM shutdown exit) and the guest did not ask for resets by triple fault (reboot=t)"),
                    Some(guest_report::report(id, &self.fd, None)),
                ),
                Ok(VcpuExit::SystemEvent(KVM_SYSTEM_EVENT_CRASH, _)) => state.request_exit(
                    crate::exit_status::GUEST_PANIC,
                    format!("vCPU {id} reported a guest crash (KVM system event)"),
                ),
                Ok(VcpuExit::SystemEvent(kind, _)) => {
                    state.request_exit(0, format!("guest system event {kind}"))
                }
                Ok(VcpuExit::InternalError) => {
                    let (suberror, insn) = guest_report::internal_error_instruction(&mut self.fd);
                    let what = if suberror == 1 {
                        "an instruction its emulator cannot run"
                    } else {
                        "a guest state it cannot handle"
                    };
                    state.request_exit_with_report(
                        KVM_GAVE_UP,
                        format!("KVM internal error on vCPU {id} (suberror {suberror}): the guest reached {what}"),
                        Some(guest_report::report(id, &self.fd, insn.as_deref())),
                    )
                }
                Ok(VcpuExit::FailEntry(reason, cpu)) => state.request_exit_with_report(
                    KVM_GAVE_UP,
                    format!(
                        "KVM could not enter vCPU {id} (hardware reason {reason:#x}, cpu {cpu})"
                    ),
                    Some(guest_report::report(id, &self.fd, None)),
                ),
                Ok(VcpuExit::IrqWindowOpen) | Ok(VcpuExit::Intr) => {}
                Ok(other) => state.request_exit(
                    KVM_GAVE_UP,
                    format!("vCPU {} stopped on an unexpected KVM exit: {other:?}", id),
                ),
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {}
                Err(e) if e.errno() == libc::EFAULT => {
                    let run = self.fd.get_kvm_run();
                    if run.exit_reason == KVM_EXIT_MEMORY_FAULT {
                        // SAFETY: KVM set the exit reason to KVM_EXIT_MEMORY_FAULT, so the
                        // `memory_fault` union member is the one it filled in.
                        let gpa = unsafe { run.__bindgen_anon_1.memory_fault.gpa };
                        if in_hotplug(gpa) {
                            unplugged_access(gpa, "touched");
                        } else {
                            state.request_exit(KVM_GAVE_UP, format!("vCPU {} faulted on guest physical address {gpa:#x} (no host memory behind it)", id));
                        }
                    } else {
                        let hint = if window.is_some() {
                            ": most likely the guest touched unplugged hotplug memory"
                        } else {
                            ""
                        };
                        state.request_exit(
                            KVM_GAVE_UP,
                            format!("KVM_RUN failed with EFAULT on vCPU {}{hint}", id),
                        );
                    }
                }
                Err(e) => state.request_exit(
                    KVM_GAVE_UP,
                    format!("KVM_RUN failed on vCPU {}: {e}", id),
                ),
            }
        }
        if state.wants_vcpu_reports() {
            state.add_vcpu_report(id, guest_report::report(id, &self.fd, None));
        }
    }
}

/// Stops vCPU threads: they see the stop flag, and the kick signal gets them out of `KVM_RUN`.
pub fn stop_vcpus(handles: Vec<JoinHandle<()>>) {
    use std::os::unix::thread::JoinHandleExt;
    for h in handles {
        while !h.is_finished() {
            // SAFETY: the thread is alive (not finished and not joined), so its pthread_t is
            // valid; the kick signal has a handler installed that does nothing.
            unsafe { libc::pthread_kill(h.as_pthread_t(), kick_signal()) };
            std::thread::sleep(Duration::from_millis(2));
        }
        let _ = h.join();
    }
}
