//! Criterion benchmarks of the per-connection hot path: peek, backend choice, PROXY header, splice relay throughput, and small round trips spliced or copied.

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use spaced_lb::maglev::{Maglev, hash_ip};
use spaced_lb::peek::session_route;
use spaced_lb::proxy_v2;
use spaced_lb::relay::{COPY_BUFFER, PipePool, RelayCounters, relay, relay_counted};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A browser's GET with several cookies, the session one carrying route `n2`.
const BROWSER_GET: &[u8] = b"GET /shop/cart/items?page=2&sort=price HTTP/1.1\r\n\
Host: shop.example.com\r\n\
User-Agent: Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0\r\n\
Accept: text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8\r\n\
Accept-Language: en-GB,en;q=0.5\r\n\
Accept-Encoding: gzip, deflate, br\r\n\
Referer: https://shop.example.com/shop/cart\r\n\
Connection: keep-alive\r\n\
Cookie: _ga=GA1.2.1234567890.1700000000; theme=dark; lang=en; JSESSIONID=8F3A1C0D9E7B6A5F4E3D2C1B0A998877.n2; consent=yes\r\n\
Upgrade-Insecure-Requests: 1\r\n\
\r\n";

/// A GET without any session id: the parser must read the whole head.
const ANONYMOUS_GET: &[u8] = b"GET /static/app.js HTTP/1.1\r\n\
Host: shop.example.com\r\n\
User-Agent: Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0\r\n\
Accept: */*\r\n\
Accept-Language: en-GB,en;q=0.5\r\n\
Accept-Encoding: gzip, deflate, br\r\n\
Referer: https://shop.example.com/\r\n\
Connection: keep-alive\r\n\
Cookie: _ga=GA1.2.1234567890.1700000000; theme=dark; lang=en\r\n\
\r\n";

/// The start of a TLS 1.3 ClientHello record.
const TLS_HELLO: &[u8] = &[
    0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03, 0x5a, 0x7e, 0x11, 0x02, 0x9c,
];

/// Bytes pushed client → backend per relay iteration.
const RELAY_BYTES: usize = 64 << 20;

fn peek(c: &mut Criterion) {
    let mut group = c.benchmark_group("peek");
    group.bench_function("browser_get_with_session", |b| {
        b.iter(|| session_route(black_box(BROWSER_GET)))
    });
    group.bench_function("browser_get_without_session", |b| {
        b.iter(|| session_route(black_box(ANONYMOUS_GET)))
    });
    group.bench_function("tls_client_hello", |b| {
        b.iter(|| session_route(black_box(TLS_HELLO)))
    });
    group.finish();
}

fn backend_names(n: usize) -> Vec<String> {
    (1..=n).map(|i| format!("node{i}")).collect()
}

fn maglev(c: &mut Criterion) {
    let mut group = c.benchmark_group("maglev");
    let client = IpAddr::V4(Ipv4Addr::new(203, 0, 113, 77));
    for n in [3, 16] {
        let table = match Maglev::new(&backend_names(n), Maglev::DEFAULT_SIZE) {
            Ok(table) => table,
            Err(error) => panic!("building the bench table: {error}"),
        };
        group.bench_function(format!("lookup_hash_ip_v4_{n}_backends"), |b| {
            b.iter(|| table.lookup(hash_ip(black_box(client))))
        });
    }
    let three = backend_names(3);
    group.bench_function("build_3_backends", |b| {
        b.iter(|| Maglev::new(black_box(&three), Maglev::DEFAULT_SIZE))
    });
    group.finish();
}

fn proxy_header(c: &mut Criterion) {
    let mut group = c.benchmark_group("proxy_v2");
    let client = SocketAddr::from(([192, 0, 2, 10], 51234));
    let local = SocketAddr::from(([198, 51, 100, 1], 443));
    group.bench_function("encode_v4", |b| {
        b.iter(|| proxy_v2::encode(black_box(client), black_box(local)))
    });
    group.finish();
}

