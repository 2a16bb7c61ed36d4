//! A tiny HTTP/1.1 server, one request per connection: GET /metrics, /healthz, the status
//! page `/` (compiled into the binary) and the JSON it polls, `/api/status` and
//! `/api/events`. Read-only; nothing secret is shown.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{JoinHandle, JoinSet};

/// Largest request head (request line plus headers) accepted.
pub const MAX_HEADER_BYTES: usize = 16 * 1024;
/// Time allowed to receive the request head, and separately to write the response.
pub const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections served at once; further ones are closed immediately.
const MAX_CONNECTIONS: usize = 128;
/// Most headers parsed per request.
const MAX_HEADERS: usize = 64;

/// What the server answers; implemented by the daemon.
pub trait HttpState: Send + Sync + 'static {
    /// Prometheus text exposition.
    fn metrics_text(&self) -> String;
    /// (healthy, one-line reason) for /healthz.
    fn health(&self) -> (bool, String);
    /// The cluster as this node sees it, as JSON (`/api/status`); `None` (the default): this
    /// process has no cluster (standalone `spaced lb`), so no status page either.
    fn status_json(&self) -> Option<String> {
        None
    }
    /// Recent events, as a JSON array (`/api/events`).
    fn events_json(&self) -> Option<String> {
        None
    }
}

/// The status page: one self-contained HTML file (styles and script inline).
const STATUS_PAGE: &str = include_str!("status.html");

/// Binds (error names the address and reason, e.g. in use) and returns the bound listener's
/// address plus a future that serves until `shutdown` resolves.
///
/// The returned task stops accepting when `shutdown` resolves and aborts connections still
/// in flight.
pub async fn serve(
    addr: SocketAddr,
    state: Arc<dyn HttpState>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<(SocketAddr, JoinHandle<()>)> {
    let listener = TcpListener::bind(addr).await.map_err(|e| {
        std::io::Error::new(e.kind(), format!("cannot bind HTTP server to {addr}: {e}"))
    })?;
    let local = listener.local_addr().map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!("HTTP server on {addr}: no local address: {e}"),
        )
    })?;
    tracing::info!(addr = %local, "HTTP metrics/health server listening");
    let handle = tokio::spawn(accept_loop(listener, state, shutdown));
    Ok((local, handle))
}

async fn accept_loop(
    listener: TcpListener,
    state: Arc<dyn HttpState>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    let mut conns = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    if conns.len() >= MAX_CONNECTIONS {
                        tracing::warn!(%peer, "HTTP server busy; dropping connection");
                        drop(stream);
                        continue;
                    }
                    let state = Arc::clone(&state);
                    conns.spawn(async move {
                        if let Err(e) = handle_connection(stream, state.as_ref()).await {
                            tracing::debug!(%peer, error = %e, "HTTP connection ended with error");
                        }
                    });
                }
                Err(e) => {
                    // Typically EMFILE/ENFILE; back off instead of spinning.
                    tracing::warn!(error = %e, "HTTP accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
        }
    }
    conns.abort_all();
    tracing::info!("HTTP metrics/health server stopped");
}

/// A response ready to be written.
struct Response {
    /// Status code, e.g. 200.
    status: u16,
    /// Content-Type header value.
    content_type: &'static str,
    /// Extra header lines, each without the trailing CRLF.
    extra_headers: Vec<&'static str>,
    /// Response body.
    body: String,
}

impl Response {
    fn text(status: u16, body: impl Into<String>) -> Self {
        Self {
            status,
            content_type: "text/plain; charset=utf-8",
            extra_headers: Vec::new(),
            body: body.into(),
        }
    }

    fn to_bytes(&self) -> Vec<u8> {
        let mut head = format!(
            "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n",
            self.status,
            reason(self.status),
            self.content_type,
            self.body.len()
        );
        for h in &self.extra_headers {
            head.push_str(h);
            head.push_str("\r\n");
        }
        head.push_str("\r\n");
        let mut bytes = head.into_bytes();
        bytes.extend_from_slice(self.body.as_bytes());
        bytes
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        503 => "Service Unavailable",
        _ => "Unknown",
    }
}

/// Outcome of reading the request head.
#[derive(Debug)]
pub enum Head {
    /// A complete, well-formed request head.
    Request {
        /// The method, as sent.
        method: String,
        /// The request target, as sent.
        path: String,
    },
    /// Unparseable or too large; answer 400 with this reason.
    Bad(&'static str),
    /// The peer closed before sending a full head; nothing to answer.
    Closed,
}

async fn handle_connection(mut stream: TcpStream, state: &dyn HttpState) -> std::io::Result<()> {
    let head = match tokio::time::timeout(IO_TIMEOUT, read_head(&mut stream)).await {
        Ok(result) => result?,
        Err(_) => return Ok(()), // too slow: just close
    };
    let response = match head {
        Head::Closed => return Ok(()),
        Head::Bad(why) => Response::text(400, format!("bad request: {why}\n")),
        Head::Request { method, path } => route(&method, &path, state),
    };
    let bytes = response.to_bytes();
    match tokio::time::timeout(IO_TIMEOUT, async {
        stream.write_all(&bytes).await?;
        stream.shutdown().await
    })
    .await
    {
        Ok(result) => result?,
        Err(_) => return Ok(()),
    }
    // Drain briefly what the client may still send (e.g. a body we ignored) so closing with
    // unread data does not reset the connection before the client reads our response.
    let mut sink = [0u8; 4096];
    let _ = tokio::time::timeout(Duration::from_millis(500), async {
        let mut total = 0usize;
        while total < 64 * 1024 {
            match stream.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(n) => total += n,
            }
        }
    })
    .await;
    Ok(())
}

