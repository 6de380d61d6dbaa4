//! The guest's own view: `wait_for=online`, `wait_for=guest_ready`, and `tide ctl` waiting for
//! them.

use super::*;

/// `wait_for=online`: settled only when the guest's current report shows exactly the plugged
/// size, which is the requested size; otherwise `settled: false` at the timeout.
#[test]
fn long_poll_waits_for_the_guest_online() {
    let mock = Mock::new(true);
    let h = Harness::start(mock.clone());
    let poll_now = |sock: &Path| get(sock, "/hotplug/memory?wait_for=online&timeout_ms=0").json();
    // No guest reports: null in the status, never settled.
    let v = get(&h.sock, "/hotplug/memory").json();
    assert!(v["guest_online_size"].is_null(), "{v}");
    assert_eq!(poll_now(&h.sock)["settled"], false);
    assert_eq!(
        send(
            &h.sock,
            "PATCH",
            "/hotplug/memory",
            r#"{"requested_size":268435456}"#
        )
        .status,
        204
    );
    mock.step.store((256 * MIB) as usize, Ordering::SeqCst);
    // Plugged, but the guest has only half of it online: plugged_size settles, online does not.
    *mock.guest_online.lock().unwrap() = Some(128 * MIB);
    let v = poll_now(&h.sock);
    assert_eq!(
        (v["settled"].clone(), v["plugged_size"].clone()),
        (false.into(), (256 * MIB).into())
    );
    assert_eq!(v["guest_online_size"], 128 * MIB);
    assert_eq!(
        get(
            &h.sock,
            "/hotplug/memory?wait_for=plugged_size&timeout_ms=0"
        )
        .json()["settled"],
        true
    );
    assert!(
        mock.guest_asked.load(Ordering::SeqCst) > 0,
        "the guest was not asked"
    );
    // All online, but in a report from before the last change: still not settled.
    *mock.guest_online.lock().unwrap() = Some(256 * MIB);
    mock.guest_current.store(false, Ordering::SeqCst);
    assert_eq!(poll_now(&h.sock)["settled"], false);
    // A parked long poll answers once the guest's current report agrees.
    let sock = h.sock.clone();
    let poll = std::thread::spawn(move || {
        get(&sock, "/hotplug/memory?wait_for=online&timeout_ms=600000").json()
    });
    while h.api_stop.parked_long_polls() == 0 {
        std::thread::sleep(Duration::from_millis(5));
    }
    mock.guest_current.store(true, Ordering::SeqCst);
    let v = poll.join().unwrap();
    assert_eq!(v["settled"], true, "{v}");
    assert_eq!(v["guest_online_size"], 256 * MIB);
    // More online than plugged (a shrink the guest has not caught up with) is not settled.
    *mock.guest_online.lock().unwrap() = Some(384 * MIB);
    assert_eq!(poll_now(&h.sock)["settled"], false);
    // A poll that times out says so.
    let v = get(&h.sock, "/hotplug/memory?wait_for=online&timeout_ms=50").json();
    assert_eq!(v["settled"], false);
    assert_eq!(get(&h.sock, "/hotplug/memory?wait_for=onlin").status, 400);
}

/// `GET /vm?wait_for=guest_ready` parks until the guest's user space said it is ready.
#[test]
fn long_poll_waits_for_the_guest_ready() {
    let mock = Mock::new(false);
    let h = Harness::start(mock.clone());
    let v = get(&h.sock, "/vm").json();
    assert_eq!(v["guest_ready"], false);
    assert!(v.get("settled").is_none());
    let v = get(&h.sock, "/vm?wait_for=guest_ready&timeout_ms=0").json();
    assert_eq!(
        (v["settled"].clone(), v["guest_ready"].clone()),
        (false.into(), false.into())
    );
    let sock = h.sock.clone();
    let poll =
        std::thread::spawn(move || get(&sock, "/vm?wait_for=guest_ready&timeout_ms=600000").json());
    while h.api_stop.parked_long_polls() == 0 {
        std::thread::sleep(Duration::from_millis(5));
    }
    mock.guest_ready.store(true, Ordering::SeqCst);
    let v = poll.join().unwrap();
    assert_eq!(
        (v["settled"].clone(), v["guest_ready"].clone()),
        (true.into(), true.into())
    );
    assert_eq!(get(&h.sock, "/vm?wait_for=plugged_size").status, 400);
}

/// `tide ctl resize --wait` waits for the guest's online memory when the guest reports it, and
/// `tide ctl wait ready` for its user space.
#[test]
fn ctl_waits_for_the_guest() {
    let mock = Mock::new(true);
    mock.step.store((256 * MIB) as usize, Ordering::SeqCst);
    let h = Harness::start(mock.clone());
    let resize = |size: u64, timeout: u64| {
        client::run(CtlArgs {
            api_socket: h.sock.clone(),
            cmd: CtlCommand::Resize {
                size,
                wait: true,
                timeout: Some(timeout),
            },
        })
    };
    // The guest reports nothing online: plugged alone does not end the wait.
    *mock.guest_online.lock().unwrap() = Some(0);
    let err = resize(256 * MIB, 1).unwrap_err();
    assert!(matches!(err, CtlError::WaitTimedOut { .. }), "{err:?}");
    let msg = crate::error_chain(&err);
    assert!(
        msg.contains("plugged 256 MiB of 256 MiB and reports 0 B of it online"),
        "{msg}"
    );
    // Once the guest reports it online, the wait ends.
    *mock.guest_online.lock().unwrap() = Some(256 * MIB);
    resize(256 * MIB, 600).unwrap();
    // A guest that does not report: the device's plug is enough.
    *mock.guest_online.lock().unwrap() = None;
    resize(512 * MIB, 600).unwrap();

    let wait_ready = |timeout: u64| {
        client::run(CtlArgs {
            api_socket: h.sock.clone(),
            cmd: CtlCommand::Wait {
                what: client::WaitCommand::Ready {
                    timeout: Some(timeout),
                },
            },
        })
    };
    let err = wait_ready(0).unwrap_err();
    assert!(matches!(err, CtlError::ReadyTimedOut(_)), "{err:?}");
    mock.guest_ready.store(true, Ordering::SeqCst);
    wait_ready(600).unwrap();
}
