//! Session stickiness from peeked bytes: does a connection open with an HTTP request whose `JSESSIONID` names a backend route?
//!
//! Servlet containers such as Tomcat append the node name (`jvmRoute`) to
//! the session id, `JSESSIONID=<id>.<route>`. The balancer peeks the first
//! bytes of a connection without consuming them and sends requests carrying
//! a route to the backend of that name, so a session stays on the node that
//! holds it. Everything here is pure: bytes in, a decision out.
//!
//! Where the session id is looked for, in order:
//!
//! 1. the `JSESSIONID` cookie (name matched case-insensitively) in any
//!    `Cookie` header; the first one with a value decides, even if it
//!    carries no route, because that is the session the container will
//!    use (an empty one, as left by a logout on some path, is skipped: no
//!    container takes it for a session);
//! 2. otherwise a `;jsessionid=<id>` path parameter in the request target
//!    (URL rewriting, for clients without cookies).
//!
//! The route is what follows the last `.` of the id; it must be non-empty
//! and made of `[A-Za-z0-9_-]`, like a node name.

use httparse::Status;

/// How many bytes the balancer peeks by default: room for a request head
/// with a typical browser's cookies, small enough to bound per-connection
/// work before a backend is chosen.
pub const DEFAULT_PEEK_BYTES: usize = 4096;

/// Most headers parsed; a request head with more is not worth waiting for
/// and gets the normal policy.
const MAX_HEADERS: usize = 64;

/// Longest method token accepted. Real methods are short (the longest
/// registered ones are under 20 bytes); without a cap a binary protocol that
/// happens to start with letters would keep us peeking until the bound.
const MAX_METHOD_LEN: usize = 32;

/// The session cookie and path-parameter name, compared case-insensitively.
const SESSION_NAME: &[u8] = b"jsessionid";

/// What the first bytes of a connection say about session stickiness.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Peeked {
    /// An HTTP request whose JSESSIONID ends in `.<route>`; the route names a backend (node name).
    Route(String),
    /// Decided: no route (not HTTP, complete request head without a session id, session id without a `.route` suffix, malformed). Use the normal policy now.
    NoRoute,
    /// Could still become an HTTP request with a route: the caller should peek more (until its size/time bound).
    Incomplete,
}

/// Decides from the first bytes of a connection whether it is an HTTP
/// request carrying a session route (see the module docs for where the
/// session id is looked for). Never panics, whatever the bytes.
pub fn session_route(buf: &[u8]) -> Peeked {
    match buf.first() {
        None => return Peeked::Incomplete,
        // Every HTTP method starts with an uppercase letter; TLS records
        // (0x16) and most binary protocols do not.
        Some(byte) if !byte.is_ascii_uppercase() => return Peeked::NoRoute,
        Some(_) => {}
    }
    if !method_may_still_end(buf) {
        return Peeked::NoRoute;
    }

    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut headers);
    match request.parse(buf) {
        // Includes `TooManyHeaders` and invalid tokens seen so far.
        Err(_) => Peeked::NoRoute,
        Ok(Status::Partial) => Peeked::Incomplete,
        Ok(Status::Complete(_)) => {
            let from_cookie = request
                .headers
                .iter()
                .filter(|header| header.name.eq_ignore_ascii_case("cookie"))
                .find_map(|header| session_in_cookie_header(header.value));
            let session = match from_cookie {
                Some(id) => id,
                None => match request.path.and_then(session_in_target) {
                    Some(id) => id,
                    None => return Peeked::NoRoute,
                },
            };
            route_of(session)
        }
    }
}

/// Whether the method token (the bytes before the first space) has either
/// ended or is still short enough to be a real method.
fn method_may_still_end(buf: &[u8]) -> bool {
    let window = &buf[..buf.len().min(MAX_METHOD_LEN + 1)];
    window.contains(&b' ') || buf.len() <= MAX_METHOD_LEN
}

/// The value of the first non-empty `JSESSIONID` cookie in one `Cookie`
/// header value (`a=1; JSESSIONID="abc.n1"; b=2`), surrounding quotes removed.
fn session_in_cookie_header(value: &[u8]) -> Option<&[u8]> {
    value.split(|&byte| byte == b';').find_map(|cookie| {
        let eq = cookie.iter().position(|&byte| byte == b'=')?;
        let (name, rest) = cookie.split_at(eq);
        if !trim(name).eq_ignore_ascii_case(SESSION_NAME) {
            return None;
        }
        Some(strip_quotes(trim(&rest[1..]))).filter(|id| !id.is_empty())
    })
}

