//! Running `tide` (through the tests' launcher) and talking to its API.

use super::*;

/// `target/release/tide` beside this program, (re)built first so that the figures are those of
/// the current source (a no-op when it is up to date).
pub(crate) fn tide_path() -> PathBuf {
    let exe = std::env::current_exe().expect("own executable path");
    let dir = exe.parent().expect("target dir").to_path_buf();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    println!("building tide: cargo build --release -p vmm --bin tide");
    let st = Command::new(cargo)
        .current_dir(root)
        .args(["build", "--release", "-p", "vmm", "--bin", "tide"])
        .status()
        .expect("run cargo build for tide");
    assert!(st.success(), "cannot build tide");
    let bin = dir.join("tide");
    let built = root.join("target/release/tide");
    if !bin.exists() && built.exists() {
        return built;
    }
    bin
}

/// A running `tide` (the tests' launcher) and its API socket, if any; killed on drop.
pub(crate) struct Vmm {
    pub(crate) tide: Tide,
    pub(crate) sock: Option<PathBuf>,
}

impl Vmm {
    /// `tide run --kernel <test guest> --cmdline <cmdline> <extra>`.
    pub(crate) fn start(
        tide: &Path,
        cmdline: &str,
        extra: &[&str],
        sock: Option<&Path>,
    ) -> Res<Vmm> {
        let mut args: Vec<String> = vec![
            "run".into(),
            "--kernel".into(),
            test_guest().display().to_string(),
            "--cmdline".into(),
            cmdline.into(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        if let Some(s) = sock {
            args.push("--api-socket".into());
            args.push(s.display().to_string());
        }
        let tide = Tide::try_spawn(tide, &args, false)
            .map_err(|e| format!("spawn {}: {e}", tide.display()))?;
        Ok(Vmm {
            tide,
            sock: sock.map(Path::to_path_buf),
        })
    }

    pub(crate) fn stderr(&self) -> String {
        self.tide.stderr()
    }

    pub(crate) fn pid(&self) -> u32 {
        self.tide.pid()
    }

    /// When `tide` was started, and when its first console byte came.
    pub(crate) fn first_output(&self) -> (Instant, Option<Instant>) {
        (self.tide.started, self.tide.first_output())
    }

    /// Waits until `cond` holds; fails when tide exits first or on timeout.
    pub(crate) fn wait_until(
        &mut self,
        what: &str,
        timeout: Duration,
        cond: impl Fn(&Tide) -> bool,
    ) -> Res<()> {
        self.tide.try_wait_until(what, timeout, cond)
    }

    pub(crate) fn wait_out(&mut self, needle: &str, timeout: Duration) -> Res<()> {
        self.wait_until(&format!("{needle:?} on the console"), timeout, |t| {
            t.stdout().contains(needle)
        })
    }

    pub(crate) fn wait_err(&mut self, needle: &str, timeout: Duration) -> Res<()> {
        self.wait_until(&format!("{needle:?} on stderr"), timeout, |t| {
            t.stderr().contains(needle)
        })
    }

    /// Starts the mem-follow guest with an API socket and waits for its virtio-mem driver.
    pub(crate) fn start_follow(tide: &Path, sock: &Path, kind: Kind, hotplug: &str) -> Res<Vmm> {
        Self::start_follow_with(tide, sock, kind, hotplug, FOLLOW, &[])
    }

    /// [`Vmm::start_follow`] with another guest command line and more `tide` arguments.
    pub(crate) fn start_follow_with(
        tide: &Path,
        sock: &Path,
        kind: Kind,
        hotplug: &str,
        cmdline: &str,
        more: &[&str],
    ) -> Res<Vmm> {
        let mut extra = vec![
            "--memory",
            "512M",
            "--hotplug-size",
            hotplug,
            "--block-size",
            "2M",
            "--requested",
            START_REQUESTED,
            "--log-level",
            "info",
        ];
        extra.extend_from_slice(kind.tide_args());
        extra.extend_from_slice(more);
        let mut v = Vmm::start(tide, cmdline, &extra, Some(sock))?;
        v.wait_until("the API socket", LONG, |_| sock.exists())?;
        v.wait_out("virtio-mem: usable", LONG)?;
        // Back to nothing plugged before anything is measured.
        settle(sock, START_REQUESTED_BYTES)?;
        patch(sock, 0)?;
        settle(sock, 0)?;
        std::thread::sleep(Duration::from_millis(100));
        Ok(v)
    }

    /// Asks for a clean shutdown (through the API socket if any), then kills.
    pub(crate) fn stop(mut self) {
        if let Some(s) = &self.sock {
            let _ = api(s, "PUT", "/vm/shutdown", None);
            let end = Instant::now() + Duration::from_secs(10);
            while Instant::now() < end {
                if self.tide.exited().is_some() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        // Drop kills it.
    }
}

/// One request on the API socket; (status, body), or an error instead of a panic.
pub(crate) fn api(sock: &Path, method: &str, path: &str, body: Option<&str>) -> Res<(u16, String)> {
    try_http(sock, method, path, body)
}

pub(crate) fn get_mem(sock: &Path) -> Res<Value> {
    let (code, body) = api(sock, "GET", "/hotplug/memory", None)?;
    if code != 200 {
        return Err(format!("GET /hotplug/memory: {code} {body}"));
    }
    serde_json::from_str(&body).map_err(|e| format!("GET /hotplug/memory: {e}: {body}"))
}

pub(crate) fn patch(sock: &Path, bytes: u64) -> Res<()> {
    let body = format!("{{\"requested_size\": {bytes}}}");
    let (code, resp) = api(sock, "PATCH", "/hotplug/memory", Some(&body))?;
    if code != 204 {
        return Err(format!("PATCH requested_size {bytes}: {code} {resp}"));
    }
    Ok(())
}

/// The long poll until `plugged_size == requested_size`; the answer, which must be settled at
/// `bytes`.
pub(crate) fn settle(sock: &Path, bytes: u64) -> Res<Value> {
    let (code, body) = api(
        sock,
        "GET",
        "/hotplug/memory?wait_for=plugged_size&timeout_ms=600000",
        None,
    )?;
    if code == 0 && body.is_empty() {
        let now = get_mem(sock).map(|v| v.to_string()).unwrap_or_else(|e| e);
        return Err(format!(
            "long poll for plugged_size {bytes}: no answer within the 60 s read timeout; now {now}"
        ));
    }
    let v: Value = serde_json::from_str(&body).map_err(|e| format!("long poll: {e}: {body}"))?;
    if code != 200 || v["settled"] != true || v["plugged_size"].as_u64() != Some(bytes) {
        return Err(format!(
            "long poll did not settle at {bytes}: {code} {body}"
        ));
    }
    Ok(v)
}

/// [`settle`] for a guest that may take longer than one read timeout (Linux's driver on an
/// emulating KVM takes minutes to unplug 1 GiB): long polls of 50 s until `limit` has passed.
pub(crate) fn settle_within(sock: &Path, bytes: u64, limit: std::time::Duration) -> Res<Value> {
    let start = std::time::Instant::now();
    loop {
        let (code, body) = api(
            sock,
            "GET",
            "/hotplug/memory?wait_for=plugged_size&timeout_ms=50000",
            None,
        )?;
        let v: Value =
            serde_json::from_str(&body).map_err(|e| format!("long poll: {e}: {body}"))?;
        if code == 200 && v["settled"] == true && v["plugged_size"].as_u64() == Some(bytes) {
            return Ok(v);
        }
        if start.elapsed() >= limit {
            return Err(format!(
                "plugged_size did not settle at {bytes} within {} s: {code} {body}",
                limit.as_secs()
            ));
        }
    }
}

pub(crate) fn u(v: &Value, key: &str) -> u64 {
    v[key].as_u64().unwrap_or(0)
}

pub(crate) fn meminfo_kib(key: &str) -> Option<u64> {
    let s = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = s.lines().find(|l| l.starts_with(key))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// MemAvailable in bytes: the median of three reads 20 ms apart.
pub(crate) fn mem_available() -> u64 {
    let mut v: Vec<u64> = (0..3)
        .map(|i| {
            if i > 0 {
                std::thread::sleep(Duration::from_millis(20));
            }
            meminfo_kib("MemAvailable:").unwrap_or(0) * 1024
        })
        .collect();
    v.sort_unstable();
    v[1]
}
