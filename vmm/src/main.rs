//! `tide`: the command line. It only parses into a [`vmm::VmmConfig`] (or an API request) and
//! hands over; errors print as one line with their cause chain.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use vmm::config::{HotplugConfig, KernelConfig, MachineConfig, VmmConfig, DEFAULT_CMDLINE};
use vmm::exit_status::TIDE_ERROR;

/// Tide's own error as the process's exit status.
fn tide_error() -> ExitCode {
    ExitCode::from(TIDE_ERROR as u8)
}

/// Tide: a minimal KVM VMM whose guest memory grows and shrinks through virtio-mem.
#[derive(Parser, Debug)]
#[command(name = "tide", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Boot a guest and run it until it powers off or resets.
    #[command(after_help = vmm::exit_status::TABLE)]
    Run(RunArgs),
    /// Talk to a running tide over its API socket.
    Ctl(vmm::api::client::CtlArgs),
}

/// The one size parser of `tide run` and `tide ctl`.
use vmm::api::client::parse_size as size;

fn level(s: &str) -> Result<log::LevelFilter, String> {
    s.parse()
        .map_err(|_| format!("unknown log level {s:?} (error, warn, info, debug, trace, off)"))
}

#[derive(Args, Debug)]
struct RunArgs {
    /// Kernel: bzImage or ELF (vmlinux or a static ELF with a 64-bit entry).
    #[arg(long)]
    kernel: PathBuf,
    /// Initramfs to load.
    #[arg(long)]
    initrd: Option<PathBuf>,
    /// Kernel command line (Tide appends its virtio_mmio.device= parameters).
    #[arg(long, default_value = DEFAULT_CMDLINE)]
    cmdline: String,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=254))]
    cpus: u8,
    /// Boot RAM (suffixes K, M, G, T).
    #[arg(long, default_value = "512M", value_parser = size)]
    memory: u64,
    /// Size of the virtio-mem hotplug region (0: no virtio-mem device).
    #[arg(long, default_value = "0", value_parser = size)]
    hotplug_size: u64,
    /// virtio-mem block size (power of two, at least 2M; default 2M).
    #[arg(long, value_parser = size)]
    block_size: Option<u64>,
    /// Host backend of the hotplug region: anon (default), memfd, hugetlb or file:PATH.
    #[arg(long)]
    backend: Option<memory::Backend>,
    /// Initial requested size of the hotplug region (default 0).
    #[arg(long, value_parser = size)]
    requested: Option<u64>,
    /// Do not ask for transparent huge pages on the anon backend (4 KiB pages).
    #[arg(long)]
    no_thp: bool,
    /// Do not populate ahead the blocks the guest will plug (PLUG populates them).
    #[arg(long)]
    no_populate_ahead: bool,
    /// Serve the HTTP API on this UNIX socket.
    #[arg(long)]
    api_socket: Option<PathBuf>,
    /// Log level: error, warn, info, debug.
    #[arg(long, default_value = "warn", value_parser = level)]
    log_level: log::LevelFilter,
    /// Run this shell command in the project's guest (resources/build-guest.sh; its /init reads
    /// tide.exec=), stream its output, power off and exit with its status.
    #[arg(long, value_name = "CMD")]
    exec: Option<String>,
    /// Stop the guest after this long (90s, 5m, 1h; plain number: seconds), print where its vCPUs
    /// were and exit with 124.
    #[arg(long, value_name = "DURATION", value_parser = vmm::config::parse_duration)]
    timeout: Option<std::time::Duration>,
}

/// Longest time the exit waits for the log sink to write what it holds (a stderr nobody reads
/// must not hold the exit).
const LOG_DRAIN: Duration = Duration::from_millis(250);

/// Lets the log sink write its last lines (bounded by [`LOG_DRAIN`]), then exits with `code`.
fn finish(code: ExitCode) -> ExitCode {
    vmm::logger::drain(LOG_DRAIN);
    code
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(
                e.kind(),
                ErrorKind::DisplayHelp
                    | ErrorKind::DisplayVersion
                    | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
            ) {
                let _ = e.print();
                return ExitCode::SUCCESS;
            }
            let text = e.to_string();
            let line = text.lines().next().unwrap_or("invalid arguments");
            let _ = writeln!(
                std::io::stderr(),
                "tide: {}",
                line.trim_start_matches("error: ").trim()
            );
            return tide_error();
        }
    };
    match cli.command {
        Command::Run(a) => {
            // Every line to stderr from here on goes through the log sink, which never blocks.
            if let Err(e) = vmm::logger::init(a.log_level) {
                let _ = writeln!(std::io::stderr(), "tide: error: cannot start logging: {e}");
                return tide_error();
            }
            if a.hotplug_size == 0 {
                let unused = [
                    ("--requested", a.requested.is_some()),
                    ("--block-size", a.block_size.is_some()),
                    ("--backend", a.backend.is_some()),
                    ("--no-thp", a.no_thp),
                ];
                if let Some((opt, _)) = unused.iter().find(|(_, given)| *given) {
                    vmm::logger::line(&format!(
                        "tide: {opt} has no effect without a hotplug region (--hotplug-size)"
                    ));
                    return finish(tide_error());
                }
            }
            let mut cmdline = a.cmdline;
            if let Some(cmd) = &a.exec {
                if cmd.trim().is_empty() {
                    vmm::logger::line("tide: --exec needs a command");
                    return finish(tide_error());
                }
                cmdline.push(' ');
                cmdline.push_str(&vmm::config::exec_param(cmd));
            }
            // SIGTERM, SIGINT and SIGHUP stop the VM like PUT /vm/shutdown from here on.
            if let Err(e) = vmm::signals::install() {
                vmm::logger::line(&format!("tide: error: cannot install signal handlers: {e}"));
                return finish(tide_error());
            }
            let config = VmmConfig {
                kernel: KernelConfig {
                    path: a.kernel,
                    initrd: a.initrd,
                    cmdline,
                },
                machine: MachineConfig {
                    cpus: a.cpus,
                    memory: a.memory,
                },
                hotplug: HotplugConfig {
                    size: a.hotplug_size,
                    block_size: a.block_size.unwrap_or(memory::DEFAULT_BLOCK_SIZE),
                    backend: a.backend.unwrap_or(memory::Backend::Anon),
                    requested: a.requested.unwrap_or(0),
                    thp: !a.no_thp,
                    populate_ahead: !a.no_populate_ahead,
                },
                api_socket: a.api_socket,
                timeout: a.timeout,
            };
            let code = match vmm::Vmm::new(config).and_then(|v| v.run()) {
                Ok(exit) => {
                    log::info!("{}", exit.reason);
                    if exit.code != 0 {
                        vmm::logger::line(&format!("tide: {}", exit.reason));
                    }
                    if let Some(report) = &exit.report {
                        for l in report.lines() {
                            vmm::logger::line(l);
                        }
                    }
                    ExitCode::from(exit.code.clamp(0, 255) as u8)
                }
                Err(e) => {
                    vmm::logger::line(&format!("tide: error: {}", vmm::error_chain(&e)));
                    tide_error()
                }
            };
            finish(code)
        }
        Command::Ctl(a) => match vmm::api::client::run(a) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                let _ = writeln!(
                    std::io::stderr(),
                    "tide ctl: error: {}",
                    vmm::error_chain(&e)
                );
                ExitCode::FAILURE
            }
        },
    }
}
