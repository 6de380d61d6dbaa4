//! The documented API (the OpenAPI document and docs/api.md) against the server.

use super::*;

/// The (path, method) pairs of the OpenAPI document's `paths`.
fn documented_routes() -> Vec<(String, String)> {
    let doc = include_str!("../openapi.yaml");
    let paths = doc
        .split_once("\npaths:\n")
        .expect("openapi.yaml has paths")
        .1;
    let mut out = Vec::new();
    let mut path = None;
    for line in paths.lines() {
        if !line.starts_with(' ') && !line.is_empty() {
            break; // the next top-level key
        }
        if let Some(p) = line.strip_prefix("  /").and_then(|l| l.strip_suffix(':')) {
            path = Some(format!("/{p}"));
        } else if let Some(m) = line.strip_prefix("    ").and_then(|l| l.strip_suffix(':')) {
            if ["get", "put", "patch", "post", "delete"].contains(&m) {
                out.push((path.clone().unwrap(), m.to_uppercase()));
            }
        }
    }
    out.sort();
    out
}

/// The (path, method) pairs the server routes.
fn served_routes() -> Vec<(String, String)> {
    let mut served: Vec<(String, String)> = crate::api::routes::ROUTES
        .iter()
        .flat_map(|(p, allow)| allow.split(", ").map(|m| (p.to_string(), m.to_string())))
        .collect();
    served.sort();
    served
}

/// The (path, method) pairs of the endpoint table of docs/api.md: the first `METHOD /path` of
/// each row, without its query.
fn api_doc_routes() -> Vec<(String, String)> {
    let doc = include_str!("../../../../docs/api.md");
    let table = doc
        .split_once("\n## Endpoints\n")
        .expect("docs/api.md has an Endpoints section")
        .1;
    let mut out: Vec<(String, String)> = table
        .lines()
        .filter_map(|l| l.strip_prefix("| `"))
        .filter_map(|l| l.split_once('`'))
        .filter_map(|(req, _)| req.split_once(' '))
        .map(|(m, p)| {
            let path = p.split_once('?').map_or(p, |(p, _)| p);
            (path.to_string(), m.to_string())
        })
        .collect();
    out.sort();
    out.dedup();
    out
}

#[test]
fn api_doc_and_server_agree() {
    assert_eq!(api_doc_routes(), served_routes());
}

#[test]
fn openapi_document_and_server_agree() {
    let served = served_routes();
    assert_eq!(documented_routes(), served);
    // Every documented route is answered by the server, neither 404 for its path nor 405.
    let h = Harness::start(Mock::new(true));
    for (p, m) in documented_routes() {
        if (p.as_str(), m.as_str()) == ("/vm/shutdown", "PUT") {
            continue; // stops the harness's VM: vm_info_and_shutdown covers it
        }
        let body = if m == "PATCH" {
            r#"{"requested_size": 0}"#
        } else {
            ""
        };
        let a = send(&h.sock, &m, &p, body);
        let unrouted = a.status == 405 || a.body.contains("no such endpoint");
        assert!(!unrouted, "{m} {p}: {} {}", a.status, a.body);
    }
    // And a method the document does not list is 405.
    let a = send(&h.sock, "POST", "/version", "");
    assert_eq!(a.status, 405);
}

#[test]
fn firecracker_style_requests_and_errors() {
    let h = Harness::start(Mock::new(true));
    let a = send(
        &h.sock,
        "PATCH",
        "/hotplug/memory",
        r#"{"requested_size_mib": 512}"#,
    );
    assert_eq!(a.status, 204, "{}", a.body);
    assert_eq!(h.mock.requested(), 512 * MIB);
    for bad in [
        r#"{"requested_size": 0, "requested_size_mib": 0}"#,
        r#"{"requested_size_mib": 18446744073709551615}"#,
    ] {
        let a = send(&h.sock, "PATCH", "/hotplug/memory", bad);
        assert_eq!(a.status, 400, "{bad}");
        assert_eq!(a.json()["fault_message"], a.json()["error"]);
    }
    let a = get(&h.sock, "/version");
    assert_eq!(a.status, 200);
    assert_eq!(a.json()["tide_version"], env!("CARGO_PKG_VERSION"));
    let a = get(&h.sock, "/nope");
    assert_eq!(a.json()["fault_message"], a.json()["error"]);
}

#[test]
fn progress_rate_and_time_left() {
    use crate::api::progress::rate_and_time_left;
    let mut s = Mock::new(true).memory_status().unwrap();
    s.requested_size = 256 * MIB;
    s.plugged_size = 128 * MIB;
    // Measured from the state before the PATCH (0), not from the first status seen.
    assert_eq!(
        client::progress_line(0, &s),
        "[##########          ] 128/256 MiB"
    );
    let sec = Duration::from_secs(1);
    assert_eq!(rate_and_time_left(0, &s, sec), "  128 MiB/s, 1 s left");
    assert_eq!(rate_and_time_left(128 * MIB, &s, sec), "");
    s.plugged_size = 256 * MIB;
    assert_eq!(rate_and_time_left(0, &s, 2 * sec), "  128 MiB/s");
}