/// The value of a `;jsessionid=` path parameter in a request target. Only
/// the path is searched (not the query or fragment); the value ends at the
/// next `?`, `#`, `;`, `/` or the end.
fn session_in_target(target: &str) -> Option<&[u8]> {
    let target = target.as_bytes();
    let path_end = target
        .iter()
        .position(|&byte| byte == b'?' || byte == b'#')
        .unwrap_or(target.len());
    let path = &target[..path_end];
    path.iter()
        .enumerate()
        .filter(|&(_, &byte)| byte == b';')
        .find_map(|(semicolon, _)| {
            let param = &path[semicolon + 1..];
            let name = param.get(..SESSION_NAME.len())?;
            if !name.eq_ignore_ascii_case(SESSION_NAME)
                || param.get(SESSION_NAME.len()) != Some(&b'=')
            {
                return None;
            }
            let value = &param[SESSION_NAME.len() + 1..];
            let end = value
                .iter()
                .position(|&byte| matches!(byte, b'?' | b'#' | b';' | b'/'))
                .unwrap_or(value.len());
            Some(&value[..end])
        })
}

/// The route suffix of a session id: after the last `.`, non-empty, made of
/// node-name characters.
fn route_of(session: &[u8]) -> Peeked {
    let Some(dot) = session.iter().rposition(|&byte| byte == b'.') else {
        return Peeked::NoRoute;
    };
    let route = &session[dot + 1..];
    let valid = !route.is_empty()
        && route
            .iter()
            .all(|&byte| byte.is_ascii_alphanumeric() || byte == b'_' || byte == b'-');
    if valid {
        Peeked::Route(route.iter().map(|&byte| char::from(byte)).collect())
    } else {
        Peeked::NoRoute
    }
}

/// `bytes` without leading and trailing spaces and tabs (cookie syntax).
fn trim(bytes: &[u8]) -> &[u8] {
    let is_blank = |byte: &u8| *byte == b' ' || *byte == b'\t';
    let start = bytes
        .iter()
        .position(|byte| !is_blank(byte))
        .unwrap_or(bytes.len());
    let end = bytes
        .iter()
        .rposition(|byte| !is_blank(byte))
        .map_or(start, |last| last + 1);
    &bytes[start..end]
}

