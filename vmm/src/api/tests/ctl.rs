//! The socket file, and `tide ctl`, the client.

use super::*;

#[test]
fn socket_file_handling() {
    let dir = temp_dir();
    let sock = sock_in(&dir);
    let mock: Arc<dyn ApiBackend> = Mock::new(true);

    // Stale: a socket file nobody listens on is replaced.
    drop(UnixListener::bind(&sock).unwrap());
    assert!(sock.exists());
    let server = ApiServer::bind(&sock, mock.clone()).unwrap();
    assert_eq!(
        std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777,
        0o600
    );

    // In use: refused, and the file is left alone.
    match ApiServer::bind(&sock, mock.clone()) {
        Err(ApiError::InUse(p)) => assert_eq!(p, sock),
        other => panic!("expected InUse, got {other:?}"),
    }
    assert!(sock.exists());

    // Drop removes the file.
    drop(server);
    assert!(!sock.exists());

    // Not a socket: refused, the file is kept.
    std::fs::write(&sock, b"data").unwrap();
    assert!(matches!(
        ApiServer::bind(&sock, mock.clone()),
        Err(ApiError::NotASocket(_))
    ));
    assert_eq!(std::fs::read(&sock).unwrap(), b"data");

    // A missing directory is a bind error.
    let missing = dir.as_path().join("no/such/dir/api.sock");
    assert!(matches!(
        ApiServer::bind(&missing, mock),
        Err(ApiError::Bind(..))
    ));
}

#[test]
fn client_status_info_and_shutdown() {
    let h = Harness::start(Mock::new(true));
    let table = client::status(&h.sock, false).unwrap();
    assert!(table.contains("region      4 GiB"), "{table}");
    assert!(table.contains("block size  2 MiB"), "{table}");
    assert!(table.contains("resident    1.5 MiB"), "{table}");
    assert!(table.contains("backend     anonymous"), "{table}");
    let json = client::status(&h.sock, true).unwrap();
    let s: MemoryStatus = serde_json::from_str(&json).unwrap();
    assert_eq!(s.region_size, 4 * GIB);
    let info = client::info(&h.sock, false).unwrap();
    assert!(
        info.contains("state       running") && info.contains("boot memory 1 GiB"),
        "{info}"
    );

    let args = CtlArgs {
        api_socket: h.sock.clone(),
        cmd: CtlCommand::Shutdown,
    };
    client::run(args).unwrap();
    assert_eq!(h.mock.shutdowns.load(Ordering::SeqCst), 1);

    let none = Harness::start(Mock::new(false));
    match client::status(&none.sock, false) {
        Err(CtlError::Status {
            status: 404,
            message,
            ..
        }) => assert!(message.contains("no hotplug"), "{message}"),
        other => panic!("expected a 404, got {other:?}"),
    }
    let nothing = h._dir.as_path().join("nothing.sock");
    let err = client::status(&nothing, false).unwrap_err();
    match &err {
        CtlError::Connect(p, e) => assert_eq!((p, e.kind()), (&nothing, ErrorKind::NotFound)),
        other => panic!("expected a connect error, got {other:?}"),
    }
    // What `tide ctl` prints: what failed, where, and why.
    assert_eq!(
        crate::error_chain(&err),
        format!(
            "cannot connect to the API socket {}: No such file or directory (os error 2)",
            nothing.display()
        )
    );
}

#[test]
fn client_resize() {
    let h = Harness::start(Mock::new(true));
    let mut seen = Vec::new();
    client::resize(&h.sock, 512 * MIB, None, &mut |s| seen.push(s.clone())).unwrap();
    assert_eq!(h.mock.requested(), 512 * MIB);
    assert!(seen.is_empty());

    // --wait, reached.
    h.mock.step.store((64 * MIB) as usize, Ordering::SeqCst);
    let r = client::resize(&h.sock, GIB, Some(Duration::from_secs(10)), &mut |s| {
        seen.push(s.clone())
    });
    r.unwrap();
    assert_eq!(seen.last().map(|s| s.plugged_size), Some(GIB));

    // --wait, timed out.
    h.mock.step.store(0, Ordering::SeqCst);
    let t = Instant::now();
    let r = client::resize(
        &h.sock,
        2 * GIB,
        Some(Duration::from_millis(700)),
        &mut |_| {},
    );
    match r {
        Err(CtlError::WaitTimedOut { after, last }) => {
            assert_eq!(after, Duration::from_millis(700));
            assert_eq!((last.plugged_size, last.requested_size), (GIB, 2 * GIB));
        }
        other => panic!("expected a timeout, got {other:?}"),
    }
    assert!(t.elapsed() >= Duration::from_millis(700) && t.elapsed() < Duration::from_secs(3));
    let args = CtlArgs {
        api_socket: h.sock.clone(),
        cmd: CtlCommand::Resize {
            size: 3 * GIB,
            wait: true,
            timeout: Some(0),
        },
    };
    let err = client::run(args).unwrap_err();
    assert!(matches!(err, CtlError::WaitTimedOut { .. }), "{err:?}");
    assert_eq!(
        err.to_string(),
        "timed out after 0 s: the guest has plugged 1 GiB of 3 GiB"
    );

    // Backend error: the server's message is what the user reads.
    let err = client::resize(&h.sock, 8 * GIB, None, &mut |_| {}).unwrap_err();
    assert!(
        matches!(&err, CtlError::Status { status: 400, message, .. } if message.contains("beyond the region")),
        "{err:?}"
    );
    assert_eq!(
        crate::error_chain(&err),
        "PATCH /hotplug/memory: 400 Bad Request: requested size beyond the region"
    );
}

