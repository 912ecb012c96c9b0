//! End-to-end: upgrading a node's agent under load (issue 19). A second agent process starts
//! next to the running one (a DaemonSet rollout with `maxSurge: 1`), takes over its listening
//! sockets through the handover socket, and the old one drains and exits. Also: two upgrades in
//! a row, SIGKILL under load (fails closed), and a pod whose port was taken while no agent ran.
//! The world and its load are `sluice_tests::upgrade_world`'s.
use std::{
    net::SocketAddr,
    process::{Child, Stdio},
    time::{Duration, Instant},
};

use sluice_tests::{
    agent::Agent,
    load::LoadReport,
    upgrade_world::{LONG, Load, RATE, SECONDS, STRICT, flows, serve, summarize, unix_ms, world},
    world::testpod_bin,
};

/// How long an old agent may take to drain and exit (its deadline is 30 s).
const DRAIN_WAIT: Duration = Duration::from_secs(40);

/// The previous agent drained and exited cleanly, after saying so.
fn assert_drained(mut old: Agent) {
    let status = old.wait_exit(DRAIN_WAIT);
    assert!(
        status.is_some_and(|s| s.success()),
        "the old agent did not drain and exit within {DRAIN_WAIT:?} ({status:?}):\n{}",
        old.tail()
    );
    let lines = old.log_lines();
    assert!(
        lines.iter().any(|l| l["message"] == "drained"),
        "the old agent exited without draining:\n{}",
        old.tail()
    );
}

/// The agent took its predecessor's listeners, and no pod of its node was held closed.
fn assert_took_over(agent: &Agent) {
    let lines = agent.log_lines();
    assert!(
        lines
            .iter()
            .any(|l| l["message"] == "took over the running agent's listeners"),
        "the new agent did not take the listeners over:\n{}",
        agent.tail()
    );
    let held: Vec<_> = lines
        .iter()
        .filter(|l| {
            l["message"]
                .as_str()
                .is_some_and(|m| m.contains("held closed"))
        })
        .collect();
    assert!(
        held.is_empty(),
        "pods held closed after the upgrade: {held:?}"
    );
}

/// The agent serves the certificates its predecessor carried over, and asked the CA for none
/// (no re-issue storm on every upgrade).
fn assert_certificates_carried(agent: &Agent) {
    let lines = agent.log_lines();
    let carried = lines
        .iter()
        .find(|l| l["message"] == "workload certificates carried over from the previous agent")
        .unwrap_or_else(|| panic!("the new agent took no certificates over:\n{}", agent.tail()));
    let (offered, adopted) = (carried["offered"].as_u64(), carried["adopted"].as_u64());
    assert!(offered.is_some_and(|n| n >= 2), "{carried}");
    assert_eq!(adopted, offered, "{carried}");
    let issued: Vec<_> = lines
        .iter()
        .filter(|l| l["message"] == "issued workload certificate")
        .collect();
    assert!(
        issued.is_empty(),
        "the new agent asked the CA again: {issued:?}"
    );
}

fn assert_all_verified(reports: &[(&str, LoadReport)], seconds: u64) {
    for (name, r) in reports {
        assert_eq!(r.long_ok, LONG as u64, "{name}: long transfers");
        assert_eq!(r.short_ok, seconds * RATE, "{name}: short connections");
    }
}

#[test]
fn upgrade_under_load_loses_no_connection() {
    let mut w = world("");
    let _servers = serve(&mut w);
    let load = Load::start(&w, &flows(&w), SECONDS);
    std::thread::sleep(Duration::from_secs(4));
    let t0 = unix_ms();
    let old = w.upgrade_agent(1);
    let t1 = unix_ms();
    let reports = load.finish();
    let failed = summarize("upgrade under load", &reports, (t0, t1)).failed;
    assert_took_over(&w.agents[&1]);
    assert_certificates_carried(&w.agents[&1]);
    assert_drained(old);
    assert_eq!(failed, 0, "connections failed across the upgrade");
    assert_all_verified(&reports, SECONDS);
    // The new agent serves new connections on every path.
    let after = Load::start(&w, &flows(&w), 1).finish();
    assert_eq!(summarize("after the upgrade", &after, (0, 0)).failed, 0);
}

#[test]
fn upgrade_twice_in_a_row_while_the_first_still_drains() {
    let mut w = world("");
    let _servers = serve(&mut w);
    let load = Load::start(&w, &flows(&w), SECONDS);
    std::thread::sleep(Duration::from_secs(3));
    let t0 = unix_ms();
    let first = w.upgrade_agent(1);
    std::thread::sleep(Duration::from_secs(2));
    // The first old agent still carries the long transfers (they run for 12 s).
    let mut first = first;
    assert!(
        first.wait_exit(Duration::ZERO).is_none(),
        "the first old agent should still be draining"
    );
    let second = w.upgrade_agent(1);
    let t1 = unix_ms();
    let reports = load.finish();
    let failed = summarize("two upgrades in a row", &reports, (t0, t1)).failed;
    assert_took_over(&w.agents[&1]);
    assert_drained(first);
    assert_drained(second);
    assert_eq!(failed, 0, "connections failed across two upgrades");
    assert_all_verified(&reports, SECONDS);
}

