//! Bounds: the upstream request rate under a storm of distinct keys, the
//! number of keys and watch streams, and the shutdown grace period.

use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use tokenbroker::emulator::{EmulatorConfig, Fault, FaultRule};
use tonic::Code;

use crate::common::{
    self, BINARY, Broker, NOBODY, PATIENCE, Printing, as_uid, chmod, emulator, id_request, in_time,
    output, watch_id, with_deadline,
};

/// The most arrivals within any one-second window.
fn peak_per_second(arrivals: &[Instant]) -> usize {
    let mut peak = 0;
    let mut first = 0;
    for (last, at) in arrivals.iter().enumerate() {
        while *at - arrivals[first] >= Duration::from_secs(1) {
            first += 1;
        }
        peak = peak.max(last - first + 1);
    }
    peak
}

#[tokio::test]
async fn a_storm_of_distinct_keys_stays_under_the_upstream_rate_limit() {
    const RPS: usize = 200;
    const KEYS: usize = 1000;
    let emulator = emulator(EmulatorConfig::default()).await;
    let rps = RPS.to_string();
    let broker = Broker::start(&emulator, &["--upstream-max-rps", &rps]).await;
    let mut clients = Vec::new();
    for _ in 0..8 {
        clients.push(broker.client().await);
    }
    let deadline = Duration::from_secs(20);
    let calls = (0..KEYS).map(|i| {
        let mut client = clients[i % clients.len()].clone();
        async move {
            let audience = format!("https://storm-{i}.run.app");
            let started = Instant::now();
            let result = client
                .get_id_token(with_deadline(id_request(&audience), deadline))
                .await;
            (audience, result, started.elapsed())
        }
    });
    let results = futures_util::future::join_all(calls).await;
    for (audience, result, elapsed) in &results {
        assert!(
            *elapsed < deadline + Duration::from_secs(1),
            "{audience} took {elapsed:?}"
        );
        match result {
            Ok(token) => assert_eq!(common::claims(&token.get_ref().token)["aud"], *audience),
            Err(status) => assert!(
                matches!(status.code(), Code::DeadlineExceeded | Code::Unavailable)
                    && !status.message().is_empty(),
                "{audience}: {status:?}"
            ),
        }
    }
    let served = results.iter().filter(|(_, r, _)| r.is_ok()).count();
    assert_eq!(served, KEYS, "at {RPS}/s all {KEYS} fit in the deadline");
    let arrivals = emulator.arrivals();
    assert_eq!(arrivals.len(), KEYS, "one fetch per key");
    let peak = peak_per_second(&arrivals);
    // The limiter allows bursts of a fifth of the rate on top of it; the
    // arrivals are timed at the emulator, where scheduling can bunch a few.
    let bound = (RPS + RPS / 5) * 105 / 100;
    assert!(
        peak <= bound,
        "{peak} requests in one second (bound {bound})"
    );
    // And the limit is what paced the storm: (1000 - 40) / 200 = 4.8 s.
    let span = arrivals[arrivals.len() - 1] - arrivals[0];
    assert!(span >= Duration::from_secs(4), "{span:?}");
}

#[tokio::test]
async fn the_number_of_keys_is_bounded() {
    let broker = Broker::emulated(&["--max-keys", "2"]).await;
    let mut client = broker.client().await;
    client.get_id_token(id_request("a")).await.unwrap();
    client.get_id_token(id_request("b")).await.unwrap();
    let error = client.get_id_token(id_request("c")).await.unwrap_err();
    assert_eq!(error.code(), Code::ResourceExhausted);
    assert!(
        error.message().contains("too many cached keys"),
        "{}",
        error.message()
    );
    assert!(client.get_id_token(id_request("a")).await.is_ok());
}

/// `tokenbroker token id --watch` for `audience` on `broker`, as `nobody`.
fn watch_as_nobody(broker: &Broker, audience: &str) -> tokio::process::Command {
    let mut command = as_uid(NOBODY, BINARY);
    command
        .args(["token", "id", "--watch", "--audience", audience, "--socket"])
        .arg(&broker.socket);
    command
}

