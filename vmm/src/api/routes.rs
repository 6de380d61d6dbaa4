//! Routing and the handlers of the API's endpoints: what each request is answered, with no I/O
//! of its own (the server does the reading, writing and parking).

use std::time::{Duration, Instant};

use serde::Deserialize;

use super::http::{query_pairs, Request, Response};
use super::{ApiBackend, MemoryStatus};

/// Default long-poll timeout.
pub const DEFAULT_WAIT_MS: u64 = 30_000;
/// Largest long-poll timeout; larger values are clamped to it.
pub const MAX_WAIT_MS: u64 = 600_000;

/// Every endpoint and the methods it takes, as `Allow` lists them: the one list that routing,
/// 405 answers and the OpenAPI document's test (`openapi.yaml`) read.
pub(crate) const ROUTES: &[(&str, &str)] = &[
    ("/hotplug/memory", "GET, PATCH"),
    ("/vm", "GET, PATCH"),
    ("/snapshot/create", "PUT"),
    ("/vm/shutdown", "PUT"),
    ("/metrics", "GET"),
    ("/version", "GET"),
];

/// Body of `PATCH /hotplug/memory`: bytes, or Firecracker's MiB.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ResizeRequest {
    requested_size: Option<u64>,
    requested_size_mib: Option<u64>,
}

impl ResizeRequest {
    /// The requested size in bytes, or why the body does not give exactly one.
    fn bytes(&self) -> Result<u64, &'static str> {
        match (self.requested_size, self.requested_size_mib) {
            (Some(b), None) => Ok(b),
            (None, Some(mib)) => mib
                .checked_mul(1 << 20)
                .ok_or("invalid body: requested_size_mib is too large"),
            _ => Err(EXPECTED_BODY),
        }
    }
}

/// What a `PATCH /hotplug/memory` body must look like.
const EXPECTED_BODY: &str =
    "invalid body: expected {\"requested_size\": BYTES} or {\"requested_size_mib\": MIB}";

/// What a long poll waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum WaitFor {
    /// `GET /hotplug/memory?wait_for=plugged_size`: the device plugged the requested size.
    PluggedSize,
    /// `GET /hotplug/memory?wait_for=online`: that, and the guest reports all of it online.
    Online,
    /// `GET /vm?wait_for=guest_ready`: the guest's user space said it is ready.
    GuestReady,
}

/// What handling a request asks for.
pub(crate) enum Outcome {
    /// Send this.
    Answer(Response),
    /// Send this, then stop the VM.
    AnswerThenShutdown(Response),
    /// Park the connection as a long poll until the deadline.
    Wait(Instant, WaitFor),
}

pub(crate) fn settled(s: &MemoryStatus) -> bool {
    s.plugged_size == s.requested_size
}

/// Whether the guest's own view agrees: it reports online exactly the plugged size, which is
/// the requested size.
fn online_settled(s: &MemoryStatus) -> bool {
    settled(s) && s.guest_online_size == Some(s.plugged_size)
}

pub(crate) fn shutting_down() -> Response {
    Response::error(503, "the VM is shutting down")
}

pub(crate) fn no_hotplug() -> Response {
    Response::error(404, "this VM has no hotplug memory region")
}

/// The memory status as JSON: Tide's byte fields, and beside them the MiB fields Firecracker's
/// clients read (`total_size_mib`, `block_size_mib`, `plugged_size_mib`, `requested_size_mib`).
pub(crate) fn memory_json(s: &MemoryStatus) -> Option<serde_json::Map<String, serde_json::Value>> {
    match serde_json::to_value(s) {
        Ok(serde_json::Value::Object(mut map)) => {
            for (k, v) in [
                ("total_size_mib", s.region_size),
                ("block_size_mib", s.block_size),
                ("plugged_size_mib", s.plugged_size),
                ("requested_size_mib", s.requested_size),
            ] {
                map.insert(k.into(), (v >> 20).into());
            }
            Some(map)
        }
        _ => None,
    }
}

/// `value` (an object) with `"settled": is_settled` added.
fn with_settled(value: serde_json::Result<serde_json::Value>, is_settled: bool) -> Response {
    match value {
        Ok(serde_json::Value::Object(mut map)) => {
            map.insert("settled".into(), serde_json::Value::Bool(is_settled));
            Response::json(200, &map)
        }
        _ => Response::error(500, "cannot serialize the answer"),
    }
}

pub(crate) fn long_poll_answer(s: &MemoryStatus, is_settled: bool) -> Response {
    match memory_json(s) {
        Some(mut map) => {
            map.insert("settled".into(), serde_json::Value::Bool(is_settled));
            Response::json(200, &map)
        }
        _ => Response::error(500, "cannot serialize the status"),
    }
}