#[test]
fn upgrade_sigkill_under_load_fails_closed_and_the_next_agent_adopts() {
    let mut w = world(STRICT);
    let servers = serve(&mut w);
    let seconds = 10;
    let load = Load::start(&w, &flows(&w), seconds);
    std::thread::sleep(Duration::from_secs(3));
    let t0 = unix_ms();
    let mut crashed = w.agents.remove(&1).expect("agent 1");
    crashed.kill();
    w.start_agent(1, "");
    let t1 = unix_ms();
    let reports = load.finish();
    summarize("SIGKILL under load", &reports, (t0, t1));
    let out = w.pod("out").ipv4;
    // No plaintext reached STRICT a, before, during or after the crash.
    let mut seen = 0;
    while let Some((peer, _)) = servers[0].try_accepted(Duration::from_millis(200)) {
        seen += 1;
        assert_ne!(peer.ip(), out, "plaintext from out reached STRICT a");
    }
    assert!(seen > 0, "a's server saw no connection at all");
    let mut in_flight = 0;
    for (name, r) in &reports {
        if name.contains("plaintext") {
            assert_eq!(
                (r.long_ok, r.short_ok),
                (0, 0),
                "{name}: STRICT let plaintext through"
            );
            continue;
        }
        // What failed was in flight at the crash or started before the new agent was ready;
        // everything that started a second after that succeeded.
        for (at, e) in &r.errors {
            assert!(
                *at < t1 + 1000,
                "{name}: a connection started {} ms after the new agent was ready failed: {e}",
                *at as i64 - t1 as i64
            );
        }
        let late_ok = r.connects.iter().filter(|(at, _)| *at > t1 + 1000).count();
        assert!(late_ok > 0, "{name}: nothing succeeded after the restart");
        in_flight += r.long_failed + r.short_failed;
    }
    println!(
        "SIGKILL: {in_flight} connections failed (in flight at the crash or begun before the new agent was ready, {} ms)",
        t1 - t0
    );
    assert!(
        w.agents[&1]
            .log_lines()
            .iter()
            .all(|l| l["message"] != "took over the running agent's listeners"),
        "nothing to take over after a crash"
    );
}

#[test]
fn upgrade_gap_port_taken_keeps_the_pod_captured_and_closed() {
    let mut w = world("");
    let _servers = serve(&mut w);
    let c = SocketAddr::new(w.pod("c").ipv4, 8080);
    let a = SocketAddr::new(w.pod("a").ipv4, 8080);
    assert!(w.connect("a", &c.to_string(), 1000).captured());
    // The agent crashes; while none runs, a's application takes 15001.
    w.agents.get_mut(&1).expect("agent 1").kill();
    w.agents.remove(&1);
    let mut squatter = w
        .pod("a")
        .command(testpod_bin())
        .args(["serve", "127.0.0.1:15001"])
        .stdout(Stdio::null())
        .spawn()
        .expect("squatter");
    struct Kill<'a>(&'a mut Child);
    impl Drop for Kill<'_> {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let squatter = Kill(&mut squatter);
    std::thread::sleep(Duration::from_millis(300));
    w.start_agent(1, "");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !w.agents[&1].log_lines().iter().any(|l| {
        l["message"]
            .as_str()
            .is_some_and(|m| m.contains("held closed"))
    }) {
        assert!(
            Instant::now() < deadline,
            "a was not held closed:\n{}",
            w.agents[&1].tail()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // a stays captured: its connects do not leave in plaintext, and nothing reaches it.
    let out = w.try_connect("a", &c.to_string(), 1000);
    assert!(out.is_err(), "a's outbound escaped capture: {out:?}");
    let inbound = w.try_connect("c", &a.to_string(), 1000);
    assert!(
        inbound.is_err(),
        "a took traffic while held closed: {inbound:?}"
    );
    let plain = w.try_connect("out", &a.to_string(), 1000);
    assert!(
        plain.is_err(),
        "a took plaintext while held closed: {plain:?}"
    );
    // Once the port is free again, the retry captures it.
    drop(squatter);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !w.agents[&1]
        .log_lines()
        .iter()
        .any(|l| l["message"] == "capture succeeded on retry; the pod is no longer held closed")
    {
        assert!(
            Instant::now() < deadline,
            "a was not captured on retry:\n{}",
            w.agents[&1].tail()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(w.connect("a", &c.to_string(), 1000).captured());
}
