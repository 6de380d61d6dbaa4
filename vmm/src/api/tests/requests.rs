//! Requests and their answers: status, resize, routing, malformed input, many clients.

use super::*;

#[test]
fn get_memory_status() {
    let h = Harness::start(Mock::new(true));
    let a = get(&h.sock, "/hotplug/memory");
    assert_eq!(a.status, 200);
    let s: MemoryStatus = serde_json::from_str(&a.body).unwrap();
    assert_eq!(s.region_size, 4 * GIB);
    assert_eq!(s.backend, "anonymous");
    assert!(a.json().get("settled").is_none());
}

#[test]
fn no_hotplug_region_is_404() {
    let h = Harness::start(Mock::new(false));
    let a = get(&h.sock, "/hotplug/memory");
    assert_eq!(a.status, 404);
    assert!(a.error().contains("no hotplug"));
    assert_eq!(
        send(
            &h.sock,
            "PATCH",
            "/hotplug/memory",
            r#"{"requested_size":0}"#
        )
        .status,
        404
    );
    assert_eq!(
        get(&h.sock, "/hotplug/memory?wait_for=plugged_size").status,
        404
    );
}

#[test]
fn patch_memory() {
    let h = Harness::start(Mock::new(true));
    let a = send(
        &h.sock,
        "PATCH",
        "/hotplug/memory",
        r#"{"requested_size": 1073741824}"#,
    );
    assert_eq!(a.status, 204, "{}", a.body);
    assert_eq!(h.mock.requested(), GIB);

    for bad in [
        "",
        "{",
        "{}",
        r#"{"requested_size": "1G"}"#,
        r#"{"requested_size": 1.5}"#,
        r#"{"requested_size": -1}"#,
        r#"{"requested_size": 1, "other": 2}"#,
        "[1]",
    ] {
        let a = send(&h.sock, "PATCH", "/hotplug/memory", bad);
        assert_eq!(a.status, 400, "{bad}: {}", a.body);
        assert!(!a.error().is_empty());
    }
    // No Content-Length: an empty body.
    let a = raw(&h.sock, b"PATCH /hotplug/memory HTTP/1.1\r\n\r\n");
    assert_eq!(a.status, 400);
    assert!(a.error().contains("missing body"));

    // Backend refusals are 400 with the backend's message.
    let a = send(
        &h.sock,
        "PATCH",
        "/hotplug/memory",
        r#"{"requested_size": 8589934592}"#,
    );
    assert_eq!(
        (a.status, a.error().as_str()),
        (400, "requested size beyond the region")
    );
    *h.mock.fail.lock().unwrap() = Some("guest not ready".into());
    let a = send(
        &h.sock,
        "PATCH",
        "/hotplug/memory",
        r#"{"requested_size": 0}"#,
    );
    assert_eq!((a.status, a.error().as_str()), (400, "guest not ready"));
    assert_eq!(h.mock.requested(), GIB);
}

#[test]
fn vm_info_and_shutdown() {
    let h = Harness::start(Mock::new(true));
    let a = get(&h.sock, "/vm");
    assert_eq!(a.status, 200);
    let v: VmInfo = serde_json::from_str(&a.body).unwrap();
    assert_eq!(v, h.mock.vm_info());
    assert_eq!(h.mock.shutdowns.load(Ordering::SeqCst), 0);
    let a = raw(
        &h.sock,
        b"PUT /vm/shutdown HTTP/1.1\r\nHost: localhost\r\n\r\n",
    );
    assert_eq!(a.status, 204);
    assert_eq!(h.mock.shutdowns.load(Ordering::SeqCst), 1);
}

#[test]
fn routing_errors() {
    let h = Harness::start(Mock::new(true));
    for p in ["/", "/nope", "/vm/", "/hotplug", "/hotplug/memory/x"] {
        let a = get(&h.sock, p);
        assert_eq!(a.status, 404, "{p}");
        assert!(a.error().contains("no such endpoint"));
    }
    for (m, p, allow) in [
        ("POST", "/vm", "GET"),
        ("DELETE", "/hotplug/memory", "GET, PATCH"),
        ("PUT", "/hotplug/memory", "GET, PATCH"),
        ("GET", "/vm/shutdown", "PUT"),
    ] {
        let a = send(&h.sock, m, p, "");
        assert_eq!(a.status, 405, "{m} {p}");
        assert!(
            a.head.contains(&format!("Allow: {allow}\r\n")),
            "{}",
            a.head
        );
        assert!(a.error().contains(m));
    }
    assert_eq!(h.mock.shutdowns.load(Ordering::SeqCst), 0);
}