/// One relayed connection on loopback: returns how long it took to push
/// `RELAY_BYTES` from the client through the relay to the backend.
/// The relay and the backend run as their own tasks, as in the balancer, so
/// the two runtime threads can work in parallel.
async fn relay_once(pool: &Arc<PipePool>, chunk: &[u8]) -> std::io::Result<Duration> {
    let front = TcpListener::bind("127.0.0.1:0").await?;
    let back = TcpListener::bind("127.0.0.1:0").await?;
    let (client, accepted) = tokio::try_join!(TcpStream::connect(front.local_addr()?), async {
        front.accept().await.map(|(stream, _)| stream)
    })?;
    let (to_backend, mut backend) =
        tokio::try_join!(TcpStream::connect(back.local_addr()?), async {
            back.accept().await.map(|(stream, _)| stream)
        })?;

    let start = Instant::now();
    let pool = Arc::clone(pool);
    let relayed =
        tokio::spawn(
            async move { relay(accepted, to_backend, &pool, Duration::from_secs(30)).await },
        );
    let send = async {
        let mut client = client;
        let mut left = RELAY_BYTES;
        while left > 0 {
            let n = left.min(chunk.len());
            client.write_all(&chunk[..n]).await?;
            left -= n;
        }
        client.shutdown().await?;
        // Hold the client until the backend closes, so the relay sees a
        // clean half-close both ways.
        let mut rest = Vec::new();
        client.read_to_end(&mut rest).await?;
        Ok::<_, std::io::Error>(())
    };
    let receive = tokio::spawn(async move {
        let mut buf = vec![0u8; 1 << 20];
        let mut total = 0;
        loop {
            let n = backend.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            total += n;
        }
        let elapsed = start.elapsed();
        backend.shutdown().await?;
        drop(backend);
        if total != RELAY_BYTES {
            return Err(std::io::Error::other(format!(
                "backend received {total} bytes, expected {RELAY_BYTES}"
            )));
        }
        Ok(elapsed)
    });
    send.await?;
    relayed
        .await
        .map_err(std::io::Error::other)?
        .map_err(std::io::Error::other)?;
    receive.await.map_err(std::io::Error::other)?
}

/// Size of the message each round trip of [`small_exchange`] sends and gets back.
const EXCHANGE_BYTES: usize = 200;

/// How the proxy of [`small_exchange`] moves bytes.
#[derive(Clone, Copy)]
enum Path {
    /// The relay as the balancer runs it: small messages are copied.
    Relay,
    /// The relay after a first exchange of [`COPY_BUFFER`] bytes each way
    /// switched both directions to splice.
    Spliced,
    /// tokio's `copy_bidirectional` through 64 KiB user-space buffers.
    TokioCopy,
}

/// client ⇄ proxy ⇄ echo backend on loopback, all with `TCP_NODELAY` as in
/// the balancer. Returns the client end.
async fn exchange_path(path: Path, pool: Arc<PipePool>) -> std::io::Result<TcpStream> {
    let front = TcpListener::bind("127.0.0.1:0").await?;
    let back = TcpListener::bind("127.0.0.1:0").await?;
    let back_addr = back.local_addr()?;
    tokio::spawn(async move {
        let (mut echo, _) = back.accept().await?;
        echo.set_nodelay(true)?;
        let (mut from, mut to) = echo.split();
        tokio::io::copy(&mut from, &mut to).await
    });
    let (mut client, accepted) =
        tokio::try_join!(TcpStream::connect(front.local_addr()?), async {
            front.accept().await.map(|(stream, _)| stream)
        })?;
    let upstream = TcpStream::connect(back_addr).await?;
    for stream in [&client, &accepted, &upstream] {
        stream.set_nodelay(true)?;
    }
    let spliced = Arc::new(RelayCounters::default());
    let counted = Arc::clone(&spliced);
    tokio::spawn(async move {
        match path {
            Path::Relay | Path::Spliced => {
                let copied = RelayCounters::default();
                let idle = Duration::from_secs(300);
                relay_counted(accepted, upstream, &pool, idle, &counted, &copied)
                    .await
                    .map(|_| ())
                    .map_err(std::io::Error::other)
            }
            Path::TokioCopy => {
                let (mut accepted, mut upstream) = (accepted, upstream);
                tokio::io::copy_bidirectional_with_sizes(
                    &mut accepted,
                    &mut upstream,
                    64 << 10,
                    64 << 10,
                )
                .await
                .map(|_| ())
            }
        }
    });
    if let Path::Spliced = path {
        // A direction switches once one read fills its buffer; a read can
        // come up short, so exchange until both directions splice.
        let bulk = vec![0x5au8; 4 * COPY_BUFFER];
        let mut back = vec![0u8; bulk.len()];
        let both = || {
            spliced.client_to_backend.load(Ordering::Relaxed) > 0
                && spliced.backend_to_client.load(Ordering::Relaxed) > 0
        };
        for _ in 0..100 {
            if both() {
                break;
            }
            client.write_all(&bulk).await?;
            client.read_exact(&mut back).await?;
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        if !both() {
            return Err(std::io::Error::other("the relay never switched to splice"));
        }
    }
    Ok(client)
}

/// The runtime (two workers, as on the 2-core machine) and pipe pool the relay benches share.
fn relay_setup() -> (tokio::runtime::Runtime, Arc<PipePool>) {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => panic!("building the tokio runtime: {error}"),
    };
    (runtime, Arc::new(PipePool::new(8, 1 << 20)))
}

