//! Fake devices for tests and benchmarks: one TCP listener stands in for many space-initiated
//! devices. Device `i` is reached at its own loopback address (`127.10.0.1` for device 0, then
//! upwards) on the listener's port; the address an accepted connection arrived on says which
//! device it reached. The farm counts, per device, the connections open now and all accepted.
//!
//! Holding 10,000 connections takes 10,000 descriptors on each side; with a 20,000 limit the
//! farm then runs in a child process ([`Farm::spawn`]) that answers `counts` requests on stdin.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result, bail};
use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpSocket};

/// Connections to one device: open now, and accepted since the farm started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DeviceConns {
    /// Open now.
    pub live: u32,
    /// Accepted in all.
    pub accepted: u32,
}

/// The loopback address of device `i`.
pub fn device_ip(i: usize) -> Ipv4Addr {
    let n = i as u32 + 1;
    Ipv4Addr::new(127, 10 + (n >> 16) as u8, (n >> 8) as u8, n as u8)
}

/// The device number of a loopback address, if it is one of the farm's.
pub fn device_index(ip: IpAddr) -> Option<usize> {
    let IpAddr::V4(v4) = ip else { return None };
    let [a, b, c, d] = v4.octets();
    if a != 127 || b < 10 {
        return None;
    }
    let n = (u32::from(b - 10) << 16) | (u32::from(c) << 8) | u32::from(d);
    (n as usize).checked_sub(1)
}

/// Counts by device number.
type Book = Arc<Mutex<HashMap<usize, DeviceConns>>>;

/// A farm in this process.
pub struct LocalFarm {
    /// The listener's port, shared by every device.
    port: u16,
    /// Connection counts.
    book: Book,
    /// The accept loop; aborted on drop, which closes nothing already accepted.
    task: tokio::task::JoinHandle<()>,
    /// Connection tasks, aborted on drop so every device connection closes with the farm.
    conns: Arc<Mutex<Vec<tokio::task::AbortHandle>>>,
}

impl Drop for LocalFarm {
    fn drop(&mut self) {
        self.task.abort();
        for c in self
            .conns
            .lock()
            .map(|mut v| std::mem::take(&mut *v))
            .unwrap_or_default()
        {
            c.abort();
        }
    }
}

impl LocalFarm {
    /// Listens on a free port of every address (the devices' loopback addresses included).
    pub async fn start() -> Result<LocalFarm> {
        let socket = TcpSocket::new_v4()?;
        socket.set_reuseaddr(true)?;
        socket.bind(SocketAddr::from(([0, 0, 0, 0], 0)))?;
        let listener: TcpListener = socket.listen(4096)?;
        let port = listener.local_addr()?.port();
        let book: Book = Arc::default();
        let conns: Arc<Mutex<Vec<tokio::task::AbortHandle>>> = Arc::default();
        let task = {
            let book = book.clone();
            let conns = conns.clone();
            tokio::spawn(async move {
                loop {
                    let Ok((mut stream, _)) = listener.accept().await else {
                        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                        continue;
                    };
                    let Some(i) = stream.local_addr().ok().and_then(|a| device_index(a.ip()))
                    else {
                        continue;
                    };
                    if let Ok(mut b) = book.lock() {
                        let e = b.entry(i).or_default();
                        e.live += 1;
                        e.accepted += 1;
                    }
                    let book = book.clone();
                    let h = tokio::spawn(async move {
                        let mut buf = [0u8; 64];
                        while matches!(stream.read(&mut buf).await, Ok(n) if n > 0) {}
                        if let Ok(mut b) = book.lock() {
                            b.entry(i).or_default().live -= 1;
                        }
                    });
                    if let Ok(mut c) = conns.lock() {
                        c.retain(|h| !h.is_finished());
                        c.push(h.abort_handle());
                    }
                }
            })
        };
        Ok(LocalFarm {
            port,
            book,
            task,
            conns,
        })
    }

    /// Counts of devices `0..n`.
    pub fn counts(&self, n: usize) -> Vec<DeviceConns> {
        let b = self.book.lock().map(|b| b.clone()).unwrap_or_default();
        (0..n)
            .map(|i| b.get(&i).copied().unwrap_or_default())
            .collect()
    }
}

/// A farm in a child process: stdout gives its port, then one line of counts per request.
pub struct RemoteFarm {
    /// The child; killed on drop.
    child: Child,
    /// Requests go here.
    stdin: ChildStdin,
    /// Answers come from here.
    stdout: BufReader<ChildStdout>,
    /// The farm's port.
    port: u16,
}

