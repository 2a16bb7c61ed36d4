//! The balancer end to end on 127.0.0.1: real listener, real backends, real connections.

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use spaced_lb::backend::{BackendSpec, Policy};
use spaced_lb::balancer::{Balancer, HealthConfig, LbConfig, bind_listener};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio::time::timeout;

/// Longest any single step may take before the test calls it a hang.
const STEP: Duration = Duration::from_secs(10);

/// A test backend: on accept it writes `<name>\n` (with PROXY headers,
/// `<name> <client>\n`), then echoes every byte until EOF, then closes.
struct TestBackend {
    spec: BackendSpec,
    task: JoinHandle<()>,
}

impl TestBackend {
    async fn start(name: &str, proxy: bool) -> TestBackend {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        Self::serve(name, listener, proxy)
    }

    fn serve(name: &str, listener: TcpListener, proxy: bool) -> TestBackend {
        let addr = listener.local_addr().unwrap();
        let name = name.to_string();
        let task_name = name.clone();
        let task = tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let name = task_name.clone();
                tokio::spawn(async move {
                    let mut greeting = name;
                    if proxy {
                        let mut buf = Vec::new();
                        loop {
                            let mut chunk = [0u8; 64];
                            let Ok(n) = s.read(&mut chunk).await else {
                                return;
                            };
                            if n == 0 {
                                return;
                            }
                            buf.extend_from_slice(&chunk[..n]);
                            match spaced_lb::proxy_v2::decode(&buf) {
                                Ok(Some((client, _, len))) => {
                                    greeting = format!("{greeting} {client}");
                                    assert_eq!(
                                        len,
                                        buf.len(),
                                        "test clients wait for the greeting"
                                    );
                                    break;
                                }
                                Ok(None) => continue,
                                Err(_) => {
                                    greeting = format!("{greeting} bad-header");
                                    break;
                                }
                            }
                        }
                    }
                    if s.write_all(format!("{greeting}\n").as_bytes())
                        .await
                        .is_err()
                    {
                        return;
                    }
                    let (mut r, mut w) = s.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                    let _ = w.shutdown().await;
                });
            }
        });
        TestBackend {
            spec: BackendSpec { name, addr },
            task,
        }
    }

    /// Stops accepting (the port then refuses connections).
    fn kill(&self) {
        self.task.abort();
    }
}

/// A balancer serving on an ephemeral port until the returned sender fires.
async fn start(
    config: LbConfig,
    backends: &[BackendSpec],
) -> (
    Arc<Balancer>,
    SocketAddr,
    oneshot::Sender<()>,
    JoinHandle<()>,
) {
    let listener = bind_listener("127.0.0.1:0".parse().unwrap(), false, 1024).unwrap();
    let addr = listener.local_addr().unwrap();
    let balancer = Balancer::new(addr.to_string(), config);
    balancer.set_backends(backends);
    let (tx, rx) = oneshot::channel();
    let b = balancer.clone();
    let task = tokio::spawn(async move {
        b.serve(listener, async move {
            let _ = rx.await;
        })
        .await
    });
    (balancer, addr, tx, task)
}

fn quick_health() -> Option<HealthConfig> {
    Some(HealthConfig {
        interval: Duration::from_millis(50),
        rise: 2,
        fall: 2,
        timeout: Duration::from_millis(200),
        error_limit: 1,
    })
}

/// Connects, optionally sends `first`, and returns the backend's greeting line and the stream.
async fn connect(addr: SocketAddr, first: &[u8]) -> (String, BufReader<TcpStream>) {
    let mut s = timeout(STEP, TcpStream::connect(addr))
        .await
        .unwrap()
        .unwrap();
    if !first.is_empty() {
        s.write_all(first).await.unwrap();
    }
    let mut r = BufReader::new(s);
    let mut line = String::new();
    timeout(STEP, r.read_line(&mut line))
        .await
        .unwrap()
        .unwrap();
    (line.trim_end().to_string(), r)
}

async fn greeting(addr: SocketAddr, first: &[u8]) -> String {
    connect(addr, first).await.0
}

async fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + STEP;
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn three(proxy: bool) -> Vec<TestBackend> {
    vec![
        TestBackend::start("n1", proxy).await,
        TestBackend::start("n2", proxy).await,
        TestBackend::start("n3", proxy).await,
    ]
}

fn specs(b: &[TestBackend]) -> Vec<BackendSpec> {
    b.iter().map(|b| b.spec.clone()).collect()
}