/// A cookie value without its surrounding double quotes, if it has both.
fn strip_quotes(value: &[u8]) -> &[u8] {
    match value {
        [b'"', inner @ .., b'"'] => inner,
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(name: &str) -> Peeked {
        Peeked::Route(name.to_string())
    }

    /// A complete request head with the given target and extra header lines.
    fn request(target: &str, headers: &[&str]) -> Vec<u8> {
        let mut head = format!("GET {target} HTTP/1.1\r\nHost: app.example\r\n");
        for header in headers {
            head.push_str(header);
            head.push_str("\r\n");
        }
        head.push_str("\r\n");
        head.into_bytes()
    }

    #[test]
    fn complete_requests_decide_by_cookie_then_path() {
        let cases: &[(&str, &str, &[&str], Peeked)] = &[
            (
                "cookie route",
                "/",
                &["Cookie: JSESSIONID=ABC123.node1"],
                route("node1"),
            ),
            (
                "path route",
                "/shop;jsessionid=ABC123.node2",
                &[],
                route("node2"),
            ),
            (
                "path route before query",
                "/shop/cart;jsessionid=ABC.n-3?item=4.5",
                &[],
                route("n-3"),
            ),
            (
                "path route ends at next segment",
                "/a;jsessionid=ABC.n_4/b.c",
                &[],
                route("n_4"),
            ),
            (
                "path parameter name any case",
                "/;JSessionId=X.n5",
                &[],
                route("n5"),
            ),
            (
                "cookie beats path",
                "/;jsessionid=X.frompath",
                &["Cookie: JSESSIONID=Y.fromcookie"],
                route("fromcookie"),
            ),
            (
                "cookie without route still beats path",
                "/;jsessionid=X.frompath",
                &["Cookie: JSESSIONID=Y"],
                Peeked::NoRoute,
            ),
            (
                "several cookies, odd spacing",
                "/",
                &["Cookie: theme=dark;lang=en ;  jsessionid = 9F.n7 ; x=y"],
                route("n7"),
            ),
            (
                "several cookie headers",
                "/",
                &["cookie: a=1", "Accept: */*", "COOKIE: b=2; JSESSIONID=Z.n8"],
                route("n8"),
            ),
            (
                "first session cookie wins",
                "/",
                &["Cookie: JSESSIONID=A.first", "Cookie: JSESSIONID=B.second"],
                route("first"),
            ),
            (
                "route after last dot",
                "/",
                &["Cookie: JSESSIONID=a.b.c.n9"],
                route("n9"),
            ),
            (
                "quoted value",
                "/",
                &["Cookie: JSESSIONID=\"Q1.n10\""],
                route("n10"),
            ),
            (
                "no session at all",
                "/index.html",
                &["Cookie: a=b"],
                Peeked::NoRoute,
            ),
            ("no cookie header", "/", &[], Peeked::NoRoute),
            (
                "session without dot",
                "/",
                &["Cookie: JSESSIONID=ABC123"],
                Peeked::NoRoute,
            ),
            (
                "empty route",
                "/",
                &["Cookie: JSESSIONID=ABC123."],
                Peeked::NoRoute,
            ),
            (
                "empty session",
                "/",
                &["Cookie: JSESSIONID="],
                Peeked::NoRoute,
            ),
            (
                "an empty session cookie is skipped",
                "/",
                &[
                    "Cookie: JSESSIONID=; a=1",
                    "Cookie: JSESSIONID=\"\"; JSESSIONID=C.n3",
                ],
                route("n3"),
            ),
            (
                "an empty session cookie does not hide the path parameter",
                "/x;jsessionid=D.n4",
                &["Cookie: JSESSIONID="],
                route("n4"),
            ),
            (
                "route with bad chars",
                "/",
                &["Cookie: JSESSIONID=A.n1!x"],
                Peeked::NoRoute,
            ),
            (
                "route with space",
                "/",
                &["Cookie: JSESSIONID=\"A.n 1\""],
                Peeked::NoRoute,
            ),
            (
                "similar cookie name",
                "/",
                &["Cookie: XJSESSIONID=A.n1; JSESSIONIDX=B.n2"],
                Peeked::NoRoute,
            ),
            (
                "jsessionid in query only",
                "/p?;jsessionid=A.n1",
                &[],
                Peeked::NoRoute,
            ),
            (
                "path parameter without =",
                "/;jsessionid",
                &[],
                Peeked::NoRoute,
            ),
            (
                "empty path route",
                "/;jsessionid=A.?x",
                &[],
                Peeked::NoRoute,
            ),
        ];
        for (name, target, headers, want) in cases {
            let got = session_route(&request(target, headers));
            assert_eq!(&got, want, "case {name:?}");
        }
    }

    #[test]
    fn other_methods_and_versions_are_understood() {
        let post =
            b"POST /login HTTP/1.0\r\nCookie: JSESSIONID=S.n1\r\nContent-Length: 3\r\n\r\nabc";
        assert_eq!(session_route(post), route("n1"));
    }

    #[test]
    fn non_http_is_decided_at_once() {
        let cases: &[(&str, &[u8])] = &[
            (
                "tls client hello",
                &[0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01],
            ),
            ("lowercase method", b"get / HTTP/1.1\r\n"),
            ("leading newline", b"\r\nGET / HTTP/1.1\r\n\r\n"),
            ("binary", &[0x00, 0xff, 0x13, 0x37]),
            ("bad token in method", b"GE\x01T / HTTP/1.1"),
            ("redis inline command", b"PING\r\n"),
            ("http/2 preface", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"),
            ("bad version", b"GET / SMTP/1.1\r\n\r\n"),
            ("letters without end", &[b'A'; 200]),
            (
                "header without colon",
                b"GET / HTTP/1.1\r\nbroken header\r\n\r\n",
            ),
        ];
        for (name, bytes) in cases {
            assert_eq!(session_route(bytes), Peeked::NoRoute, "case {name:?}");
        }
    }

    #[test]
    fn partial_heads_ask_for_more() {
        let cases: &[&[u8]] = &[
            b"",
            b"G",
            b"GET",
            b"GET /shop;jsessionid=A.n1",
            b"GET / HTTP/1.1\r\n",
            b"GET / HTTP/1.1\r\nCookie: JSESSIONID=A.n1\r\n",
            b"GET / HTTP/1.1\r\nCookie: JSESSIONID=A.n1\r\n\r",
        ];
        for bytes in cases {
            assert_eq!(
                session_route(bytes),
                Peeked::Incomplete,
                "prefix {:?}",
                String::from_utf8_lossy(bytes)
            );
        }
    }

    #[test]
    fn every_prefix_is_incomplete_or_the_final_answer() {
        let requests = [
            request("/", &["Cookie: a=1; JSESSIONID=ABC.node1; b=2"]),
            request("/x;jsessionid=ABC.node2?q=1", &["Accept: */*"]),
            request("/", &["Cookie: JSESSIONID=ABC"]),
            request("/plain", &[]),
        ];
        let finals = [
            route("node1"),
            route("node2"),
            Peeked::NoRoute,
            Peeked::NoRoute,
        ];
        for (bytes, want) in requests.iter().zip(finals) {
            assert_eq!(session_route(bytes), want);
            for cut in 0..bytes.len() {
                let got = session_route(&bytes[..cut]);
                assert!(
                    got == Peeked::Incomplete || got == want,
                    "prefix of {cut} bytes of {:?} gave {got:?}, final answer is {want:?}",
                    String::from_utf8_lossy(bytes)
                );
            }
        }
    }

    #[test]
    fn too_many_headers_is_no_route_not_a_panic() {
        let filler: Vec<String> = (0..MAX_HEADERS + 1).map(|i| format!("X-H{i}: v")).collect();
        let mut lines: Vec<&str> = filler.iter().map(String::as_str).collect();
        lines.push("Cookie: JSESSIONID=A.n1");
        assert_eq!(session_route(&request("/", &lines)), Peeked::NoRoute);

        // Just under the limit still works.
        let lines: Vec<&str> = filler[..MAX_HEADERS - 2]
            .iter()
            .map(String::as_str)
            .chain(["Cookie: JSESSIONID=A.n1"])
            .collect();
        assert_eq!(session_route(&request("/", &lines)), route("n1"));
    }

    #[test]
    fn non_utf8_bytes_do_not_panic() {
        let cases: &[&[u8]] = &[
            b"GET /\xff\xfe HTTP/1.1\r\n\r\n",
            b"GET / HTTP/1.1\r\nCookie: JSESSIONID=\xff\xfe.n1\r\n\r\n",
            b"GET / HTTP/1.1\r\nCookie: JSESSIONID=A.\xc3\xa9\r\n\r\n",
            b"GET / HTTP/1.1\r\nX-Bin: \x80\x81\r\nCookie: JSESSIONID=A.n1\r\n\r\n",
        ];
        for bytes in cases {
            let got = session_route(bytes);
            assert!(got == Peeked::NoRoute || got == route("n1"), "{got:?}");
        }
        // A non-UTF-8 session id still has a valid ASCII route.
        assert_eq!(session_route(cases[1]), route("n1"));
        assert_eq!(session_route(cases[2]), Peeked::NoRoute);
    }

    /// Tiny deterministic xorshift64 PRNG so the fuzz-like test needs no crate.
    struct XorShift(u64);

    impl XorShift {
        fn next(&mut self) -> u64 {
            let mut x = self.0;
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            self.0 = x;
            x
        }

        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }

    fn assert_well_formed(got: &Peeked, input: &[u8]) {
        if let Peeked::Route(name) = got {
            assert!(
                !name.is_empty()
                    && name
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-'),
                "invalid route {name:?} from {input:?}"
            );
        }
    }

    #[test]
    fn random_and_mutated_bytes_never_panic() {
        let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
        let valid = request("/a;jsessionid=S.p1", &["Cookie: x=1; JSESSIONID=\"S.n1\""]);
        for round in 0..20_000 {
            let input: Vec<u8> = if round % 2 == 0 {
                let len = rng.below(300);
                // Bias the first byte to an uppercase letter so the parser runs.
                (0..len)
                    .map(|i| {
                        if i == 0 {
                            b'A' + rng.below(26) as u8
                        } else {
                            rng.next() as u8
                        }
                    })
                    .collect()
            } else {
                let mut bytes = valid.clone();
                for _ in 0..1 + rng.below(4) {
                    let at = rng.below(bytes.len());
                    bytes[at] = rng.next() as u8;
                }
                bytes.truncate(rng.below(bytes.len() + 1));
                bytes
            };
            let got = session_route(&input);
            assert_well_formed(&got, &input);
        }
    }
}
