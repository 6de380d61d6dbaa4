//! Runs a built [`Vmm`]: starts the event loop's subscribers, the virtio-mem worker and the vCPU
//! threads, waits for the VM to stop, then stops everything in order.

use std::io::IsTerminal;
use std::sync::Arc;
use std::time::{Duration, Instant};

use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use vmm_sys_util::terminal::Terminal;

use crate::api::{ApiBackend, MemoryStatus, VmInfo};
use crate::event_loop::{ConsoleInput, StopSources};
use crate::exit_status;
use crate::resident::ResidentSampler;
use crate::vcpu::{self, RunState, VmExit};
use crate::{Error, Result, Vmm};

/// Longest time the stop waits for API answers to be sent.
const API_DRAIN: Duration = Duration::from_millis(500);
/// Longest time the stop waits for buffered console output to be written.
const CONSOLE_DRAIN: Duration = Duration::from_millis(500);

/// What the API sees of a running VM.
struct Control {
    state: Arc<RunState>,
    mem: Option<(
        Arc<devices::virtio::mem::VirtioMemShared>,
        Arc<memory::HotplugRegion>,
        Arc<devices::virtio::mem::metrics::VirtioMemMetrics>,
    )>,
    /// Resident bytes of an anon region, read off the event loop (fd backends use `fstat`).
    sampler: Option<ResidentSampler>,
    vcpus: u8,
    boot_memory: u64,
}

impl Control {
    fn status(&self, refresh: bool) -> Option<MemoryStatus> {
        let (shared, region, _) = self.mem.as_ref()?;
        let (resident_bytes, resident_age) = match &self.sampler {
            Some(s) => s.current(refresh),
            // One fstat, now.
            None if region.resident_bytes_is_cheap() => {
                (region.resident_bytes().unwrap_or(0), Some(Duration::ZERO))
            }
            None => (0, None),
        };
        // One lock: the sizes are of one instant.
        let sizes = shared.status();
        Some(MemoryStatus {
            region_size: sizes.region_size,
            block_size: sizes.block_size,
            requested_size: sizes.requested_size,
            plugged_size: sizes.plugged_size,
            usable_region_size: sizes.usable_region_size,
            backend: region.backend().to_string(),
            resident_bytes,
            resident_age_ms: resident_age.map(|d| d.as_millis() as u64),
            ahead_bytes: region.ahead_bytes(),
        })
    }
}

impl ApiBackend for Control {
    fn memory_status(&self) -> Option<MemoryStatus> {
        self.status(true)
    }

    fn memory_sizes(&self) -> Option<MemoryStatus> {
        self.status(false)
    }

    fn resident_current(&self) -> bool {
        self.sampler
            .as_ref()
            .is_none_or(ResidentSampler::is_current)
    }

    fn metrics(&self) -> Option<serde_json::Value> {
        let (_, _, metrics) = self.mem.as_ref()?;
        let mut v = serde_json::to_value(metrics.snapshot()).ok()?;
        if let Some(o) = v.as_object_mut() {
            // What the rate limit and the log sink kept out of the log.
            let kinds: serde_json::Map<String, serde_json::Value> = devices::guest_log::counts()
                .into_iter()
                .map(|k| {
                    let v = serde_json::json!({"count": k.count, "logged": k.logged});
                    (k.kind.to_string(), v)
                })
                .collect();
            o.insert(
                "log".into(),
                serde_json::json!({
                    "dropped_lines": crate::logger::dropped(),
                    "guest_messages": kinds,
                }),
            );
        }
        Some(v)
    }

    fn resize(&self, requested_size: u64) -> std::result::Result<(), crate::api::BackendError> {
        match &self.mem {
            Some((shared, _, _)) => Ok(shared.set_requested_size(requested_size)?),
            None => Err("this VM has no hotplug region (start it with --hotplug-size)".into()),
        }
    }

    fn vm_info(&self) -> VmInfo {
        let exit = self.state.exit();
        VmInfo {
            state: if exit.is_some() { "stopped" } else { "running" }.into(),
            exit_code: exit.as_ref().map(|e| e.code),
            exit_reason: exit.map(|e| e.reason),
            vcpus: self.vcpus,
            boot_memory: self.boot_memory,
        }
    }

    fn shutdown(&self) {
        self.state.request_exit(0, "shut down through the API");
    }
}

/// Puts a terminal on stdin into raw mode for the guest's console and restores it on drop.
struct RawStdin(bool);

impl RawStdin {
    fn new() -> Self {
        let stdin = std::io::stdin();
        if !stdin.is_terminal() {
            return Self(false);
        }
        // For a second stop signal, which exits from the handler.
        crate::signals::save_terminal();
        Self(stdin.lock().set_raw_mode().is_ok())
    }
}

impl Drop for RawStdin {
    fn drop(&mut self) {
        if self.0 {
            let _ = std::io::stdin().lock().set_canon_mode();
        }
    }
}