#[tokio::test]
async fn round_robin_spreads_evenly() {
    let backends = three(false).await;
    let (lb, addr, _stop, _) = start(LbConfig::default(), &specs(&backends)).await;
    let mut counts = BTreeMap::<String, u32>::new();
    for _ in 0..30 {
        *counts.entry(greeting(addr, b"").await).or_default() += 1;
    }
    assert_eq!(
        counts,
        BTreeMap::from([("n1".into(), 10), ("n2".into(), 10), ("n3".into(), 10)])
    );
    assert_eq!(lb.stats().accepted.load(Ordering::Relaxed), 30);
}

/// leastconn counts a connection from the moment it is assigned, not once
/// its backend connect completed: a burst of new connections arriving
/// together spreads over the least-loaded backends instead of all piling
/// onto the one that was least loaded before the burst.
#[tokio::test]
async fn leastconn_spreads_a_burst() {
    let backends = three(false).await;
    let config = LbConfig {
        policy: Policy::LeastConn,
        health: None,
        ..LbConfig::default()
    };
    let all = specs(&backends);
    let (lb, addr, _stop, _) = start(config, &all[1..]).await;
    // n2 and n3 carry 5 open connections each.
    let mut held = Vec::new();
    for _ in 0..10 {
        held.push(connect(addr, b"").await);
    }
    wait_for("10 open connections", || {
        lb.stats().active.load(Ordering::Relaxed) == 10
    })
    .await;
    // n1 joins, then 12 connections arrive at once.
    lb.set_backends(&all);
    let burst = connect_at_once(addr, 12).await;
    let mut counts = BTreeMap::<String, u32>::new();
    for (name, _) in held.iter().chain(burst.iter()) {
        *counts.entry(name.clone()).or_default() += 1;
    }
    // 22 connections: 8/7/7 in some order (n1 takes 8 of the burst).
    let mut spread: Vec<u32> = counts.values().copied().collect();
    spread.sort_unstable();
    assert_eq!(spread, vec![7, 7, 8], "{counts:?}");
}

/// Opens `n` connections concurrently; each returns its greeting and stream.
/// Sends 16 KiB (different for each `i` and `round`) and checks that all of it comes back.
async fn exchange(i: usize, round: u32, s: &mut BufReader<TcpStream>) {
    let payload: Vec<u8> = (0..16 * 1024u32)
        .map(|j| (i as u32 * 7 + j * 13 + round) as u8)
        .collect();
    s.get_mut().write_all(&payload).await.unwrap();
    let mut back = vec![0u8; payload.len()];
    timeout(STEP, s.read_exact(&mut back))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(back, payload, "connection {i}, round {round}");
}