impl Drop for RemoteFarm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl RemoteFarm {
    /// Starts `cmd` (something that runs [`serve_stdio`]) and reads its port.
    pub fn spawn(mut cmd: Command) -> Result<RemoteFarm> {
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("start the device farm")?;
        let stdin = child.stdin.take().context("farm stdin")?;
        let mut stdout = BufReader::new(child.stdout.take().context("farm stdout")?);
        let mut line = String::new();
        stdout.read_line(&mut line)?;
        let port = line
            .trim()
            .strip_prefix("port ")
            .and_then(|p| p.parse().ok())
            .with_context(|| format!("device farm said {line:?}, not its port"))?;
        Ok(RemoteFarm {
            child,
            stdin,
            stdout,
            port,
        })
    }

    /// Counts of devices `0..n` (blocking; a few ms for 10,000 devices).
    pub fn counts(&mut self, n: usize) -> Result<Vec<DeviceConns>> {
        writeln!(self.stdin, "counts {n}")?;
        self.stdin.flush()?;
        let mut line = String::new();
        if self.stdout.read_line(&mut line)? == 0 {
            bail!("device farm exited");
        }
        line.split_whitespace()
            .map(|pair| {
                let (l, a) = pair.split_once('/').context("live/accepted")?;
                Ok(DeviceConns {
                    live: l.parse()?,
                    accepted: a.parse()?,
                })
            })
            .collect()
    }
}

/// The child side of [`RemoteFarm`]: runs a farm, prints `port <p>`, then answers each
/// `counts <n>` line on stdin with `live/accepted` pairs for devices `0..n`. Exits at EOF.
pub fn serve_stdio() -> Result<()> {
    spaced_node::raise_fd_limit()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let farm = rt.block_on(LocalFarm::start())?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "port {}", farm.port)?;
    out.flush()?;
    for line in std::io::stdin().lock().lines() {
        let line = line?;
        let n: usize = line
            .strip_prefix("counts ")
            .and_then(|n| n.trim().parse().ok())
            .with_context(|| format!("bad request {line:?}"))?;
        let text: Vec<String> = farm
            .counts(n)
            .iter()
            .map(|c| format!("{}/{}", c.live, c.accepted))
            .collect();
        writeln!(out, "{}", text.join(" "))?;
        out.flush()?;
    }
    drop(farm);
    rt.shutdown_background();
    Ok(())
}

/// Fake devices, in this process or in a child.
pub enum Farm {
    /// In this process.
    Local(LocalFarm),
    /// In a child process (behind a mutex: requests and answers pair up).
    Remote(Mutex<RemoteFarm>),
}

impl Farm {
    /// A farm in this process.
    pub async fn local() -> Result<Farm> {
        Ok(Farm::Local(LocalFarm::start().await?))
    }

    /// A farm in a child process started by `cmd`.
    pub fn spawn(cmd: Command) -> Result<Farm> {
        Ok(Farm::Remote(Mutex::new(RemoteFarm::spawn(cmd)?)))
    }

    /// The port every device listens on.
    pub fn port(&self) -> u16 {
        match self {
            Farm::Local(f) => f.port,
            Farm::Remote(f) => f.lock().map(|f| f.port).unwrap_or(0),
        }
    }

    /// The address to register for device `i`.
    pub fn device_addr(&self, i: usize) -> String {
        format!("{}:{}", device_ip(i), self.port())
    }

    /// Counts of devices `0..n`.
    pub fn counts(&self, n: usize) -> Result<Vec<DeviceConns>> {
        match self {
            Farm::Local(f) => Ok(f.counts(n)),
            Farm::Remote(f) => {
                let ask = || {
                    f.lock()
                        .map_err(|_| anyhow::anyhow!("farm lock poisoned"))?
                        .counts(n)
                };
                // A blocking pipe round trip: keep it off the async workers' backs.
                match tokio::runtime::Handle::try_current() {
                    Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
                        tokio::task::block_in_place(ask)
                    }
                    _ => ask(),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_addresses_round_trip() {
        for i in [0, 1, 254, 255, 256, 65_534, 65_535, 99_999] {
            assert_eq!(device_index(IpAddr::V4(device_ip(i))), Some(i), "{i}");
        }
        assert_eq!(device_index("127.0.0.1".parse().unwrap()), None);
        assert_eq!(device_index("10.10.0.1".parse().unwrap()), None);
    }
}
