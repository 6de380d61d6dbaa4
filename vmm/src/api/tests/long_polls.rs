//! Long polls: settling, timeouts, their slots, and a stop while they wait.

use super::*;

const LONG_POLL: &[u8] =
    b"GET /hotplug/memory?wait_for=plugged_size&timeout_ms=600000 HTTP/1.1\r\n\r\n";

/// Parks `MAX_WAITERS` long polls and returns once the server has parked them all; one more
/// is then refused with 503 "too many long polls".
fn park_all_waiters(h: &Harness) -> Vec<UnixStream> {
    let polls: Vec<UnixStream> = (0..MAX_WAITERS)
        .map(|_| {
            let mut s = connect(&h.sock);
            s.write_all(LONG_POLL).unwrap();
            s
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(10);
    while h.api_stop.parked_long_polls() < MAX_WAITERS {
        assert!(Instant::now() < deadline, "the polls were never all parked");
        std::thread::yield_now();
    }
    let mut s = connect(&h.sock);
    s.write_all(LONG_POLL).unwrap();
    let a = read_answer(&mut s);
    assert_eq!(a.status, 503);
    assert!(a.error().contains("long polls"), "{}", a.body);
    polls
}

#[test]
fn long_polls_whose_clients_leave_are_dropped() {
    let h = Harness::start(Mock::new(true));
    assert_eq!(
        send(
            &h.sock,
            "PATCH",
            "/hotplug/memory",
            r#"{"requested_size":2097152}"#
        )
        .status,
        204
    );
    let polls = park_all_waiters(&h);
    drop(polls);
    // Their slots free up once the server sees the hang-ups: a new poll parks (and times out)
    // instead of being refused.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let a = get(
            &h.sock,
            "/hotplug/memory?wait_for=plugged_size&timeout_ms=50",
        );
        if a.status == 200 {
            assert_eq!(a.json()["settled"], false);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "waiting connections not released"
        );
    }
}

/// Once, parked long polls took every connection slot, so the PATCH that would
/// satisfy them and the shutdown got 503.
#[test]
fn long_polls_do_not_take_the_slots_of_patch_get_and_shutdown() {
    let h = Harness::start(Mock::new(true));
    assert_eq!(
        send(
            &h.sock,
            "PATCH",
            "/hotplug/memory",
            r#"{"requested_size":2097152}"#
        )
        .status,
        204
    );
    let mut polls = park_all_waiters(&h);
    // Room for ordinary requests, all of MAX_CONNECTIONS of them at once.
    let idle: Vec<UnixStream> = (0..MAX_CONNECTIONS - 1).map(|_| connect(&h.sock)).collect();
    assert_eq!(get(&h.sock, "/vm").status, 200);
    drop(idle);
    // The PATCH that satisfies them gets through and every poll answers settled.
    h.mock.step.store(usize::MAX, Ordering::SeqCst);
    assert_eq!(
        send(
            &h.sock,
            "PATCH",
            "/hotplug/memory",
            r#"{"requested_size":0}"#
        )
        .status,
        204
    );
    for p in &mut polls {
        let a = read_answer(p);
        assert_eq!(a.status, 200);
        assert_eq!(a.json()["settled"], true);
    }
    // And a shutdown with polls parked again.
    h.mock.step.store(0, Ordering::SeqCst);
    assert_eq!(
        send(
            &h.sock,
            "PATCH",
            "/hotplug/memory",
            r#"{"requested_size":4194304}"#
        )
        .status,
        204
    );
    let _polls = park_all_waiters(&h);
    assert_eq!(send(&h.sock, "PUT", "/vm/shutdown", "").status, 204);
    assert_eq!(h.mock.shutdowns.load(Ordering::SeqCst), 1);
}