/// The answer of a long poll waiting for `what` if it is due now: what it waits for happened,
/// or `expired` (its deadline passed). `None`: keep waiting. Cheap: it reads the sizes only
/// (and may ask the guest for a fresh report, without waiting for it).
pub(crate) fn poll_answer(
    backend: &dyn ApiBackend,
    what: WaitFor,
    expired: bool,
) -> Option<Response> {
    if what == WaitFor::GuestReady {
        let info = backend.vm_info();
        return (info.guest_ready || expired)
            .then(|| with_settled(serde_json::to_value(&info), info.guest_ready));
    }
    let Some(s) = backend.memory_sizes() else {
        return Some(no_hotplug());
    };
    let done = |s: &MemoryStatus| match what {
        WaitFor::Online => online_settled(s),
        _ => settled(s),
    };
    // Once the device settled, the guest's report must be one scanned since the memory last
    // changed (asked for here when it is not).
    let current = |s: &MemoryStatus| {
        settled(s)
            && backend.resident_current()
            && (what != WaitFor::Online || backend.guest_report_current(s))
    };
    if current(&s) && done(&s) {
        // Read again: the resident reading may be newer than `s`.
        return Some(match backend.memory_sizes() {
            Some(s) => long_poll_answer(&s, done(&s)),
            None => no_hotplug(),
        });
    }
    expired.then(|| long_poll_answer(&s, false))
}

/// Routes and answers one request.
pub(crate) fn handle(backend: &dyn ApiBackend, req: &Request) -> Outcome {
    let m = req.method.as_str();
    let Some(&(path, allow)) = ROUTES.iter().find(|(p, _)| *p == req.path) else {
        let p = &req.path;
        return Outcome::Answer(Response::error(404, &format!("no such endpoint: {p}")));
    };
    if !allow.split(", ").any(|a| a == m) {
        return Outcome::Answer(Response::method_not_allowed(m, allow));
    }
    match (path, m) {
        ("/hotplug/memory", "GET") => get_memory(backend, req.query.as_deref()),
        ("/hotplug/memory", _) => Outcome::Answer(patch_memory(backend, &req.body)),
        ("/vm", "GET") => get_vm(backend, req.query.as_deref()),
        ("/vm", _) => Outcome::Answer(patch_vm(backend, &req.body)),
        ("/snapshot/create", _) => Outcome::Answer(put_snapshot(backend, &req.body)),
        ("/vm/shutdown", _) => Outcome::AnswerThenShutdown(Response::no_content()),
        ("/metrics", _) => Outcome::Answer(get_metrics(backend)),
        _ => Outcome::Answer(get_version()),
    }
}

/// The long-poll parameters of a query: what `wait_for` names (one of `allowed`, by its query
/// value) and `timeout_ms`; or the 400 answer.
fn wait_params(
    query: Option<&str>,
    allowed: &[(&str, WaitFor)],
) -> Result<(Option<WaitFor>, u64), Response> {
    let mut wait = None;
    let mut timeout_ms = DEFAULT_WAIT_MS;
    for (k, v) in query_pairs(query.unwrap_or("")) {
        match k {
            "wait_for" => match allowed.iter().find(|(name, _)| *name == v) {
                Some(&(_, w)) => wait = Some(w),
                None => {
                    let names: Vec<String> = allowed
                        .iter()
                        .map(|(n, _)| format!("wait_for={n}"))
                        .collect();
                    return Err(Response::error(
                        400,
                        &format!("wait_for={v}: only {} is supported", names.join(" or ")),
                    ));
                }
            },
            "timeout_ms" => match v.parse::<u64>() {
                Ok(n) => timeout_ms = n.min(MAX_WAIT_MS),
                Err(_) => {
                    return Err(Response::error(
                        400,
                        &format!("timeout_ms={v}: not a number of milliseconds"),
                    ))
                }
            },
            _ => {} // unknown parameters are ignored
        }
    }
    Ok((wait, timeout_ms))
}

/// Answers a long poll now if it is due (or its timeout is 0), or parks it.
fn start_wait(backend: &dyn ApiBackend, what: WaitFor, timeout_ms: u64) -> Outcome {
    match poll_answer(backend, what, timeout_ms == 0) {
        Some(answer) => Outcome::Answer(answer),
        None => Outcome::Wait(Instant::now() + Duration::from_millis(timeout_ms), what),
    }
}

fn get_memory(backend: &dyn ApiBackend, query: Option<&str>) -> Outcome {
    let allowed = [
        ("plugged_size", WaitFor::PluggedSize),
        ("online", WaitFor::Online),
    ];
    let (wait, timeout_ms) = match wait_params(query, &allowed) {
        Ok(p) => p,
        Err(answer) => return Outcome::Answer(answer),
    };
    let Some(status) = backend.memory_status() else {
        return Outcome::Answer(no_hotplug());
    };
    match wait {
        None => Outcome::Answer(match memory_json(&status) {
            Some(map) => Response::json(200, &map),
            None => Response::error(500, "cannot serialize the memory status"),
        }),
        Some(what) => start_wait(backend, what, timeout_ms),
    }
}