impl Vmm {
    /// Runs the VM until the guest powers off or resets, a fault stops it, the API shuts it
    /// down or the timeout is reached. Returns why it stopped, with the exit status of
    /// [`crate::exit_status`].
    pub fn run(mut self) -> Result<VmExit> {
        vcpu::install_kick_handler()?;
        let mut em: EventManager<Box<dyn MutEventSubscriber + Send>> =
            EventManager::new().map_err(Error::EventManager)?;
        em.add_subscriber(Box::new(StopSources {
            i8042: self.i8042.clone(),
            state: self.state.clone(),
            signals: crate::signals::event(),
        }));
        let _raw = RawStdin::new();
        em.add_subscriber(Box::new(ConsoleInput::new(self.serial.clone())));

        let sampler = match &self.mem_device {
            Some(d) if !d.region().resident_bytes_is_cheap() => Some(
                ResidentSampler::start(d.region().clone(), Some(d.changed_evt()?))
                    .map_err(|e| Error::Io("cannot start the resident-memory thread", e))?,
            ),
            _ => None,
        };
        let control = Arc::new(Control {
            state: self.state.clone(),
            mem: self
                .mem_device
                .as_ref()
                .map(|d| (d.shared().clone(), d.region().clone(), d.metrics().clone())),
            sampler,
            vcpus: self.config.machine.cpus,
            boot_memory: self.config.machine.memory,
        });
        let mut api_stop = None;
        if let Some(path) = &self.config.api_socket {
            let mut server = crate::api::server::ApiServer::bind(path, control.clone())
                .map_err(|e| Error::ApiSocket(path.clone(), e))?;
            if let Some(dev) = &self.mem_device {
                server = server.with_wakeup(dev.changed_evt()?);
            }
            api_stop = Some(
                server
                    .stop_handle()
                    .map_err(|e| Error::Io("cannot create an event fd", e))?,
            );
            em.add_subscriber(Box::new(server));
        }
        if let Some(dev) = self.mem_device.as_mut() {
            dev.start()?;
        }

        let mut handles = Vec::with_capacity(self.vcpus.len());
        for v in std::mem::take(&mut self.vcpus) {
            match v.start() {
                Ok(h) => handles.push(h),
                Err(e) => {
                    self.state
                        .request_exit(exit_status::TIDE_ERROR, format!("{e}"));
                    break;
                }
            }
        }
        let deadline = self.config.timeout.map(|t| (t, Instant::now() + t));
        while !self.state.stopping() {
            let mut wait_ms = 200;
            if let Some((t, end)) = deadline {
                let left = end.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    self.state.request_exit_reporting_vcpus(
                        exit_status::TIMEOUT,
                        format!("--timeout {t:?} reached: the guest was stopped"),
                    );
                    break;
                }
                // Rounded up: never wakes before the deadline to spin.
                wait_ms = wait_ms.min(left.as_micros().div_ceil(1000) as i32);
            }
            if let Err(e) = em.run_with_timeout(wait_ms) {
                self.state
                    .request_exit(exit_status::TIDE_ERROR, format!("event loop failed: {e:?}"));
            }
        }
        // A PLUG being populated stops at its next slice: the stop never waits for it.
        if let Some(dev) = &self.mem_device {
            dev.region().stop_populates();
        }
        // Answer what the API still has pending (parked long polls get 503 "shutting down"),
        // bounded: a client that does not read cannot hold the stop.
        if let Some(h) = &api_stop {
            h.stop();
            let end = Instant::now() + API_DRAIN;
            loop {
                let _ = em.run_with_timeout(10);
                if h.open_connections() == 0 || Instant::now() >= end {
                    break;
                }
            }
        }
        vcpu::stop_vcpus(handles);
        let mut exit = self.state.exit().unwrap_or(VmExit {
            code: exit_status::SUCCESS,
            reason: "stopped".into(),
            report: None,
        });
        if let Some(vcpus) = self.state.take_vcpu_reports() {
            exit.report = Some(match exit.report.take() {
                Some(r) => format!("{r}\n{vcpus}"),
                None => vcpus,
            });
        }
        if let Some(dev) = self.mem_device.as_mut() {
            dev.stop();
            if let Some(failure) = dev.driver_failure() {
                if exit.code == exit_status::SUCCESS {
                    exit.reason = format!("{failure} (and then {})", exit.reason);
                    exit.code = exit_status::DRIVER_FAILED;
                } else {
                    log::warn!("{failure}");
                }
            }
        }
        // Guest output still buffered goes out if stdout takes it soon; never waits longer.
        if !self.console.drain(CONSOLE_DRAIN) {
            log::warn!("console: stdout is not being read; buffered guest output dropped");
        }
        if let Some(line) = devices::guest_log::summary() {
            log::warn!("{line}");
        }
        let dropped = self.console.dropped();
        if dropped > 0 {
            log::warn!("console: {dropped} bytes of guest output dropped (stdout was not read)");
        }
        Ok(exit)
    }
}