async fn connect_at_once(addr: SocketAddr, n: usize) -> Vec<(String, BufReader<TcpStream>)> {
    let tasks: Vec<_> = (0..n)
        .map(|_| tokio::spawn(async move { connect(addr, b"").await }))
        .collect();
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

const STICKY_N2: &[u8] =
    b"GET /app HTTP/1.1\r\nHost: x\r\nCookie: theme=dark; JSESSIONID=8F3A9C.n2\r\n\r\n";

#[tokio::test]
async fn jsessionid_route_sticks_while_healthy_and_moves_when_not() {
    let backends = three(false).await;
    let config = LbConfig {
        policy: Policy::Sticky,
        health: quick_health(),
        ..LbConfig::default()
    };
    let (lb, addr, _stop, _) = start(config, &specs(&backends)).await;
    for _ in 0..12 {
        assert_eq!(greeting(addr, STICKY_N2).await, "n2");
    }
    let path_param = b"GET /app;jsessionid=77.n3?x=1 HTTP/1.1\r\nHost: x\r\n\r\n";
    for _ in 0..6 {
        assert_eq!(greeting(addr, path_param).await, "n3");
    }
    assert_eq!(lb.stats().sticky_routed.load(Ordering::Relaxed), 18);

    backends[1].kill();
    let n2 = lb.backends().snapshot()[1].clone();
    wait_for("n2 to be marked down", || !n2.is_up()).await;
    for _ in 0..12 {
        assert_ne!(greeting(addr, STICKY_N2).await, "n2");
    }
    // The session still works end to end through the other backend (echo).
    let (_, mut s) = connect(addr, STICKY_N2).await;
    let mut echoed = vec![0u8; STICKY_N2.len()];
    timeout(STEP, s.read_exact(&mut echoed))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(echoed, STICKY_N2);
}

#[tokio::test]
async fn unfinished_or_garbage_first_bytes_fall_back_to_round_robin() {
    let backends = three(false).await;
    let config = LbConfig {
        policy: Policy::Sticky,
        peek_timeout: Duration::from_millis(200),
        health: None,
        ..LbConfig::default()
    };
    let (lb, addr, _stop, _) = start(config, &specs(&backends)).await;
    // A request head that never ends: after the peek timeout round-robin
    // decides, so three connections see three different backends (a sticky
    // choice would have given n2 each time).
    let unfinished = b"GET / HTTP/1.1\r\nCookie: JSESSIONID=1.n2\r\nX-Slow: ";
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..3 {
        let (name, mut stream) = connect(addr, unfinished).await;
        seen.insert(name);
        // The bytes the balancer peeked at reach the backend (echoed back)
        // without the client sending more: the peek left them queued and
        // the relay must not wait for a new readiness edge to read them.
        let mut echo = vec![0u8; unfinished.len()];
        timeout(Duration::from_secs(3), stream.read_exact(&mut echo))
            .await
            .expect("the peeked bytes were never forwarded")
            .unwrap();
        assert_eq!(&echo[..], &unfinished[..]);
    }
    assert_eq!(seen.len(), 3, "{seen:?}");
    assert_eq!(lb.stats().peek_timeouts.load(Ordering::Relaxed), 3);

    // Garbage (a TLS ClientHello start) is decided at once, no timeout.
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..3 {
        seen.insert(greeting(addr, &[0x16, 0x03, 0x01, 0x02, 0x00, 0x01]).await);
    }
    assert_eq!(seen.len(), 3, "{seen:?}");
    assert_eq!(lb.stats().peek_timeouts.load(Ordering::Relaxed), 3);
    // A client that says nothing (server speaks first) is served after the timeout too.
    assert!(!greeting(addr, b"").await.is_empty());
}

#[tokio::test]
async fn connection_limit_refuses_the_excess_and_serves_the_rest() {
    let backends = three(false).await;
    let config = LbConfig {
        max_conns: 5,
        ..LbConfig::default()
    };
    let (lb, addr, _stop, _) = start(config, &specs(&backends)).await;
    let mut held = Vec::new();
    for _ in 0..5 {
        held.push(connect(addr, b"").await.1);
    }
    for _ in 0..3 {
        let mut s = TcpStream::connect(addr).await.unwrap();
        let mut buf = [0u8; 16];
        // Refused at accept: closed without a greeting.
        let n = timeout(STEP, s.read(&mut buf)).await.unwrap().unwrap_or(0);
        assert_eq!(n, 0);
    }
    assert_eq!(lb.stats().refused_limit.load(Ordering::Relaxed), 3);
    for s in &mut held {
        s.get_mut().write_all(b"still here").await.unwrap();
        let mut buf = [0u8; 10];
        timeout(STEP, s.read_exact(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&buf, b"still here");
    }
    drop(held);
    wait_for("the held connections to close", || {
        lb.stats().active.load(Ordering::Relaxed) == 0
    })
    .await;
    assert_eq!(greeting(addr, b"").await.len(), 2);
}

#[tokio::test]
async fn many_concurrent_connections_are_relayed_intact() {
    let backends = three(false).await;
    let (lb, addr, _stop, _) = start(LbConfig::default(), &specs(&backends)).await;
    let mut clients = Vec::new();
    for i in 0..200u32 {
        clients.push(tokio::spawn(async move {
            let (_, mut s) = connect(addr, b"").await;
            let payload: Vec<u8> = (0..64 * 1024u32).map(|j| (i * 31 + j) as u8).collect();
            let (mut r, mut w) = s.get_mut().split();
            let send = async {
                w.write_all(&payload).await.unwrap();
                w.shutdown().await.unwrap();
            };
            let mut back = Vec::new();
            let recv = r.read_to_end(&mut back);
            let (_, got) = tokio::join!(send, recv);
            got.unwrap();
            assert_eq!(back, payload, "connection {i}");
        }));
    }
    for c in clients {
        timeout(STEP * 3, c).await.unwrap().unwrap();
    }
    let s = lb.stats();
    assert_eq!(s.accepted.load(Ordering::Relaxed), 200);
    assert_eq!(
        s.spliced.client_to_backend.load(Ordering::Relaxed)
            + s.copied.client_to_backend.load(Ordering::Relaxed),
        200 * 64 * 1024
    );
    let per_backend: Vec<u64> = lb.backends().snapshot().iter().map(|b| b.total()).collect();
    assert_eq!(per_backend.iter().sum::<u64>(), 200);
}

#[tokio::test]
async fn backend_dying_mid_stream_closes_the_client() {
    // A backend that sends a little, then resets the connection.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let backend_addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let _ = s.write_all(b"partial").await;
            tokio::time::sleep(Duration::from_millis(50)).await;
            // SO_LINGER 0: close sends a reset, as a crashed peer's kernel would.
            let _ = nix::sys::socket::setsockopt(
                &s,
                nix::sys::socket::sockopt::Linger,
                &nix::libc::linger {
                    l_onoff: 1,
                    l_linger: 0,
                },
            );
            drop(s);
        }
    });
    let spec = BackendSpec {
        name: "dying".into(),
        addr: backend_addr,
    };
    let (lb, addr, _stop, _) = start(
        LbConfig {
            health: None,
            ..LbConfig::default()
        },
        &[spec],
    )
    .await;
    let mut s = TcpStream::connect(addr).await.unwrap();
    let mut got = Vec::new();
    // Ends (EOF or reset) instead of hanging.
    let _ = timeout(STEP, s.read_to_end(&mut got)).await.unwrap();
    assert!(got.starts_with(b"partial") || got.is_empty(), "{got:?}");
    wait_for("the relay to end", || {
        lb.stats().active.load(Ordering::Relaxed) == 0
    })
    .await;
    assert_eq!(lb.stats().relay_resets.load(Ordering::Relaxed), 1);
    assert_eq!(lb.stats().relay_errors.load(Ordering::Relaxed), 0);
}