fn get_vm(backend: &dyn ApiBackend, query: Option<&str>) -> Outcome {
    match wait_params(query, &[("guest_ready", WaitFor::GuestReady)]) {
        Ok((None, _)) => Outcome::Answer(Response::json(200, &backend.vm_info())),
        Ok((Some(what), timeout_ms)) => start_wait(backend, what, timeout_ms),
        Err(answer) => Outcome::Answer(answer),
    }
}

/// Body of `PATCH /vm`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct VmStateRequest {
    state: String,
}

const VM_STATE_BODY: &str =
    "invalid body: expected {\"state\": \"Paused\"} or {\"state\": \"Resumed\"}";

/// Parses a JSON object body into `T`, or the 400 answer.
fn object_body<T: serde::de::DeserializeOwned>(body: &[u8], expected: &str) -> Result<T, Response> {
    if body.is_empty() {
        return Err(Response::error(
            400,
            &expected.replace("invalid body", "missing body"),
        ));
    }
    match serde_json::from_slice::<serde_json::Value>(body) {
        Ok(v @ serde_json::Value::Object(_)) => serde_json::from_value::<T>(v)
            .map_err(|e| Response::error(400, &format!("{expected}: {e}"))),
        Ok(_) => Err(Response::error(400, expected)),
        Err(e) => Err(Response::error(400, &format!("invalid body: {e}"))),
    }
}

/// `PATCH /vm {"state": "Paused" | "Resumed"}`.
fn patch_vm(backend: &dyn ApiBackend, body: &[u8]) -> Response {
    let req: VmStateRequest = match object_body(body, VM_STATE_BODY) {
        Ok(r) => r,
        Err(resp) => return resp,
    };
    let result = match req.state.as_str() {
        "Paused" => backend.pause(),
        "Resumed" => backend.resume(),
        _ => return Response::error(400, VM_STATE_BODY),
    };
    match result {
        Ok(()) => Response::no_content(),
        Err(e) => Response::error(400, &crate::error_chain(&*e)),
    }
}

/// Body of `PUT /snapshot/create`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SnapshotRequest {
    snapshot_path: std::path::PathBuf,
    mem_file_path: std::path::PathBuf,
}

const SNAPSHOT_BODY: &str =
    "invalid body: expected {\"snapshot_path\": PATH, \"mem_file_path\": PATH}";

/// `PUT /snapshot/create`.
fn put_snapshot(backend: &dyn ApiBackend, body: &[u8]) -> Response {
    let req: SnapshotRequest = match object_body(body, SNAPSHOT_BODY) {
        Ok(r) => r,
        Err(resp) => return resp,
    };
    if req.snapshot_path.as_os_str().is_empty() || req.mem_file_path.as_os_str().is_empty() {
        return Response::error(400, "snapshot_path and mem_file_path must not be empty");
    }
    match backend.snapshot(&req.snapshot_path, &req.mem_file_path) {
        Ok(info) => Response::json(200, &info),
        Err((code, msg)) => Response::error(code, &msg),
    }
}

/// `GET /version`: Tide's version, named as Firecracker names its own.
fn get_version() -> Response {
    Response::json(
        200,
        &serde_json::json!({ "tide_version": env!("CARGO_PKG_VERSION") }),
    )
}

fn get_metrics(backend: &dyn ApiBackend) -> Response {
    match backend.metrics() {
        Some(m) => Response::json(200, &m),
        None => no_hotplug(),
    }
}

fn patch_memory(backend: &dyn ApiBackend, body: &[u8]) -> Response {
    if body.is_empty() {
        return Response::error(400, &EXPECTED_BODY.replace("invalid body", "missing body"));
    }
    // Through a Value: serde would also take `[1]` for the struct.
    let req = match serde_json::from_slice::<serde_json::Value>(body) {
        Ok(v @ serde_json::Value::Object(_)) => serde_json::from_value::<ResizeRequest>(v),
        Ok(_) => return Response::error(400, EXPECTED_BODY),
        Err(e) => Err(e),
    };
    let req = match req {
        Ok(r) => r,
        Err(e) => return Response::error(400, &format!("invalid body: {e}")),
    };
    if backend.memory_sizes().is_none() {
        return no_hotplug();
    }
    let bytes = match req.bytes() {
        Ok(b) => b,
        Err(msg) => return Response::error(400, msg),
    };
    match backend.resize(bytes) {
        Ok(()) => Response::no_content(),
        Err(e) => Response::error(400, &crate::error_chain(&*e)),
    }
}