/// Reads until a complete request head is parsed, the limit is hit or the peer closes. Public
/// for the fuzz targets (`fuzz/`), which feed it bytes.
pub async fn read_head<R: tokio::io::AsyncRead + Unpin>(stream: &mut R) -> std::io::Result<Head> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 2048];
    loop {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Ok(if buf.is_empty() {
                Head::Closed
            } else {
                Head::Bad("incomplete request")
            });
        }
        buf.extend_from_slice(&chunk[..n]);
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(&buf) {
            Ok(httparse::Status::Complete(_)) => {
                let (Some(method), Some(path)) = (req.method, req.path) else {
                    return Ok(Head::Bad("malformed request line"));
                };
                return Ok(Head::Request {
                    method: method.to_string(),
                    path: path.to_string(),
                });
            }
            Ok(httparse::Status::Partial) => {
                if buf.len() >= MAX_HEADER_BYTES {
                    return Ok(Head::Bad("request header too large"));
                }
            }
            Err(httparse::Error::TooManyHeaders) => return Ok(Head::Bad("too many headers")),
            Err(_) => return Ok(Head::Bad("malformed request")),
        }
    }
}

fn route(method: &str, target: &str, state: &dyn HttpState) -> Response {
    let path = target.split(['?', '#']).next().unwrap_or(target);
    let known = ["/metrics", "/healthz", "/", "/api/status", "/api/events"];
    if !known.contains(&path) {
        return Response::text(404, "not found\n");
    }
    if method != "GET" {
        let mut r = Response::text(405, "method not allowed\n");
        r.extra_headers.push("Allow: GET");
        return r;
    }
    let json = |body: String| Response {
        status: 200,
        content_type: "application/json",
        extra_headers: vec!["Cache-Control: no-store"],
        body,
    };
    let page = |body: Option<String>| match body {
        Some(b) => json(b),
        None => Response::text(404, "no cluster here\n"),
    };
    if path == "/" {
        match state.status_json() {
            Some(_) => Response {
                status: 200,
                content_type: "text/html; charset=utf-8",
                extra_headers: vec!["Cache-Control: no-store"],
                body: STATUS_PAGE.to_string(),
            },
            None => Response::text(404, "no cluster here: /metrics and /healthz only\n"),
        }
    } else if path == "/api/status" {
        page(state.status_json())
    } else if path == "/api/events" {
        page(state.events_json())
    } else if path == "/metrics" {
        Response {
            status: 200,
            content_type: "text/plain; version=0.0.4",
            extra_headers: Vec::new(),
            body: state.metrics_text(),
        }
    } else {
        let (healthy, why) = state.health();
        if healthy {
            Response::text(200, format!("ok: {why}"))
        } else {
            Response::text(503, format!("unhealthy: {why}"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};

    struct TestState {
        healthy: AtomicBool,
    }

    impl HttpState for TestState {
        fn metrics_text(&self) -> String {
            "# TYPE up gauge\nup 1\n".to_string()
        }
        fn health(&self) -> (bool, String) {
            let h = self.healthy.load(Ordering::SeqCst);
            (
                h,
                if h {
                    "leader known".into()
                } else {
                    "no leader".into()
                },
            )
        }
        fn status_json(&self) -> Option<String> {
            Some(r#"{"leader":1}"#.into())
        }
        fn events_json(&self) -> Option<String> {
            Some("[]".into())
        }
    }

    async fn start(
        healthy: bool,
    ) -> (
        SocketAddr,
        Arc<TestState>,
        tokio::sync::oneshot::Sender<()>,
        JoinHandle<()>,
    ) {
        let state = Arc::new(TestState {
            healthy: AtomicBool::new(healthy),
        });
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let (addr, handle) = serve("127.0.0.1:0".parse().unwrap(), state.clone(), async {
            let _ = rx.await;
        })
        .await
        .unwrap();
        (addr, state, tx, handle)
    }

    /// Sends raw bytes and returns everything the server wrote before closing.
    async fn exchange(addr: SocketAddr, request: &[u8]) -> String {
        let mut s = TcpStream::connect(addr).await.unwrap();
        // The server may close before reading everything (oversized input); ignore that.
        let _ = s.write_all(request).await;
        let _ = s.shutdown().await;
        let mut out = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out))
            .await
            .expect("server did not close the connection");
        String::from_utf8_lossy(&out).into_owned()
    }

    fn get(path: &str) -> Vec<u8> {
        format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").into_bytes()
    }

    #[tokio::test]
    async fn metrics_body_returned() {
        let (addr, _s, _tx, _h) = start(true).await;
        let resp = exchange(addr, &get("/metrics")).await;
        assert!(resp.starts_with("HTTP/1.1 200 OK\r\n"), "{resp}");
        assert!(
            resp.contains("Content-Type: text/plain; version=0.0.4\r\n"),
            "{resp}"
        );
        assert!(resp.contains("Connection: close\r\n"), "{resp}");
        assert!(resp.contains("Content-Length: 21\r\n"), "{resp}");
        assert!(resp.ends_with("\r\n\r\n# TYPE up gauge\nup 1\n"), "{resp}");
        // query strings are ignored
        let resp = exchange(addr, &get("/metrics?x=1")).await;
        assert!(resp.starts_with("HTTP/1.1 200 OK\r\n"), "{resp}");
    }

    #[tokio::test]
    async fn the_status_page_and_its_json_are_served() {
        let (addr, _s, _tx, _h) = start(true).await;
        let resp = exchange(addr, &get("/")).await;
        assert!(resp.starts_with("HTTP/1.1 200 OK\r\n"), "{resp}");
        assert!(resp.contains("Content-Type: text/html; charset=utf-8\r\n"));
        assert!(resp.contains("/api/status") && resp.contains("<title>spaced"));
        let resp = exchange(addr, &get("/api/status")).await;
        assert!(
            resp.contains("Content-Type: application/json\r\n"),
            "{resp}"
        );
        assert!(resp.ends_with("\r\n\r\n{\"leader\":1}"), "{resp}");
        let resp = exchange(addr, &get("/api/events")).await;
        assert!(resp.ends_with("\r\n\r\n[]"), "{resp}");
    }

    #[tokio::test]
    async fn healthz_reflects_state() {
        let (addr, state, _tx, _h) = start(true).await;
        let resp = exchange(addr, &get("/healthz")).await;
        assert!(resp.starts_with("HTTP/1.1 200 OK\r\n"), "{resp}");
        assert!(resp.ends_with("\r\n\r\nok: leader known"), "{resp}");
        state.healthy.store(false, Ordering::SeqCst);
        let resp = exchange(addr, &get("/healthz")).await;
        assert!(
            resp.starts_with("HTTP/1.1 503 Service Unavailable\r\n"),
            "{resp}"
        );
        assert!(resp.ends_with("\r\n\r\nunhealthy: no leader"), "{resp}");
    }

    #[tokio::test]
    async fn unknown_path_and_method() {
        let (addr, _s, _tx, _h) = start(true).await;
        let resp = exchange(addr, &get("/nope")).await;
        assert!(resp.starts_with("HTTP/1.1 404 Not Found\r\n"), "{resp}");
        let resp = exchange(
            addr,
            b"POST /metrics HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc",
        )
        .await;
        assert!(
            resp.starts_with("HTTP/1.1 405 Method Not Allowed\r\n"),
            "{resp}"
        );
        assert!(resp.contains("Allow: GET\r\n"), "{resp}");
    }

    #[tokio::test]
    async fn garbage_gets_400() {
        let (addr, _s, _tx, _h) = start(true).await;
        let resp = exchange(addr, b"\x00\x01\x02 garbage\r\n\r\n").await;
        assert!(resp.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{resp}");
        // half a request, then EOF: answered 400 without waiting for the timeout
        let resp = exchange(addr, b"GET /metrics HTTP/1.1\r\nHost").await;
        assert!(resp.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{resp}");
        // server still alive afterwards
        let resp = exchange(addr, &get("/metrics")).await;
        assert!(resp.starts_with("HTTP/1.1 200 OK\r\n"), "{resp}");
    }

    #[tokio::test]
    async fn oversized_header_rejected() {
        let (addr, _s, _tx, _h) = start(true).await;
        let mut req = b"GET /metrics HTTP/1.1\r\nX-Big: ".to_vec();
        req.extend(std::iter::repeat_n(b'a', 64 * 1024));
        req.extend_from_slice(b"\r\n\r\n");
        let resp = exchange(addr, &req).await;
        assert!(
            resp.is_empty() || resp.starts_with("HTTP/1.1 400 Bad Request\r\n"),
            "{resp}"
        );
        let many: String = (0..100).map(|i| format!("X-{i}: v\r\n")).collect();
        let resp = exchange(
            addr,
            format!("GET /metrics HTTP/1.1\r\n{many}\r\n").as_bytes(),
        )
        .await;
        assert!(resp.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{resp}");
    }

    #[tokio::test]
    async fn bind_error_names_address_and_shutdown_stops() {
        let (addr, state, tx, handle) = start(true).await;
        let err = serve(addr, state, async {}).await.unwrap_err();
        assert!(err.to_string().contains(&addr.to_string()), "{err}");
        assert_eq!(err.kind(), std::io::ErrorKind::AddrInUse);
        tx.send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(5), handle)
            .await
            .unwrap()
            .unwrap();
        assert!(TcpStream::connect(addr).await.is_err());
    }
}