#[tokio::test]
async fn half_close_from_the_client_still_gets_the_answer() {
    let backends = three(false).await;
    let (_lb, addr, _stop, _) = start(LbConfig::default(), &specs(&backends[..1])).await;
    let (_, mut s) = connect(addr, b"").await;
    s.get_mut().write_all(b"question").await.unwrap();
    s.get_mut().shutdown().await.unwrap();
    let mut rest = Vec::new();
    timeout(STEP, s.read_to_end(&mut rest))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        rest, b"question",
        "echo arrives after our FIN, then the backend's FIN"
    );
}

/// Three backends of which n2's port refuses connections, behind a balancer with `health`.
async fn n2_dead(
    health: Option<HealthConfig>,
) -> (
    Vec<TestBackend>,
    Arc<Balancer>,
    SocketAddr,
    oneshot::Sender<()>,
) {
    let backends = three(false).await;
    backends[1].kill();
    tokio::time::sleep(Duration::from_millis(20)).await;
    let config = LbConfig {
        health,
        ..LbConfig::default()
    };
    let (lb, addr, stop, _) = start(config, &specs(&backends)).await;
    (backends, lb, addr, stop)
}

#[tokio::test]
async fn failed_connects_are_redispatched_and_dead_backends_get_nothing() {
    let (mut backends, lb, addr, _stop) = n2_dead(quick_health()).await;
    // Before the checker notices, connects to n2 fail over to another backend.
    for _ in 0..9 {
        assert_ne!(greeting(addr, b"").await, "n2");
    }
    let n2 = lb.backends().snapshot()[1].clone();
    wait_for("n2 to be marked down", || !n2.is_up()).await;
    let errors_when_down = n2.connect_errors();
    for _ in 0..9 {
        assert_ne!(greeting(addr, b"").await, "n2");
    }
    assert_eq!(
        n2.connect_errors(),
        errors_when_down,
        "a down backend gets no attempts"
    );

    // n2 comes back on the same port: after `rise` good checks it is used again.
    let listener = TcpListener::bind(backends[1].spec.addr).await.unwrap();
    backends[1] = TestBackend::serve("n2", listener, false);
    wait_for("n2 to be marked up", || n2.is_up()).await;
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..6 {
        seen.insert(greeting(addr, b"").await);
    }
    assert!(seen.contains("n2"), "{seen:?}");
}