#[test]
fn client_helpers() {
    use client::{fmt_bytes, parse_size};
    assert_eq!(parse_size("0"), Ok(0));
    assert_eq!(parse_size("4096"), Ok(4096));
    assert_eq!(parse_size("512M"), Ok(512 * MIB));
    assert_eq!(parse_size("1G"), Ok(GIB));
    assert_eq!(parse_size("1g"), Ok(GIB));
    assert_eq!(parse_size("2GiB"), Ok(2 * GIB));
    assert_eq!(parse_size("3 MB"), Ok(3 * MIB));
    assert_eq!(parse_size("1T"), Ok(1 << 40));
    assert_eq!(parse_size("8K"), Ok(8192));
    for bad in ["", "M", "1.5G", "1X", "-1", "99999999999T", "1 G B"] {
        assert!(parse_size(bad).is_err(), "{bad}");
    }
    assert_eq!(fmt_bytes(0), "0 B");
    assert_eq!(fmt_bytes(1023), "1023 B");
    assert_eq!(fmt_bytes(512 * MIB), "512 MiB");
    assert_eq!(fmt_bytes(3 * GIB / 2), "1.5 GiB");
    assert_eq!(fmt_bytes(4 * GIB), "4 GiB");

    let mut s = Mock::new(true).memory_status().unwrap();
    s.requested_size = GIB;
    s.plugged_size = 512 * MIB;
    assert_eq!(
        client::progress_line(0, &s),
        "[##########          ] 512/1024 MiB"
    );
    // A shrink counts what it has unplugged, and ends on the whole change, not on 0/0.
    s.requested_size = 0;
    assert_eq!(
        client::progress_line(GIB, &s),
        "[##########          ] 512/1024 MiB"
    );
    s.plugged_size = 0;
    assert_eq!(
        client::progress_line(GIB, &s),
        "[####################] 1024/1024 MiB"
    );
    // A growth from a plugged size counts from there.
    s.requested_size = 640 * MIB;
    s.plugged_size = 384 * MIB;
    assert_eq!(
        client::progress_line(128 * MIB, &s),
        "[##########          ] 256/512 MiB"
    );
    // Nothing to change: done at once.
    s.plugged_size = 640 * MIB;
    assert_eq!(
        client::progress_line(640 * MIB, &s),
        "[####################] 0/0 MiB"
    );

    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        ctl: CtlArgs,
    }
    let cli = <Cli as clap::Parser>::try_parse_from([
        "tide",
        "--api-socket",
        "/x.sock",
        "resize",
        "1G",
        "--wait",
    ])
    .unwrap();
    assert_eq!(cli.ctl.api_socket, PathBuf::from("/x.sock"));
    match cli.ctl.cmd {
        CtlCommand::Resize {
            size,
            wait,
            timeout,
        } => assert_eq!((size, wait, timeout), (GIB, true, None)),
        other => panic!("{other:?}"),
    }
    assert!(
        <Cli as clap::Parser>::try_parse_from(["tide", "--api-socket", "s", "resize", "1Q"])
            .is_err()
    );
    let cli =
        <Cli as clap::Parser>::try_parse_from(["tide", "--api-socket", "s", "status", "--json"])
            .unwrap();
    assert!(matches!(cli.ctl.cmd, CtlCommand::Status { json: true }));
}

/// Once, `resize --wait --timeout 18446744073709551615` panicked (Instant
/// overflow); `resize 1P` was refused while `tide run --hotplug-size 1P` was accepted.
#[test]
fn client_takes_any_timeout_and_the_run_size_syntax() {
    let h = Harness::start(Mock::new(true));
    h.mock.step.store(usize::MAX, Ordering::SeqCst);
    let forever = Duration::from_secs(u64::MAX);
    client::resize(&h.sock, 2 * MIB, Some(forever), &mut |_| {}).unwrap();
    for s in ["1P", "2MiB", "3 GB", "16383P"] {
        assert_eq!(
            client::parse_size(s),
            memory::parse_size(s).map_err(|e| e.to_string())
        );
    }
    assert_eq!(client::parse_size("1P"), Ok(1 << 50));
}

/// Once, a 503 was reported as "Broken pipe" when the server answered before
/// reading the request and closed.
#[test]
fn client_shows_a_503_as_the_servers_message() {
    let h = Harness::start(Mock::new(true));
    let _idle: Vec<UnixStream> = (0..MAX_CONNECTIONS).map(|_| connect(&h.sock)).collect();
    // A body large enough that the write is still going on when the server closes.
    let body = format!(
        r#"{{"requested_size": 0, "pad": "{}"}}"#,
        "x".repeat(60 << 10)
    );
    for _ in 0..5 {
        let err = client::call(
            &h.sock,
            "PATCH",
            "/hotplug/memory",
            Some(&body),
            Duration::from_secs(10),
        )
        .unwrap_err();
        assert!(
            matches!(err, CtlError::Status { status: 503, .. }),
            "{err:?}"
        );
        // The user reads the server's reason, not "Broken pipe".
        assert!(
            crate::error_chain(&err).ends_with("503 Service Unavailable: too many API connections"),
            "{err}"
        );
    }
}
