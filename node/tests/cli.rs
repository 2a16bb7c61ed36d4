//! The binaries' command-line contracts: exit codes and one-line errors for bad input.

use std::process::Command;

fn spaced() -> Command {
    Command::new(env!("CARGO_BIN_EXE_spaced"))
}
fn spacectl() -> Command {
    Command::new(env!("CARGO_BIN_EXE_spacectl"))
}

#[test]
fn usage_errors_exit_2() {
    let out = spacectl()
        .args(["node", "add", "--id", "x"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let out = spacectl()
        .env_remove("SPACED_ENDPOINT")
        .args(["status"])
        .env("SPACED_PKI", "/nonexistent")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--endpoint"));
    let out = spaced().args(["run"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn bad_config_exits_2_naming_file_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(&path, "node_id = \"one\"\nname = \"n1\"\n").unwrap();
    let out = spaced()
        .args(["run", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bad.toml") && err.contains("node_id"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");

    let out = spaced()
        .args(["run", "--config"])
        .arg(dir.path().join("missing.toml"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("missing.toml"));
}

#[test]
fn spaced_lb_bad_flags_exit_2_naming_them_and_a_busy_port_exits_1() {
    for (args, needle) in [
        (
            vec!["--listen", "127.0.0.1:0", "--backend", "n1=nowhere"],
            "nowhere",
        ),
        (
            vec![
                "--listen",
                "127.0.0.1:0",
                "--backend",
                "127.0.0.1:80",
                "--policy",
                "random",
            ],
            "random",
        ),
        (
            vec![
                "--listen",
                "127.0.0.1:0",
                "--backend",
                "127.0.0.1:80",
                "--threads",
                "0",
            ],
            "--threads",
        ),
        (
            vec![
                "--listen",
                "127.0.0.1:0",
                "--backend",
                "127.0.0.1:80",
                "--busy-poll-us",
                "5000",
            ],
            "--busy-poll-us: at most 1000",
        ),
        (vec!["--listen", "127.0.0.1:0"], "--backend"),
    ] {
        let out = spaced().arg("lb").args(&args).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(needle), "{args:?}: {err}");
    }
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = busy.local_addr().unwrap().to_string();
    let out = spaced()
        .args(["lb", "--listen", &addr, "--backend", "127.0.0.1:80"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&addr) && err.contains("bind"), "{err}");
}

#[test]
fn spaced_lb_relays_to_its_backend_and_stops_on_sigterm() {
    use std::io::{Read, Write};
    let backend = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let backend_addr = backend.local_addr().unwrap();
    std::thread::spawn(move || {
        for mut s in backend.incoming().flatten() {
            let mut buf = [0u8; 5];
            if s.read_exact(&mut buf).is_ok() {
                let _ = s.write_all(b"pong:");
                let _ = s.write_all(&buf);
            }
        }
    });
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let listen = format!("127.0.0.1:{port}");
    // Two threads, each of which must find its runtime's epoll instance for its busy poll.
    let mut child = spaced()
        .args([
            "lb",
            "--listen",
            &listen,
            "--threads",
            "2",
            "--busy-poll-us",
            "100",
            "--drain-grace-s",
            "0",
        ])
        .arg("--backend")
        .arg(format!("b1={backend_addr}"))
        .env("SPACED_LOG", "warn")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let mut reply = Vec::new();
    while std::time::Instant::now() < deadline {
        if let Ok(mut s) = std::net::TcpStream::connect(&listen) {
            s.write_all(b"ping!").unwrap();
            s.shutdown(std::net::Shutdown::Write).unwrap();
            reply.clear();
            let _ = s.read_to_end(&mut reply);
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(String::from_utf8_lossy(&reply), "pong:ping!");
    assert!(out.status.success(), "{:?}", out.status);
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(!log.contains("epoll descriptor"), "{log}");
}

#[test]
fn pki_issue_admin_flag_and_the_admin_name_option_coexist() {
    let dir = tempfile::tempdir().unwrap();
    let pki = dir.path().join("pki");
    let ok = |args: &[&str]| {
        let out = spacectl().args(args).output().unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    ok(&["pki", "init", "--dir", pki.to_str().unwrap()]);
    ok(&[
        "pki",
        "issue",
        "--dir",
        pki.to_str().unwrap(),
        "--name",
        "ops",
        "--admin",
    ]);
    ok(&[
        "pki",
        "issue",
        "--dir",
        pki.to_str().unwrap(),
        "--name",
        "n1",
    ]);
    assert!(pki.join("admin-ops.pem").exists() && pki.join("n1.pem").exists());
}

/// A free port on 127.0.0.1 (bound, read, released).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// One `/metrics` sample of the standalone balancer, by metric name.
fn lb_metric(metrics: &str, name: &str) -> u64 {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(metrics).unwrap();
    s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with('{'))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or_else(|| panic!("no {name} in:\n{text}")) as u64
}

/// Under a low open-files limit the standalone balancer lowers `--max-conns`
/// to what fits (6 descriptors per connection), so the excess is refused at
/// accept and every accepted connection works, instead of connections failing
/// after accept for want of a pipe or a backend socket.
#[test]
fn spaced_lb_keeps_its_connections_within_the_open_files_limit() {
    use std::io::{Read, Write};
    use std::os::unix::process::CommandExt;
    let backend = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let backend_addr = backend.local_addr().unwrap();
    // Echoes one byte per connection, then holds it open until the client closes.
    std::thread::spawn(move || {
        for mut s in backend.incoming().flatten() {
            std::thread::spawn(move || {
                let mut b = [0u8; 1];
                while s.read_exact(&mut b).is_ok() && s.write_all(&b).is_ok() {}
            });
        }
    });
    let listen = format!("127.0.0.1:{}", free_port());
    let metrics = format!("127.0.0.1:{}", free_port());
    let mut cmd = spaced();
    cmd.args(["lb", "--listen", &listen, "--threads", "1", "--no-health"])
        .args([
            "--drain-grace-s",
            "0",
            "--max-conns",
            "1000",
            "--metrics",
            &metrics,
        ])
        .arg("--backend")
        .arg(format!("b1={backend_addr}"))
        .env("SPACED_LOG", "warn")
        .stderr(std::process::Stdio::piped());
    // SAFETY: setrlimit is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, 128, 128)
                .map_err(std::io::Error::from)
        });
    }
    let child = cmd.spawn().unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while std::net::TcpStream::connect(&metrics).is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "spaced lb did not start"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let mut held = Vec::new();
    let mut served = 0;
    for _ in 0..40 {
        let mut s = std::net::TcpStream::connect(&listen).unwrap();
        s.set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        let mut b = [0u8; 1];
        if s.write_all(b"x").is_ok() && s.read_exact(&mut b).is_ok() {
            assert_eq!(&b, b"x");
            served += 1;
        }
        held.push(s);
    }
    let refused = lb_metric(&metrics, "spaced_lb_refused_total");
    let errors = lb_metric(&metrics, "spaced_lb_relay_errors_total");
    let active = lb_metric(&metrics, "spaced_lb_connections_active");
    drop(held);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let out = child.wait_with_output().unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(served >= 5, "only {served} connections served; log:\n{log}");
    assert!(
        served < 40,
        "the limit of 128 open files cannot hold 40 connections"
    );
    assert_eq!(active, served, "log:\n{log}");
    assert_eq!(refused, 40 - served, "log:\n{log}");
    assert_eq!(errors, 0, "log:\n{log}");
    assert!(log.contains("--max-conns lowered"), "log:\n{log}");
}

/// `spaced check`: every start-time check without starting; exit 0, or 2 with the message
/// `run` would give.
#[test]
fn spaced_check_says_what_run_would_without_starting() {
    let dir = tempfile::tempdir().unwrap();
    let pki = dir.path().join("pki");
    for args in [
        vec!["pki", "init", "--dir"],
        vec!["pki", "issue", "--name", "n1", "--dir"],
        vec!["pki", "issue", "--name", "n2", "--dir"],
    ] {
        let out = spacectl().args(&args).arg(&pki).output().unwrap();
        assert!(out.status.success(), "{args:?}: {out:?}");
    }
    let port = std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    // The device listener on a free port too, not the default one another node may hold.
    let devices = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let config = |cert: &str, listen: &str| {
        format!(
            "node_id = 1\nname = \"n1\"\ndata_dir = \"data\"\nlisten = \"{listen}\"\n\
             takeover = \"loopback\"\n[tls]\nca = \"pki/ca.pem\"\ncert = \"pki/{cert}.pem\"\n\
             key = \"pki/{cert}.key\"\n[devices]\nlisten = \"{devices}\"\n"
        )
    };
    let path = dir.path().join("n1.toml");
    let check = || {
        spaced()
            .args(["check", "--config"])
            .arg(&path)
            .output()
            .unwrap()
    };
    std::fs::write(&path, config("n1", &format!("127.0.0.1:{port}"))).unwrap();
    let out = check();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(stdout.contains("ok  tls: node n1 under the CA"), "{stdout}");
    assert!(stdout.contains("will be created"), "{stdout}");
    assert!(stdout.contains("config OK"), "{stdout}");
    assert!(
        !dir.path().join("data").exists(),
        "check created the data dir"
    );

    // Another node's certificate: the message `run` gives, exit 2.
    std::fs::write(&path, config("n2", &format!("127.0.0.1:{port}"))).unwrap();
    let out = check();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(
        err.contains("tls.cert") && err.contains("not node \"n1\""),
        "{err}"
    );

    // The QUIC port is taken.
    let busy = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let taken = busy.local_addr().unwrap().to_string();
    std::fs::write(&path, config("n1", &taken)).unwrap();
    let out = check();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(
        err.contains("listen") && err.contains("cannot bind UDP"),
        "{err}"
    );

    // A bad log filter in the config is a config error.
    std::fs::write(
        &path,
        format!(
            "log_level = \"info,=[\"\n{}",
            config("n1", &format!("127.0.0.1:{port}"))
        ),
    )
    .unwrap();
    let out = check();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(err.contains("log_level"), "{err}");

    // The good config runs; with `--log-format json` every log line is one JSON object.
    std::fs::write(&path, config("n1", &format!("127.0.0.1:{port}"))).unwrap();
    let child = spaced()
        .args(["--log-format", "json", "run", "--bootstrap", "--config"])
        .arg(&path)
        .env_remove("SPACED_LOG")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_secs(3));
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = err.lines().collect();
    assert!(lines.len() >= 2, "{err}");
    for l in &lines {
        let v: serde_json::Value =
            serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON: {l}: {e}"));
        assert!(v["level"].is_string() && v["fields"].is_object(), "{l}");
    }
    assert!(
        err.contains("spaced starting") && err.contains("shutting down"),
        "{err}"
    );
}

#[test]
fn version_names_commit_build_date_and_formats_and_log_flags_are_checked() {
    let out = spaced().arg("--version").output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.starts_with(&format!("spaced {} (", env!("CARGO_PKG_VERSION"))),
        "{text}"
    );
    assert!(text.contains(", built 20"), "{text}");
    assert!(
        text.contains("data format 7 (format 6 backups read too)")
            && text.contains("data dirs of format 8 (dirs of formats 5, 6, 7 upgraded in place)")
            && text.contains("spaced-raft/7, spaced-raft/6 (to nodes of format 6"),
        "{text}"
    );
    assert!(text.contains("spaced-admin/7"), "{text}");
    let out = spacectl().arg("--version").output().unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains(", built 20"));

    // An unknown log format, and a log filter that does not parse: exit 2, named.
    let out = spaced()
        .args(["--log-format", "xml", "check", "--config", "/nonexistent"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("xml"));
    let out = spaced()
        .args([
            "--log-level",
            "info,=[",
            "lb",
            "--listen",
            "127.0.0.1:0",
            "--backend",
            "127.0.0.1:1",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--log-level"),
        "{out:?}"
    );
}

#[test]
fn completions_and_man_pages_cover_every_command() {
    for shell in ["bash", "zsh", "fish"] {
        let out = spacectl().args(["completion", shell]).output().unwrap();
        assert!(out.status.success(), "{shell}: {out:?}");
        let script = String::from_utf8_lossy(&out.stdout);
        for cmd in ["snapshot", "vip", "device", "pki", "completion"] {
            assert!(script.contains(cmd), "{shell} script lacks {cmd}");
        }
        let out = spaced().args(["completion", shell]).output().unwrap();
        assert!(out.status.success(), "{shell}: {out:?}");
        let script = String::from_utf8_lossy(&out.stdout);
        for cmd in ["run", "check", "restore", "demo"] {
            assert!(script.contains(cmd), "spaced {shell} script lacks {cmd}");
        }
    }
    let out = spacectl().args(["completion", "tcsh"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("tcsh"));

    for (bin, name, sub) in [
        (spaced(), "spaced", "restore"),
        (spacectl(), "spacectl", "snapshot"),
    ] {
        let out = { bin }.arg("man").output().unwrap();
        assert!(out.status.success(), "{out:?}");
        let page = String::from_utf8_lossy(&out.stdout);
        assert!(
            page.contains(&format!(".TH {name} 1")),
            "{}",
            &page[..page.len().min(300)]
        );
        assert!(page.contains(env!("CARGO_PKG_VERSION")));
        assert!(page.contains(sub), "{name}(1) does not list {sub}");
    }
}

/// The shipped systemd unit (`contrib/systemd/spaced.service`) passes `systemd-analyze
/// verify` with nothing to say: its directives parse, its commands exist (the binaries under
/// test stand in for /usr/bin/spaced) and its `man:` links resolve to the generated pages.
#[test]
fn the_systemd_unit_verifies_cleanly() {
    let ci = std::env::var("CI").is_ok_and(|v| v == "true" || v == "1");
    if Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_err()
    {
        assert!(!ci, "systemd-analyze is missing; .ci/run installs systemd");
        println!("skipped: systemd-analyze is not installed");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let man1 = dir.path().join("man1");
    std::fs::create_dir(&man1).unwrap();
    for (mut bin, page) in [(spaced(), "spaced.1"), (spacectl(), "spacectl.1")] {
        let out = bin.arg("man").output().unwrap();
        assert!(out.status.success());
        std::fs::write(man1.join(page), out.stdout).unwrap();
    }
    let unit = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../contrib/systemd/spaced.service"
    ))
    .unwrap();
    assert!(unit.contains("Type=notify") && unit.contains("WatchdogSec="));
    let path = dir.path().join("spaced.service");
    std::fs::write(
        &path,
        unit.replace("/usr/bin/spaced", env!("CARGO_BIN_EXE_spaced")),
    )
    .unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .env("MANPATH", dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success() && out.stderr.is_empty(),
        "systemd-analyze verify: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Output piped into a reader that goes away (`spacectl ... | head -1`): spacectl ends as
/// other tools do (SIGPIPE), not with a panic's backtrace and exit 101.
#[test]
fn spacectl_ends_quietly_when_its_reader_goes() {
    use std::os::unix::process::ExitStatusExt;
    let mut child = spacectl()
        .args(["man"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(
        out.status.success() || out.status.signal() == Some(nix::libc::SIGPIPE),
        "{:?}: {stderr}",
        out.status
    );
}

/// A keep-alive HTTP/1.1 backend answering every request with `<name> <n>` (the n-th request
/// on its connection); counts the connections it accepted.
fn http_backend(
    name: &'static str,
) -> (
    std::net::SocketAddr,
    std::sync::Arc<std::sync::atomic::AtomicU64>,
) {
    use std::io::{BufRead, BufReader, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let conns = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let counted = conns.clone();
    std::thread::spawn(move || {
        for s in listener.incoming().flatten() {
            counted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            std::thread::spawn(move || {
                let mut w = s.try_clone().unwrap();
                let mut r = BufReader::new(s);
                for n in 1.. {
                    // Read one request head (no bodies in this test).
                    let mut line = String::new();
                    loop {
                        line.clear();
                        match r.read_line(&mut line) {
                            Ok(0) | Err(_) => return,
                            Ok(_) if line == "\r\n" => break,
                            Ok(_) => {}
                        }
                    }
                    let body = format!("{name} {n}\n");
                    let head = format!(
                        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nContent-Type: text/plain\r\n\r\n",
                        body.len()
                    );
                    if w.write_all(head.as_bytes()).is_err()
                        || w.write_all(body.as_bytes()).is_err()
                    {
                        return;
                    }
                }
            });
        }
    });
    (addr, conns)
}

/// JSESSIONID stickiness with a real client: curl sends several requests on one kept-alive
/// connection through `spaced lb --policy sticky --threads 2`; the first request's cookie
/// routes the connection (`.n2` → n2, `.n1` → n1) and every later request on it goes where
/// the first went, as the balancer routes connections, not requests. Without a cookie,
/// round-robin.
#[test]
fn spaced_lb_routes_curl_keep_alive_requests_by_jsessionid() {
    if std::process::Command::new("curl")
        .arg("--version")
        .output()
        .is_err()
    {
        assert!(
            std::env::var_os("CI").is_none(),
            "curl is missing (CI installs it)"
        );
        eprintln!("skipped: curl is not installed");
        return;
    }
    let (b1, c1) = http_backend("n1");
    let (b2, c2) = http_backend("n2");
    let listen = format!("127.0.0.1:{}", free_port());
    let mut child = spaced()
        .args([
            "lb",
            "--listen",
            &listen,
            "--policy",
            "sticky",
            "--threads",
            "2",
        ])
        .args([
            "--backend",
            &format!("n1={b1}"),
            "--backend",
            &format!("n2={b2}"),
        ])
        .env("SPACED_LOG", "warn")
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while std::net::TcpStream::connect(&listen).is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "spaced lb did not start"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let curl = |args: &[&str]| -> (String, String) {
        let out = std::process::Command::new("curl")
            .args(["-sS", "-v", "--max-time", "10"])
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "curl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        (
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let urls: Vec<String> = ["a", "b", "c", "d"]
        .iter()
        .map(|p| format!("http://{listen}/{p}"))
        .collect();
    let urls: Vec<&str> = urls.iter().map(String::as_str).collect();
    for (cookie, name) in [
        ("JSESSIONID=0A1B2C.n2", "n2"),
        ("JSESSIONID=9F8E7D.n1", "n1"),
    ] {
        let mut args = vec!["--cookie", cookie];
        args.extend(&urls);
        let (body, verbose) = curl(&args);
        assert_eq!(
            body,
            format!("{name} 1\n{name} 2\n{name} 3\n{name} 4\n"),
            "{verbose}"
        );
        assert_eq!(
            verbose.matches("Re-using existing connection").count(),
            3,
            "{verbose}"
        );
    }
    // A later request on the connection with another cookie: the connection stays where its
    // first request sent it.
    let first = format!("http://{listen}/first");
    let second = format!("http://{listen}/second");
    let (body, _) = curl(&[
        "--cookie",
        "JSESSIONID=0A1B2C.n2",
        &first,
        "--next",
        "--cookie",
        "JSESSIONID=9F8E7D.n1",
        &second,
    ]);
    assert_eq!(body, "n2 1\nn2 2\n");
    // No cookie: round-robin over the connections.
    let mut names = std::collections::BTreeSet::new();
    for _ in 0..4 {
        let (body, _) = curl(&[&first]);
        names.insert(body.split(' ').next().unwrap_or_default().to_string());
    }
    assert_eq!(names.len(), 2, "{names:?}");
    let _ = child.kill();
    let _ = child.wait();
    // Each backend saw connections (requests and health checks).
    assert!(c1.load(std::sync::atomic::Ordering::Relaxed) >= 1);
    assert!(c2.load(std::sync::atomic::Ordering::Relaxed) >= 1);
}