/// Passive health (HAProxy's `observe layer4`): a backend whose port refuses connections is
/// taken down by the first connect that fails on live traffic, long before its next probe (the
/// interval here is 30 s), so it costs one redispatched connect instead of one per turn; with
/// `error_limit = 0` every turn tries it again. Its probes bring it back once it answers.
#[tokio::test]
async fn live_traffic_takes_a_dead_backend_down_before_its_next_probe() {
    for (limit, expected_errors) in [(1u32, 1u64), (0, 10)] {
        let (_backends, lb, addr, _stop) = n2_dead(Some(HealthConfig {
            interval: Duration::from_secs(30),
            rise: 1,
            fall: 3,
            timeout: Duration::from_millis(200),
            error_limit: limit,
        }))
        .await;
        let n2 = lb.backends().snapshot()[1].clone();
        let mut seen = std::collections::BTreeMap::<String, u32>::new();
        for _ in 0..30 {
            *seen.entry(greeting(addr, b"").await).or_default() += 1;
        }
        assert!(!seen.contains_key("n2"), "{seen:?}");
        assert_eq!(seen.values().sum::<u32>(), 30, "{seen:?}");
        // Off, the dead backend is tried on each of its turns (a third of the connections, and
        // more: a redispatch takes a turn too).
        let tried = n2.connect_errors();
        assert!(
            if limit == 0 {
                tried >= expected_errors
            } else {
                tried == expected_errors
            },
            "error_limit {limit}: {tried} connects tried on the dead backend"
        );
        assert_eq!(n2.is_up(), limit == 0, "error_limit {limit}");
        if limit > 0 {
            // Both survivors share the load evenly once it is down.
            assert!(seen.values().all(|n| *n >= 14), "{seen:?}");
        }
    }
    // Taken down by traffic, brought back by its probes once it answers again.
    let (mut backends, lb, addr, _stop) = n2_dead(quick_health()).await;
    let n2 = lb.backends().snapshot()[1].clone();
    for _ in 0..3 {
        assert_ne!(greeting(addr, b"").await, "n2");
    }
    assert!(!n2.is_up());
    let listener = TcpListener::bind(backends[1].spec.addr).await.unwrap();
    backends[1] = TestBackend::serve("n2", listener, false);
    wait_for("n2 to be marked up again", || n2.is_up()).await;
}

/// A backend that does not answer at all (the kernel drops its SYNs) is given
/// up after `connect_timeout` and the connection goes to another backend; the
/// timeout counts as a connect error of that backend.
#[tokio::test]
async fn a_backend_that_does_not_answer_is_given_up_after_the_connect_timeout() {
    let good = TestBackend::start("n2", false).await;
    // n1: a listener with a full accept queue (backlog 0 holds one connection,
    // never accepted), so the kernel drops every further SYN to it.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let silent = socket.listen(0).unwrap();
    let silent_addr = silent.local_addr().unwrap();
    let _filler = std::net::TcpStream::connect(silent_addr).unwrap();
    assert!(
        timeout(Duration::from_millis(300), TcpStream::connect(silent_addr))
            .await
            .is_err(),
        "the silent backend answered a connect: the test cannot work here"
    );
    let config = LbConfig {
        connect_timeout: Duration::from_millis(200),
        health: None,
        ..LbConfig::default()
    };
    let specs = [
        BackendSpec {
            name: "n1".into(),
            addr: silent_addr,
        },
        good.spec.clone(),
    ];
    let (lb, addr, _stop, _) = start(config, &specs).await;
    // With two backends every connection starts at n1 (the retry's choice of
    // n2 moves the rotation on), waits out the timeout there, and n2 serves it.
    for _ in 0..4 {
        assert_eq!(greeting(addr, b"").await, "n2");
    }
    assert_eq!(lb.stats().connect_errors.load(Ordering::Relaxed), 4);
    let n1 = lb.backends().snapshot()[0].clone();
    assert_eq!((n1.name(), n1.connect_errors()), ("n1", 4));
    assert_eq!(lb.stats().no_backend.load(Ordering::Relaxed), 0);
}

#[tokio::test]
async fn no_backend_up_closes_the_client() {
    let backends = three(false).await;
    let config = LbConfig {
        health: None,
        retries: 5,
        ..LbConfig::default()
    };
    for b in &backends {
        b.kill();
    }
    tokio::time::sleep(Duration::from_millis(20)).await;
    let (lb, addr, _stop, _) = start(config, &specs(&backends)).await;
    let mut s = TcpStream::connect(addr).await.unwrap();
    let mut buf = [0u8; 8];
    let n = timeout(STEP, s.read(&mut buf)).await.unwrap().unwrap_or(0);
    assert_eq!(n, 0);
    assert_eq!(lb.stats().no_backend.load(Ordering::Relaxed), 1);
    assert_eq!(lb.stats().connect_errors.load(Ordering::Relaxed), 3);
}