#[tokio::test]
async fn watch_streams_are_bounded_per_uid_and_in_total() {
    let broker = Broker::emulated(&[
        "--max-watchers-per-uid",
        "2",
        "--max-watchers",
        "3",
        "--socket-mode",
        "0666",
    ])
    .await;
    chmod(broker.dir.path(), 0o755);
    let client = broker.client().await;
    let mut open = Vec::new();
    for audience in ["a", "b"] {
        let mut stream = client
            .clone()
            .watch_token(watch_id(audience))
            .await
            .unwrap()
            .into_inner();
        common::next_message(&mut stream).await.unwrap();
        open.push(stream);
    }
    let error = client.clone().watch_token(watch_id("c")).await.unwrap_err();
    assert_eq!(error.code(), Code::ResourceExhausted);
    assert!(
        error.message().contains("for this uid"),
        "{}",
        error.message()
    );
    // Unary calls are not affected.
    assert!(client.clone().get_id_token(id_request("c")).await.is_ok());

    if common::is_root("reaching the total with another uid's streams") {
        // Another uid has a place of its own: the third stream, which
        // reaches the total.
        let mut third = Printing::spawn(&mut watch_as_nobody(&broker, "d"));
        third.next_line().await;
        // Past the total nobody gets one, though under its own share.
        let refused = output(&mut watch_as_nobody(&broker, "e")).await;
        let stderr = String::from_utf8_lossy(&refused.stderr);
        assert_eq!(
            refused.status.code(),
            Some(18),
            "RESOURCE_EXHAUSTED: {stderr}"
        );
        assert!(
            stderr.contains("too many open watch streams") && !stderr.contains("for this uid"),
            "{stderr}"
        );
        let error = client.clone().watch_token(watch_id("f")).await.unwrap_err();
        assert_eq!(error.code(), Code::ResourceExhausted);
        assert!(
            !error.message().contains("for this uid"),
            "{}",
            error.message()
        );
        // The other uid's stream ending frees a place in the total.
        drop(third);
    }

    // A closed stream frees its place (once the broker notices).
    open.pop();
    let started = Instant::now();
    loop {
        match client.clone().watch_token(watch_id("c")).await {
            Ok(_) => break,
            Err(status) => assert_eq!(status.code(), Code::ResourceExhausted),
        }
        assert!(
            started.elapsed() < PATIENCE,
            "the closed stream's place was never freed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn shutdown_lets_calls_in_flight_finish_within_the_grace() {
    let emulator = emulator(EmulatorConfig::default()).await;
    emulator.set_fault(Some(FaultRule::always(Fault::Delay { millis: 700 })));
    let mut broker = Broker::start(&emulator, &["--shutdown-grace", "5s"]).await;
    let mut client = broker.client().await;
    let call = tokio::spawn(async move {
        client
            .get_id_token(id_request("https://slow.run.app"))
            .await
    });
    emulator
        .wait_for(|s| s.identity_requests == 1, PATIENCE)
        .await
        .expect("the call reaches the metadata server");
    broker.signal(Signal::SIGTERM);
    let answer = in_time("the call in flight", call).await.unwrap();
    assert!(answer.is_ok(), "the call in flight was cut: {answer:?}");
    assert!(broker.wait().await.success());

    // A call that cannot finish is given up after the grace period.
    let emulator = crate::common::emulator(EmulatorConfig::default()).await;
    emulator.set_fault(Some(FaultRule::always(Fault::Hang)));
    let mut broker = Broker::start(
        &emulator,
        &["--shutdown-grace", "300ms", "--upstream-timeout", "30s"],
    )
    .await;
    let mut client = broker.client().await;
    let call = tokio::spawn(async move {
        client
            .get_id_token(id_request("https://stuck.run.app"))
            .await
    });
    emulator
        .wait_for(|s| s.identity_requests == 1, PATIENCE)
        .await
        .expect("the call reaches the metadata server");
    let signalled = Instant::now();
    broker.stop().await;
    assert!(
        signalled.elapsed() < Duration::from_secs(5),
        "{:?}",
        signalled.elapsed()
    );
    assert!(in_time("the call given up", call).await.unwrap().is_err());
    assert!(!broker.socket.exists());
}