/// Where splice does not pay: a request-sized message and its echo per
/// round trip, through the relay as it runs (copying small messages), the
/// relay forced to splice, and tokio's copy (client and echo backend costs
/// are the same on all paths).
fn small_exchange(c: &mut Criterion) {
    let (runtime, pool) = relay_setup();
    let mut group = c.benchmark_group("round_trip_200B");
    for (name, path) in [
        ("relay", Path::Relay),
        ("splice", Path::Spliced),
        ("copy", Path::TokioCopy),
    ] {
        let client = match runtime.block_on(exchange_path(path, Arc::clone(&pool))) {
            Ok(client) => Arc::new(tokio::sync::Mutex::new(client)),
            Err(error) => panic!("setting up the {name} path: {error}"),
        };
        group.bench_function(name, |b| {
            b.to_async(&runtime).iter_custom(|iters| {
                let client = Arc::clone(&client);
                async move {
                    let mut client = client.lock().await;
                    let message = [0x42u8; EXCHANGE_BYTES];
                    let mut echoed = [0u8; EXCHANGE_BYTES];
                    let start = Instant::now();
                    for _ in 0..iters {
                        let round = async {
                            client.write_all(&message).await?;
                            client.read_exact(&mut echoed).await
                        };
                        if let Err(error) = round.await {
                            panic!("{name} round trip failed: {error}");
                        }
                    }
                    start.elapsed()
                }
            })
        });
    }
    group.finish();
}

fn relay_throughput(c: &mut Criterion) {
    let (runtime, pool) = relay_setup();
    let chunk = vec![0x5au8; 256 << 10];

    let mut group = c.benchmark_group("relay");
    group.sample_size(10);
    group.throughput(Throughput::Bytes(RELAY_BYTES as u64));
    group.bench_function("loopback_64MiB_one_way", |b| {
        b.to_async(&runtime).iter_custom(|iters| {
            let (pool, chunk) = (&pool, &chunk);
            async move {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    match relay_once(pool, chunk).await {
                        Ok(elapsed) => total += elapsed,
                        Err(error) => panic!("relay iteration failed: {error}"),
                    }
                }
                total
            }
        })
    });
    group.finish();
}

/// Backend choice per policy over 3 and 16 backends, as done once per new connection.
fn choice(c: &mut Criterion) {
    use spaced_lb::backend::{BackendSpec, Backends, Policy};
    let mut group = c.benchmark_group("choice");
    for n in [3usize, 16] {
        let backends = Backends::new();
        let specs: Vec<BackendSpec> = backend_names(n)
            .into_iter()
            .enumerate()
            .map(|(i, name)| BackendSpec {
                name,
                addr: std::net::SocketAddr::from(([10, 0, 0, 1], 8000 + i as u16)),
            })
            .collect();
        backends.update(&specs);
        let route = specs[n / 2].name.clone();
        let client = std::net::IpAddr::from([192, 0, 2, 7]);
        for policy in [
            Policy::RoundRobin,
            Policy::LeastConn,
            Policy::Sticky,
            Policy::Source,
        ] {
            group.bench_function(format!("{policy}/{n}"), |b| {
                b.iter(|| {
                    black_box(backends.choose(
                        black_box(policy),
                        Some(route.as_str()),
                        black_box(client),
                        &[],
                    ))
                })
            });
        }
    }
    group.finish();
}

criterion_group!(
    benches,
    peek,
    maglev,
    proxy_header,
    choice,
    relay_throughput,
    small_exchange
);
criterion_main!(benches);