#[tokio::test]
async fn drain_refuses_new_connections_and_lets_open_ones_finish() {
    let backends = three(false).await;
    let config = LbConfig {
        drain_grace: Duration::from_millis(600),
        ..LbConfig::default()
    };
    let (lb, addr, stop, task) = start(config, &specs(&backends)).await;
    let (_, mut open) = connect(addr, b"").await;
    stop.send(()).unwrap();
    wait_for("accepting to stop", || !lb.is_accepting()).await;
    assert!(
        TcpStream::connect(addr).await.is_err(),
        "a drained listener must refuse new connections"
    );
    // The open connection keeps working during the grace period.
    open.get_mut().write_all(b"ping").await.unwrap();
    let mut buf = [0u8; 4];
    timeout(STEP, open.read_exact(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&buf, b"ping");
    // Then the grace ends and it is cut.
    timeout(STEP, task).await.unwrap().unwrap();
    let mut rest = Vec::new();
    let _ = timeout(STEP, open.read_to_end(&mut rest)).await.unwrap();
    assert_eq!(lb.stats().drain_cut.load(Ordering::Relaxed), 1);
    assert_eq!(lb.stats().active.load(Ordering::Relaxed), 0);
}

/// The VIP lost and regained within the drain grace (a flap, a move and back):
/// the connections of the first term are valid again and are not cut when
/// that first grace ends; they are cut only after a later stop's grace.
#[tokio::test]
async fn serving_again_within_the_grace_keeps_the_drained_connections() {
    let backends = three(false).await;
    let config = LbConfig {
        drain_grace: Duration::from_millis(400),
        ..LbConfig::default()
    };
    let (lb, addr, stop, first_term) = start(config, &specs(&backends)).await;
    let (_, mut open) = connect(addr, b"").await;
    stop.send(()).unwrap();
    wait_for("accepting to stop", || !lb.is_accepting()).await;

    // Serving again, on a new listener, before the grace is over.
    let listener = bind_listener("127.0.0.1:0".parse().unwrap(), false, 1024).unwrap();
    let (stop_again, stopped) = oneshot::channel::<()>();
    let b = lb.clone();
    let second_term = tokio::spawn(async move {
        b.serve(listener, async move {
            let _ = stopped.await;
        })
        .await
    });
    wait_for("accepting again", || lb.is_accepting()).await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    open.get_mut().write_all(b"still here").await.unwrap();
    let mut buf = [0u8; 10];
    timeout(STEP, open.read_exact(&mut buf))
        .await
        .unwrap()
        .expect("the connection was cut");
    assert_eq!(&buf, b"still here");
    assert_eq!(lb.stats().drain_cut.load(Ordering::Relaxed), 0);

    // Lost again: now its grace applies, and then the old connection is cut.
    stop_again.send(()).unwrap();
    timeout(STEP, second_term).await.unwrap().unwrap();
    timeout(STEP, first_term).await.unwrap().unwrap();
    let mut rest = Vec::new();
    let _ = timeout(STEP, open.read_to_end(&mut rest)).await.unwrap();
    assert_eq!(lb.stats().drain_cut.load(Ordering::Relaxed), 1);
    assert_eq!(lb.stats().active.load(Ordering::Relaxed), 0);
}

#[tokio::test]
async fn backend_updates_keep_open_connections() {
    let backends = three(false).await;
    let (lb, addr, _stop, _) = start(LbConfig::default(), &specs(&backends)).await;
    let (first, mut open) = connect(addr, b"").await;
    let keep: Vec<BackendSpec> = specs(&backends)
        .into_iter()
        .filter(|s| s.name != first)
        .collect();
    lb.set_backends(&keep);
    open.get_mut().write_all(b"after update").await.unwrap();
    let mut buf = [0u8; 12];
    timeout(STEP, open.read_exact(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&buf, b"after update");
    for _ in 0..6 {
        assert_ne!(greeting(addr, b"").await, first);
    }
}

#[tokio::test]
async fn source_affinity_keeps_a_client_on_one_backend() {
    let backends = three(false).await;
    let config = LbConfig {
        policy: Policy::Source,
        ..LbConfig::default()
    };
    let (_lb, addr, _stop, _) = start(config, &specs(&backends)).await;
    let first = greeting(addr, b"").await;
    for _ in 0..10 {
        assert_eq!(greeting(addr, b"").await, first);
    }
}

#[tokio::test]
async fn proxy_protocol_v2_tells_the_backend_who_the_client_is() {
    let backends = three(true).await;
    let config = LbConfig {
        proxy_protocol: true,
        health: None,
        ..LbConfig::default()
    };
    let (lb, addr, _stop, _) = start(config, &specs(&backends)).await;
    let s = TcpStream::connect(addr).await.unwrap();
    let me = s.local_addr().unwrap();
    let mut r = BufReader::new(s);
    let mut line = String::new();
    timeout(STEP, r.read_line(&mut line))
        .await
        .unwrap()
        .unwrap();
    let (_, client) = line.trim_end().split_once(' ').unwrap();
    assert_eq!(client, me.to_string());
    // The header is written from user space; the backend's short line is copied, not spliced.
    let stats = lb.stats();
    assert_eq!(
        stats.copied.client_to_backend.load(Ordering::Relaxed),
        spaced_lb::proxy_v2::encode(me, addr).len() as u64
    );
    let line_len = line.len() as u64;
    timeout(STEP, async {
        while stats.copied.backend_to_client.load(Ordering::Relaxed) != line_len {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .unwrap();
    assert_eq!(stats.spliced.backend_to_client.load(Ordering::Relaxed), 0);
}

/// A reload (`reconfigure`) while 100 connections are open: every one of them keeps relaying,
/// byte for byte, and connections accepted afterwards follow the new settings.
#[tokio::test]
async fn reconfigure_keeps_100_open_connections_and_new_ones_follow_it() {
    let backends = three(false).await;
    // No health checks at first: the reload starts them.
    let unchecked = LbConfig {
        health: None,
        ..LbConfig::default()
    };
    let (lb, addr, _stop, _) = start(unchecked, &specs(&backends)).await;
    let mut open = connect_at_once(addr, 100).await;
    for (i, (_, s)) in open.iter_mut().enumerate() {
        exchange(i, 0, s).await;
    }
    // Round-robin spreads new connections over the three before the reload.
    let before: std::collections::BTreeSet<String> = {
        let mut names = std::collections::BTreeSet::new();
        for _ in 0..6 {
            names.insert(greeting(addr, b"").await);
        }
        names
    };
    assert_eq!(before.len(), 3, "{before:?}");

    lb.reconfigure(LbConfig {
        policy: Policy::Source,
        health: quick_health(),
        ..LbConfig::default()
    });
    assert_eq!(lb.config().policy, Policy::Source);
    for (i, (_, s)) in open.iter_mut().enumerate() {
        exchange(i, 1, s).await;
    }
    // Source affinity: every new connection from 127.0.0.1 lands on one backend.
    let mut after = std::collections::BTreeSet::new();
    for _ in 0..6 {
        after.insert(greeting(addr, b"").await);
    }
    assert_eq!(after.len(), 1, "{after:?}");
    // The new health checks run: a dead backend is taken down by them.
    let victim = backends
        .iter()
        .find(|b| !after.contains(&b.spec.name))
        .unwrap();
    victim.kill();
    wait_for("the new checks take the killed backend down", || {
        lb.backends()
            .snapshot()
            .iter()
            .any(|b| b.name() == victim.spec.name && !b.is_up())
    })
    .await;
    for (i, (_, s)) in open.iter_mut().enumerate() {
        exchange(i, 2, s).await;
    }
    assert_eq!(lb.stats().accepted.load(Ordering::Relaxed), 112);
    assert_eq!(lb.stats().relay_errors.load(Ordering::Relaxed), 0);
}

/// Several accept loops share their port through SO_REUSEPORT, but no other process's (or
/// set's) listeners may join them: a second set on a port in use fails as a single listener
/// would, naming the address.
#[test]
fn a_second_set_of_listeners_cannot_share_a_port_in_use() {
    use spaced_lb::balancer::bind_listeners;
    let first = bind_listeners("127.0.0.1:0".parse().unwrap(), false, 1024, 2).unwrap();
    let addr = first[0].local_addr().unwrap();
    for count in [1, 2] {
        let err = bind_listeners(addr, false, 1024, count).expect_err("a second set on the port");
        assert_eq!(err.kind(), std::io::ErrorKind::AddrInUse, "{err}");
        assert!(err.to_string().contains(&addr.to_string()), "{err}");
    }
    drop(first);
    let again = bind_listeners(addr, false, 1024, 2).unwrap();
    assert_eq!(
        again.len(),
        2,
        "the port is free again once the first set is closed"
    );
}

/// Two accept loops on one port (`bind_listeners`, SO_REUSEPORT): both serve, the balancer
/// accepts until the last one stops, and the first one's connections live on meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accept_loops_share_a_port_until_the_last_one_stops() {
    let backends = three(false).await;
    let listeners =
        spaced_lb::balancer::bind_listeners("127.0.0.1:0".parse().unwrap(), false, 1024, 2)
            .unwrap();
    let addr = listeners[0].local_addr().unwrap();
    assert_eq!(listeners[1].local_addr().unwrap(), addr);
    let balancer = Balancer::new(addr.to_string(), LbConfig::default());
    balancer.set_backends(&specs(&backends));
    let mut loops = Vec::new();
    for listener in listeners {
        let (tx, rx) = oneshot::channel::<()>();
        let b = balancer.clone();
        let task = tokio::spawn(async move {
            b.serve(TcpListener::from_std(listener).unwrap(), async move {
                let _ = rx.await;
            })
            .await
        });
        loops.push((tx, task));
    }
    wait_for("accepting", || balancer.is_accepting()).await;
    let mut early = connect_at_once(addr, 40).await;
    let (first_stop, first_task) = loops.remove(0);
    first_stop.send(()).unwrap();
    // The first loop's listener closes; the other takes every new connection.
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(balancer.is_accepting());
    for _ in 0..20 {
        let name = greeting(addr, b"").await;
        assert!(backends.iter().any(|b| b.spec.name == name), "{name}");
    }
    // Connections the first loop accepted are kept while the balancer still accepts.
    for (i, (_, s)) in early.iter_mut().enumerate() {
        let msg = format!("still here {i}");
        s.get_mut().write_all(msg.as_bytes()).await.unwrap();
        let mut back = vec![0u8; msg.len()];
        timeout(STEP, s.read_exact(&mut back))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(back, msg.as_bytes());
    }
    assert!(
        !first_task.is_finished(),
        "the first loop cut its connections"
    );
    let (last_stop, last_task) = loops.remove(0);
    last_stop.send(()).unwrap();
    wait_for("not accepting", || !balancer.is_accepting()).await;
    assert!(TcpStream::connect(addr).await.is_err());
    drop(early);
    timeout(STEP, first_task).await.unwrap().unwrap();
    timeout(STEP, last_task).await.unwrap().unwrap();
}

/// A client whose request came with its handshake: the balancer reads it before it connects
/// the backend, and the request carries the backend handshake's last ACK, so the backend's
/// socket counts two segments in (the SYN, then the request), not three.
#[tokio::test]
async fn a_request_sent_with_the_handshake_carries_the_backend_handshakes_ack() {
    let backend = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let spec = BackendSpec {
        name: "b".into(),
        addr: backend.local_addr().unwrap(),
    };
    // No health checks: every connection the backend accepts is a client's.
    let config = LbConfig {
        health: None,
        ..LbConfig::default()
    };
    let (_b, addr, _stop, _task) = start(config, std::slice::from_ref(&spec)).await;
    // Connected and written before the balancer's accept loop runs (no await in between).
    let mut client = std::net::TcpStream::connect(addr).unwrap();
    std::io::Write::write_all(&mut client, b"request").unwrap();
    let (mut server, _) = timeout(STEP, backend.accept()).await.unwrap().unwrap();
    let mut got = [0u8; 7];
    timeout(STEP, server.read_exact(&mut got))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&got, b"request");
    assert_eq!(
        common::segments_in("established", spec.addr.port()),
        2,
        "the backend should get its SYN and the request, with no ACK of its own between"
    );
    // A server-first exchange on the same balancer still works: nothing is held back when
    // the client has sent nothing.
    let mut quiet = TcpStream::connect(addr).await.unwrap();
    let (mut second, _) = timeout(STEP, backend.accept()).await.unwrap().unwrap();
    second.write_all(b"hello\n").await.unwrap();
    let mut hello = [0u8; 6];
    timeout(STEP, quiet.read_exact(&mut hello))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&hello, b"hello\n");
}