/// Once, a stop closed waiting long polls with no answer at all.
#[test]
fn stop_answers_every_waiting_long_poll() {
    let h = Harness::start(Mock::new(true));
    assert_eq!(
        send(
            &h.sock,
            "PATCH",
            "/hotplug/memory",
            r#"{"requested_size":2097152}"#
        )
        .status,
        204
    );
    let mut polls = park_all_waiters(&h);
    h.api_stop.stop();
    for p in &mut polls {
        let a = read_answer(p);
        assert_eq!(a.status, 503);
        assert!(a.error().contains("shutting down"), "{}", a.body);
    }
    let a = get(&h.sock, "/vm");
    assert_eq!(a.status, 503);
    assert!(a.error().contains("shutting down"), "{}", a.body);
    let deadline = Instant::now() + Duration::from_secs(5);
    while h.api_stop.open_connections() != 0 {
        assert!(Instant::now() < deadline, "answers not flushed");
        std::thread::yield_now();
    }
}

/// Once, the shutdown was requested after its 204 was sent, so a client that
/// got the 204 could not rely on it (and the tests reading the counter raced). A VMM slow to
/// take the request makes the old order fail every time.
#[test]
fn shutdown_is_requested_before_its_answer_is_sent() {
    let mock = Mock::new(true);
    *mock.shutdown_delay.lock().unwrap() = Duration::from_millis(200);
    let h = Harness::start(mock);
    assert_eq!(send(&h.sock, "PUT", "/vm/shutdown", "").status, 204);
    assert_eq!(h.mock.shutdowns.load(Ordering::SeqCst), 1);
}

#[test]
fn long_poll_settles() {
    let mock = Mock::new(true);
    mock.step.store((128 * MIB) as usize, Ordering::SeqCst);
    let h = Harness::start(mock);
    assert_eq!(
        send(
            &h.sock,
            "PATCH",
            "/hotplug/memory",
            r#"{"requested_size":1073741824}"#
        )
        .status,
        204
    );
    let t = Instant::now();
    let a = get(
        &h.sock,
        "/hotplug/memory?wait_for=plugged_size&timeout_ms=5000",
    );
    assert_eq!(a.status, 200);
    let v = a.json();
    assert_eq!(v["settled"], true);
    assert_eq!(v["plugged_size"], GIB);
    assert!(t.elapsed() < Duration::from_secs(4));
    // Already settled: at once.
    let a = get(&h.sock, "/hotplug/memory?wait_for=plugged_size");
    assert_eq!(a.json()["settled"], true);
}

#[test]
fn long_poll_times_out_without_blocking_others() {
    let h = Harness::start(Mock::new(true));
    assert_eq!(
        send(
            &h.sock,
            "PATCH",
            "/hotplug/memory",
            r#"{"requested_size":2097152}"#
        )
        .status,
        204
    );
    let sock = h.sock.clone();
    let poll = std::thread::spawn(move || {
        let t = Instant::now();
        let a = get(
            &sock,
            "/hotplug/memory?wait_for=plugged_size&timeout_ms=600",
        );
        (a.status, a.json(), t.elapsed())
    });
    // A long poll whose client leaves is dropped.
    let mut gone = connect(&h.sock);
    gone.write_all(b"GET /hotplug/memory?wait_for=plugged_size HTTP/1.1\r\n\r\n")
        .unwrap();
    std::thread::sleep(Duration::from_millis(100));
    drop(gone);
    // Others are served while the poll is pending.
    let t = Instant::now();
    assert_eq!(get(&h.sock, "/vm").status, 200);
    assert!(t.elapsed() < Duration::from_millis(400));
    let (status, v, elapsed) = poll.join().unwrap();
    assert_eq!(status, 200);
    assert_eq!(v["settled"], false);
    assert_eq!(v["requested_size"], 2 * MIB);
    assert!(elapsed >= Duration::from_millis(600), "{elapsed:?}");
    assert!(elapsed < Duration::from_secs(3), "{elapsed:?}");
    // timeout_ms=0 answers at once; bad parameters are 400.
    assert_eq!(
        get(
            &h.sock,
            "/hotplug/memory?wait_for=plugged_size&timeout_ms=0"
        )
        .json()["settled"],
        false
    );
    assert_eq!(
        get(&h.sock, "/hotplug/memory?wait_for=requested_size").status,
        400
    );
    assert_eq!(
        get(
            &h.sock,
            "/hotplug/memory?wait_for=plugged_size&timeout_ms=x"
        )
        .status,
        400
    );
}