#[test]
fn malformed_and_oversized_requests() {
    let h = Harness::start(Mock::new(true));
    for bad in [
        &b"GARBAGE\r\n\r\n"[..],
        b"GET /vm HTTP/7.0\r\n\r\n",
        b"GET /vm\r\n\r\n",
        b"GET /vm HTTP/1.1\r\nBad Header\r\n\r\n",
        b"PATCH /hotplug/memory HTTP/1.1\r\nContent-Length: -3\r\n\r\n",
        b"\x00\x01\x02\r\n\r\n",
    ] {
        let a = raw(&h.sock, bad);
        assert_eq!(a.status, 400, "{:?}", String::from_utf8_lossy(bad));
        assert!(!a.error().is_empty());
    }
    // Header section over 8 KiB, complete or not.
    let mut big = b"GET /vm HTTP/1.1\r\nX-Filler: ".to_vec();
    big.extend(std::iter::repeat_n(b'x', 9 * 1024));
    assert_eq!(raw(&h.sock, &big).status, 431);
    big.extend_from_slice(b"\r\n\r\n");
    assert_eq!(raw(&h.sock, &big).status, 431);
    // Body over 64 KiB.
    let body = "x".repeat(70 * 1024);
    let a = send(&h.sock, "PATCH", "/hotplug/memory", &body);
    assert_eq!(a.status, 413);
    assert!(a.error().contains("body"));
    // Chunked bodies are refused.
    let a = raw(
        &h.sock,
        b"PATCH /hotplug/memory HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    );
    assert_eq!(a.status, 411);
    // The server is still fine.
    assert_eq!(get(&h.sock, "/vm").status, 200);
}

#[test]
fn request_split_in_small_pieces() {
    let h = Harness::start(Mock::new(true));
    let req =
        b"PATCH /hotplug/memory HTTP/1.1\r\nContent-Length: 26\r\n\r\n{\"requested_size\":2097152}";
    let mut s = connect(&h.sock);
    for piece in req.chunks(7) {
        s.write_all(piece).unwrap();
        std::thread::sleep(Duration::from_millis(2));
    }
    assert_eq!(read_answer(&mut s).status, 204);
    assert_eq!(h.mock.requested(), 2 * MIB);
}

#[test]
fn concurrent_clients() {
    let h = Harness::start(Mock::new(true));
    let mut a = connect(&h.sock);
    a.write_all(b"GET /vm HTTP/1.1\r\nHost: loc").unwrap();
    let mut b = connect(&h.sock);
    b.write_all(b"GET /hotplug/memory HTTP/1.1\r\n\r\n")
        .unwrap();
    assert_eq!(read_answer(&mut b).status, 200);
    a.write_all(b"alhost\r\n\r\n").unwrap();
    let ans = read_answer(&mut a);
    assert_eq!(ans.status, 200);
    assert!(ans.body.contains("running"));

    // Many at once from threads.
    let threads: Vec<_> = (0..8)
        .map(|i| {
            let sock = h.sock.clone();
            std::thread::spawn(move || {
                let path = if i % 2 == 0 { "/vm" } else { "/hotplug/memory" };
                get(&sock, path).status
            })
        })
        .collect();
    for t in threads {
        assert_eq!(t.join().unwrap(), 200);
    }
}

#[test]
fn client_that_disconnects_mid_request() {
    let h = Harness::start(Mock::new(true));
    {
        let mut s = connect(&h.sock);
        s.write_all(b"PATCH /hotplug/memory HTTP/1.1\r\nContent-Length: 30\r\n\r\n{\"req")
            .unwrap();
        let mut s2 = connect(&h.sock);
        s2.write_all(b"GET /v").unwrap();
    }
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(get(&h.sock, "/vm").status, 200);
    assert_eq!(h.mock.requested(), 0);
}

#[test]
fn connection_limit() {
    let h = Harness::start(Mock::new(true));
    let idle: Vec<UnixStream> = (0..MAX_CONNECTIONS).map(|_| connect(&h.sock)).collect();
    let mut extra = connect(&h.sock);
    let a = read_answer(&mut extra);
    assert_eq!(a.status, 503);
    drop(idle);
    // Slots free up once the server sees the hang-ups.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let a = get(&h.sock, "/vm");
        if a.status == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "connections not released");
        std::thread::sleep(Duration::from_millis(20));
    }
}
