//! The systemd notify protocol (`Type=notify`): readiness, status, watchdog pings and
//! stopping, sent as datagrams to `$NOTIFY_SOCKET` (a path, or an abstract name after `@`).
//! Without the variable (not under systemd) every call does nothing.

use std::os::unix::net::UnixDatagram;
use std::time::Duration;

/// A connection to the service manager's notify socket, if there is one.
pub struct Notifier {
    socket: Option<UnixDatagram>,
}

impl Notifier {
    /// From `$NOTIFY_SOCKET`; an unusable one is logged and ignored (the node runs anyway).
    pub fn from_env() -> Self {
        let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
            return Notifier { socket: None };
        };
        match connect(&path.to_string_lossy()) {
            Ok(socket) => Notifier {
                socket: Some(socket),
            },
            Err(e) => {
                tracing::warn!(socket = ?path, error = %e, "cannot reach the service manager's notify socket");
                Notifier { socket: None }
            }
        }
    }

    /// Sends `state` (`READY=1`, `STATUS=...`, `WATCHDOG=1`, `STOPPING=1`, newline-separated).
    pub fn notify(&self, state: &str) {
        if let Some(s) = &self.socket
            && let Err(e) = s.send(state.as_bytes())
        {
            tracing::debug!(error = %e, "notify socket send failed");
        }
    }

    /// Whether there is a service manager to tell anything.
    pub fn enabled(&self) -> bool {
        self.socket.is_some()
    }
}

fn connect(path: &str) -> std::io::Result<UnixDatagram> {
    let socket = UnixDatagram::unbound()?;
    if let Some(name) = path.strip_prefix('@') {
        use std::os::linux::net::SocketAddrExt;
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())?;
        socket.connect_addr(&addr)?;
    } else {
        socket.connect(path)?;
    }
    Ok(socket)
}

/// How often to send `WATCHDOG=1`: half of `$WATCHDOG_USEC` when it is meant for this process
/// (`$WATCHDOG_PID` unset or ours), else never.
pub fn watchdog_every() -> Option<Duration> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    if let Ok(pid) = std::env::var("WATCHDOG_PID")
        && pid.parse::<u32>().ok() != Some(std::process::id())
    {
        return None;
    }
    (usec > 0).then(|| Duration::from_micros(usec / 2))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn datagrams_reach_a_path_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let server = UnixDatagram::bind(&path).unwrap();
        let n = Notifier {
            socket: Some(connect(path.to_str().unwrap()).unwrap()),
        };
        n.notify("READY=1\nSTATUS=up");
        let mut buf = [0u8; 64];
        let len = server.recv(&mut buf).unwrap();
        assert_eq!(&buf[..len], b"READY=1\nSTATUS=up");
        assert!(!Notifier { socket: None }.enabled());
    }

    #[test]
    fn abstract_names_work_too() {
        use std::os::linux::net::SocketAddrExt;
        let name = format!("spaced-test-{}", std::process::id());
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let server = UnixDatagram::bind_addr(&addr).unwrap();
        let s = connect(&format!("@{name}")).unwrap();
        s.send(b"WATCHDOG=1").unwrap();
        let mut buf = [0u8; 16];
        let len = server.recv(&mut buf).unwrap();
        assert_eq!(&buf[..len], b"WATCHDOG=1");
    }
}
