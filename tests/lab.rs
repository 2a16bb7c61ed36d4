//! Network lab for failover tests: throwaway network namespaces (hosts, a client, a bridge) plus probes that run inside them.
//!
//! Layout of one lab (every name carries the lab's unique id, so parallel tests never collide):
//!
//! ```text
//!   slab-<id>-h1 (eth0) ──veth── sw-h1 ┐
//!   slab-<id>-h2 (eth0) ──veth── sw-h2 ├─ br-<id>   (all inside namespace slab-<id>-sw)
//!   slab-<id>-client (eth0) ─veth─ sw-client ┘
//! ```
//!
//! Nothing is configured in the root namespace: the bridge lives in its own switch namespace and
//! the veth pairs are created there with their peer moved straight into the host namespace.

use std::collections::BTreeSet;
use std::ffi::OsStr;
use std::fs::File;
use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use nix::sched::{CloneFlags, setns};
use nix::sys::signal::{Signal, kill, killpg};
use nix::sys::socket::{
    AddressFamily, Backlog, SockFlag, SockType, SockaddrIn, SockaddrIn6, bind, listen, setsockopt,
    socket, sockopt,
};
use nix::sys::time::{TimeVal, TimeValLike};
use nix::unistd::Pid;

/// Where `ip netns add` mounts named namespaces; we open these files to `setns()` into them.
const NETNS_DIR: &str = "/var/run/netns";
/// Prefix of every namespace a lab creates, so stale ones from killed test runs can be found.
const NS_PREFIX: &str = "slab-";
/// Name of the lab interface inside every host/client namespace (what the daemon is told to use).
const ETH: &str = "eth0";
/// Last octet / interface id of the client; hosts use 1..=99, free addresses 100..=199.
const CLIENT_OCTET: u8 = 200;

/// Per-process counter, combined with the pid into each lab's unique id.
static LAB_COUNTER: AtomicU32 = AtomicU32::new(0);

/// Builds a lab, or returns Ok(None) after printing `"skipped: <reason>"` when we are not root —
/// unless env CI=true, where a missing lab must fail the test instead of silently passing.
pub fn lab_or_skip(hosts: usize) -> Result<Option<Lab>> {
    if !nix::unistd::Uid::effective().is_root() {
        let reason = "the network lab needs root (network namespaces, veth, bridge)";
        if ci() {
            bail!("{reason}; not skipping because CI=true");
        }
        println!("skipped: {reason}");
        return Ok(None);
    }
    Lab::new(hosts).map(Some)
}

/// True when running under CI (CI=true or CI=1), where skipping would hide a broken setup.
fn ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v.eq_ignore_ascii_case("true") || v == "1")
}

/// One endpoint of the lab (a host running the daemon, or the client).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Host {
    /// Short name ("h1", "h2", ..., "client"), as used in logs and daemon configs.
    pub name: String,
    /// Full network namespace name (unique per lab), for `ip -n`/`ip netns exec`/`setns`.
    pub ns: String,
    /// The host's own IPv4 address on eth0 (/24 lab subnet).
    pub ip: Ipv4Addr,
    /// The host's own IPv6 address on eth0 (/64 lab prefix).
    pub ip6: Ipv6Addr,
    /// MAC of eth0, fixed by the lab so tests can check which host a neighbour entry points at.
    pub mac: [u8; 6],
}

/// A running lab: namespaces, links, spawned processes and probe servers; all torn down on drop.
pub struct Lab {
    id: String,
    switch_ns: String,
    bridge: String,
    hosts: Vec<Host>,
    client: Host,
    net4: [u8; 2],
    net6: u16,
    /// Namespaces actually created so far, in creation order (drop deletes exactly these).
    created: Vec<String>,
    dir: Option<tempfile::TempDir>,
    /// Keep `dir` when dropped ([`Lab::keep_logs`]).
    keep: AtomicBool,
    processes: Mutex<Vec<Arc<Mutex<ProcState>>>>,
    stop: Arc<AtomicBool>,
    servers: Mutex<Vec<JoinHandle<()>>>,
    /// `<cgroup2 mount>/slab-<id>`: every spawned process runs in a cgroup of its own below
    /// it (like a service manager's unit), which the faults kill or freeze whole. `None` on a
    /// host without cgroup v2.
    cgroup: Option<PathBuf>,
}

impl Lab {
    /// Builds a lab with `hosts` hosts (1..=99) and a client; on any failure everything built so
    /// far is removed again before the error is returned.
    pub fn new(hosts: usize) -> Result<Lab> {
        if !(1..=99).contains(&hosts) {
            bail!("a lab has 1..=99 hosts, not {hosts}");
        }
        reap_stale_labs();
        let pid = std::process::id();
        let counter = LAB_COUNTER.fetch_add(1, Ordering::Relaxed);
        let id = format!("{pid:x}-{:x}", counter % 0x1_0000);
        let net4 = [200 + (pid % 13) as u8, (counter % 256) as u8];
        let net6 = u16::from_be_bytes(net4);
        let make_host = |name: String, octet: u8| Host {
            ns: format!("{NS_PREFIX}{id}-{name}"),
            ip: Ipv4Addr::new(10, net4[0], net4[1], octet),
            ip6: Ipv6Addr::new(0xfd00, net6, 0, 0, 0, 0, 0, u16::from(octet)),
            mac: [0x02, net4[0], net4[1], 0, 0, octet],
            name,
        };
        let host_list = (1..=hosts as u8)
            .map(|i| make_host(format!("h{i}"), i))
            .collect();
        let client = make_host("client".to_string(), CLIENT_OCTET);
        let mut lab = Lab {
            switch_ns: format!("{NS_PREFIX}{id}-sw"),
            bridge: format!("br-{id}"),
            id,
            hosts: host_list,
            client,
            net4,
            net6,
            created: Vec::new(),
            dir: None,
            keep: AtomicBool::new(false),
            processes: Mutex::new(Vec::new()),
            stop: Arc::new(AtomicBool::new(false)),
            servers: Mutex::new(Vec::new()),
            cgroup: None,
        };
        // On error `lab` is dropped here, which deletes whatever namespaces were created.
        lab.build()
            .with_context(|| format!("building network lab {}", lab.id))?;
        if let Some(mount) = spaced_node::takeover::cgroup::mounted_cgroup2() {
            let dir = mount.join(format!("{NS_PREFIX}{}", lab.id));
            std::fs::create_dir(&dir)
                .with_context(|| format!("creating the lab's cgroup {}", dir.display()))?;
            lab.cgroup = Some(dir);
        }
        Ok(lab)
    }

    fn build(&mut self) -> Result<()> {
        self.dir = Some(
            tempfile::Builder::new()
                .prefix(&format!("spaced-lab-{}-", self.id))
                .tempdir()
                .context("creating the lab's temp dir")?,
        );

        let sw = self.switch_ns.clone();
        self.add_namespace(&sw)?;
        // The switch is pure layer 2: no IPv6 (no RS/MLD chatter from its ports), no STP delay,
        // no multicast snooping that could swallow unsolicited neighbour advertisements.
        sysctl(
            &sw,
            &[
                "net.ipv6.conf.all.disable_ipv6=1",
                "net.ipv6.conf.default.disable_ipv6=1",
            ],
        )?;
        ip(&format!("-n {sw} link set lo up"))?;
        let br = self.bridge.clone();
        ip(&format!(
            "-n {sw} link add {br} type bridge stp_state 0 mcast_snooping 0"
        ))?;
        ip(&format!("-n {sw} link set {br} up"))?;

        let mut nodes = self.hosts.clone();
        nodes.push(self.client.clone());
        for node in &nodes {
            self.add_namespace(&node.ns)?;
            let port = switch_port(node);
            let ns = &node.ns;
            ip(&format!(
                "-n {sw} link add {port} type veth peer name {ETH} netns {ns}"
            ))?;
            ip(&format!("-n {sw} link set {port} master {br}"))?;
            ip(&format!("-n {sw} link set {port} up"))?;

            ip(&format!("-n {ns} link set lo up"))?;
            ip(&format!(
                "-n {ns} link set {ETH} address {}",
                format_mac(&node.mac)
            ))?;
            // No DAD, so IPv6 addresses (own and VIPs) are usable the moment they are added.
            sysctl(
                &node.ns,
                &[
                    "net.ipv6.conf.all.accept_dad=0",
                    "net.ipv6.conf.default.accept_dad=0",
                    "net.ipv6.conf.eth0.accept_dad=0",
                ],
            )?;
            ip(&format!("-n {ns} link set {ETH} up"))?;
            ip(&format!("-n {ns} addr add {}/24 dev {ETH}", node.ip))?;
            ip(&format!("-n {ns} addr add {}/64 dev {ETH} nodad", node.ip6))?;
        }

        // The client must learn a moved VIP from gratuitous ARP alone, like a real router would.
        sysctl(
            &self.client.ns,
            &[
                "net.ipv4.conf.all.arp_accept=1",
                "net.ipv4.conf.eth0.arp_accept=1",
            ],
        )?;
        // Same for unsolicited NA (kernel >= 5.18); older kernels only update existing entries.
        if let Err(e) = sysctl(
            &self.client.ns,
            &["net.ipv6.conf.eth0.accept_untracked_na=1"],
        ) {
            eprintln!("lab {}: note: {e:#}", self.id);
        }
        Ok(())
    }

    fn add_namespace(&mut self, ns: &str) -> Result<()> {
        ip(&format!("netns add {ns}"))?;
        self.created.push(ns.to_string());
        Ok(())
    }

    /// The lab's unique id (hex pid + counter), part of every namespace name; handy in logs.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Host `i`, 1-based like its name ("h1" is `host(1)`). Panics if out of range.
    pub fn host(&self, i: usize) -> &Host {
        assert!(
            (1..=self.hosts.len()).contains(&i),
            "lab {} has hosts h1..=h{}, not h{i}",
            self.id,
            self.hosts.len()
        );
        &self.hosts[i - 1]
    }

    /// All hosts in order (h1 first), for loops that start a daemon on each.
    pub fn hosts(&self) -> &[Host] {
        &self.hosts
    }

    /// The client namespace, which plays the router/user that follows the VIP.
    pub fn client(&self) -> &Host {
        &self.client
    }

    /// Namespaces of all hosts (not the client), e.g. for `AddressWatch::start`.
    pub fn host_namespaces(&self) -> Vec<String> {
        self.hosts.iter().map(|h| h.ns.clone()).collect()
    }

    /// The switch namespace holding the bridge (for tests that want to inspect the fdb).
    pub fn switch_ns(&self) -> &str {
        &self.switch_ns
    }

    /// Prefix length of the IPv4 lab subnet (VIPs are added with it, like the hosts' own addresses).
    pub fn subnet_prefix(&self) -> u8 {
        24
    }

    /// Prefix length of the IPv6 lab prefix.
    pub fn subnet_prefix6(&self) -> u8 {
        64
    }

    /// An IPv4 address in the lab subnet that no host uses (for VIPs): .100 + k, k < 100.
    pub fn free_ip(&self, k: u8) -> Ipv4Addr {
        assert!(
            k < 100,
            "free_ip(k) needs k < 100 (the client is .{CLIENT_OCTET})"
        );
        Ipv4Addr::new(10, self.net4[0], self.net4[1], 100 + k)
    }

    /// An IPv6 address in the lab prefix that no host uses (for VIPs): `fd00:<x>::1:k`.
    pub fn free_ip6(&self, k: u16) -> Ipv6Addr {
        Ipv6Addr::new(0xfd00, self.net6, 0, 0, 0, 0, 1, k)
    }

    /// Keeps the lab's directory (its logs) when it is dropped: for a test that found a
    /// violation and returns it as an error rather than panicking.
    pub fn keep_logs(&self) {
        self.keep.store(true, Ordering::Relaxed);
    }

    /// Directory for this lab's logs (process logs from `spawn_in`, configs tests want to write).
    /// It is kept (and its path printed) when the lab is dropped during a panic.
    pub fn dir(&self) -> &Path {
        self.dir.as_ref().expect("lab dir exists once built").path()
    }

    /// `ip netns exec <ns> <program>` as a Command, to add args/env and run or spawn it.
    pub fn command_in(&self, ns: &str, program: impl AsRef<OsStr>) -> Command {
        let mut cmd = Command::new("ip");
        cmd.arg("netns").arg("exec").arg(ns).arg(program);
        cmd
    }

    /// Runs `args[0] args[1..]` in a namespace and returns its stdout; the error names the
    /// namespace, the command and its stderr.
    pub fn run_in(&self, ns: &str, args: &[&str]) -> Result<String> {
        let (program, rest) = args.split_first().context("run_in needs a program")?;
        let mut cmd = self.command_in(ns, program);
        cmd.args(rest);
        run(cmd, &format!("`{}` in namespace {ns}", args.join(" ")))
    }

    /// Spawns a long-running process in a namespace (own process group, stdin null, stdout and
    /// stderr to `<lab dir>/<log_name>`). The lab SIGKILLs and reaps it on drop if still running.
    pub fn spawn_in(
        &self,
        ns: &str,
        program: &Path,
        args: &[&str],
        log_name: &str,
    ) -> Result<LabProcess> {
        let log_path = self.dir().join(log_name);
        // A process started again under the same name: its predecessor's log is kept as
        // `<name>.1`, `<name>.2`, ... (the newest has the highest number).
        if log_path.exists() {
            let kept = (1..)
                .map(|n| self.dir().join(format!("{log_name}.{n}")))
                .find(|p| !p.exists())
                .context("numbering an old log")?;
            std::fs::rename(&log_path, &kept)
                .with_context(|| format!("keeping the old log {}", log_path.display()))?;
        }
        let log = File::create(&log_path)
            .with_context(|| format!("creating log file {}", log_path.display()))?;
        let log2 = log.try_clone().context("duplicating the log file handle")?;
        // `ip netns exec` mounts a fresh /sys, without the cgroup2 filesystem a host has at
        // /sys/fs/cgroup: mount it again there (in the exec's own mount namespace) so that the
        // process sees the cgroups as on a host of its own.
        let mut cmd = self.command_in(ns, "sh");
        cmd.arg("-c")
            .arg("mount -t cgroup2 cgroup2 /sys/fs/cgroup 2>/dev/null; exec \"$0\" \"$@\"")
            .arg(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(log2)
            .stderr(log)
            .process_group(0);
        // A cgroup of its own, entered by the child itself before exec (writing "0" to
        // cgroup.procs moves the writer), so that everything it starts begins there too.
        let cgroup = match &self.cgroup {
            Some(lab_cg) => {
                let n = lock(&self.processes).len();
                let dir = lab_cg.join(format!("p{n}-{}", log_name.replace('.', "_")));
                std::fs::create_dir(&dir)
                    .with_context(|| format!("creating cgroup {}", dir.display()))?;
                let procs = std::fs::OpenOptions::new()
                    .write(true)
                    .open(dir.join("cgroup.procs"))
                    .with_context(|| format!("opening {}/cgroup.procs", dir.display()))?;
                Some((dir, procs))
            }
            None => None,
        };
        if let Some((_, procs)) = &cgroup {
            let fd = procs.as_raw_fd();
            // SAFETY: the closure only calls write(2) on an fd the parent keeps open until
            // spawn returns; nothing is allocated between fork and exec.
            unsafe {
                cmd.pre_exec(move || {
                    let fd = std::os::fd::BorrowedFd::borrow_raw(fd);
                    nix::unistd::write(fd, b"0").map_err(std::io::Error::from)?;
                    Ok(())
                });
            }
        }
        let child = cmd.spawn().with_context(|| {
            format!(
                "spawning `{} {}` in namespace {ns}",
                program.display(),
                args.join(" ")
            )
        })?;
        let pid = child.id();
        let state = Arc::new(Mutex::new(ProcState {
            child,
            status: None,
        }));
        lock(&self.processes).push(state.clone());
        Ok(LabProcess {
            pid,
            ns: ns.to_string(),
            log: log_path,
            state,
            cgroup: cgroup.map(|(dir, _)| dir),
        })
    }

    /// Cuts a host off from everyone by downing the switch side of its veth; the host's own eth0
    /// stays administratively up (it only loses carrier), like a pulled cable / failed switch port.
    pub fn partition(&self, host: &Host) -> Result<()> {
        self.check_own(host)?;
        ip(&format!(
            "-n {} link set {} down",
            self.switch_ns,
            switch_port(host)
        ))
        .with_context(|| format!("partitioning {}", host.name))?;
        Ok(())
    }

    /// Undoes `partition`: the switch port comes back up (no STP, so it forwards at once).
    pub fn heal(&self, host: &Host) -> Result<()> {
        self.check_own(host)?;
        ip(&format!(
            "-n {} link set {} up",
            self.switch_ns,
            switch_port(host)
        ))
        .with_context(|| format!("healing {}", host.name))?;
        Ok(())
    }

    /// Cuts one direction of the host's link, the other still works: `Oneway::Mute`, the
    /// host hears everything and nothing it sends gets out; `Oneway::Deaf`, what it sends gets
    /// out and nothing reaches it. This kernel has no netem and no tc actions (no `matchall
    /// action drop`): a token bucket whose burst is smaller than any frame, on the egress of
    /// the host's eth0 (mute) or of its switch port (deaf), drops every frame.
    pub fn cut_one_way(&self, host: &Host, way: Oneway) -> Result<()> {
        self.check_own(host)?;
        let (ns, dev) = self.one_way_device(host, way);
        tc(&format!(
            "-n {ns} qdisc replace dev {dev} root tbf rate 8bit burst 64 limit 1"
        ))
        .with_context(|| format!("cutting {} one way ({way:?})", host.name))?;
        Ok(())
    }

    /// Undoes `cut_one_way`.
    pub fn heal_one_way(&self, host: &Host, way: Oneway) -> Result<()> {
        self.check_own(host)?;
        let (ns, dev) = self.one_way_device(host, way);
        tc(&format!("-n {ns} qdisc del dev {dev} root"))
            .with_context(|| format!("healing {}'s one-way cut ({way:?})", host.name))?;
        Ok(())
    }

    fn one_way_device(&self, host: &Host, way: Oneway) -> (String, String) {
        match way {
            Oneway::Mute => (host.ns.clone(), ETH.to_string()),
            Oneway::Deaf => (self.switch_ns.clone(), switch_port(host)),
        }
    }

    /// Downs eth0 inside the host (the host itself sees its interface go away). Note: the kernel
    /// drops IPv6 addresses from a downed interface, IPv4 addresses stay.
    pub fn host_eth_down(&self, host: &Host) -> Result<()> {
        self.check_own(host)?;
        ip(&format!("-n {} link set {ETH} down", host.ns))?;
        Ok(())
    }

    /// Brings eth0 inside the host back up and restores its own IPv6 address if it was dropped.
    pub fn host_eth_up(&self, host: &Host) -> Result<()> {
        self.check_own(host)?;
        ip(&format!("-n {} link set {ETH} up", host.ns))?;
        if !self.addresses(&host.ns)?.contains(&IpAddr::V6(host.ip6)) {
            ip(&format!(
                "-n {} addr add {}/64 dev {ETH} nodad",
                host.ns, host.ip6
            ))?;
        }
        Ok(())
    }

    fn check_own(&self, host: &Host) -> Result<()> {
        if self.hosts.contains(host) || &self.client == host {
            Ok(())
        } else {
            bail!("{} ({}) is not part of lab {}", host.name, host.ns, self.id)
        }
    }

    /// IPv4/IPv6 addresses currently on eth0 in `ns`, read in-process via getifaddrs from a
    /// thread that entered the namespace (cheap enough to poll).
    pub fn addresses(&self, ns: &str) -> Result<Vec<IpAddr>> {
        with_netns(ns, || local_addresses(Some(ETH)))
            .with_context(|| format!("reading addresses of {ETH} in namespace {ns}"))
    }

    /// The MAC `ns`'s neighbour table maps `ip` to, or None when there is no usable entry
    /// (FAILED and INCOMPLETE entries count as none). This is what the client would send to.
    pub fn neighbour(&self, ns: &str, ip_addr: IpAddr) -> Result<Option<[u8; 6]>> {
        let out = ip(&format!("-n {ns} -j neigh show {ip_addr}"))?;
        if out.trim().is_empty() {
            return Ok(None);
        }
        let entries: serde_json::Value = serde_json::from_str(&out)
            .with_context(|| format!("parsing `ip -n {ns} -j neigh show {ip_addr}`: {out}"))?;
        for entry in entries.as_array().into_iter().flatten() {
            let dst = entry
                .get("dst")
                .and_then(|d| d.as_str())
                .and_then(|d| d.parse().ok());
            if dst != Some(ip_addr) {
                continue;
            }
            let states: Vec<&str> = entry
                .get("state")
                .and_then(|s| s.as_array())
                .map(|a| a.iter().filter_map(|s| s.as_str()).collect())
                .unwrap_or_default();
            if states.iter().any(|s| *s == "FAILED" || *s == "INCOMPLETE") {
                continue;
            }
            if let Some(mac) = entry.get("lladdr").and_then(|m| m.as_str()) {
                return parse_mac(mac)
                    .map(Some)
                    .with_context(|| format!("neighbour entry for {ip_addr} in namespace {ns}"));
            }
        }
        Ok(None)
    }

    /// Connects from inside `ns` to `addr`, sends `send`, half-closes and reads the reply until
    /// EOF; `timeout` bounds the whole exchange. Used to check who answers on a VIP.
    pub fn tcp_exchange(
        &self,
        ns: &str,
        addr: SocketAddr,
        send: &[u8],
        timeout: Duration,
    ) -> Result<Vec<u8>> {
        with_netns(ns, || {
            let deadline = Instant::now() + timeout;
            let mut stream = TcpStream::connect_timeout(&addr, timeout).context("connect")?;
            stream.set_nodelay(true).ok();
            let remaining = || {
                deadline
                    .checked_duration_since(Instant::now())
                    .filter(|d| !d.is_zero())
                    .ok_or_else(|| anyhow!("timed out after {timeout:?}"))
            };
            stream.set_write_timeout(Some(remaining()?))?;
            stream.write_all(send).context("send")?;
            stream.shutdown(Shutdown::Write).context("half-close")?;
            let mut reply = Vec::new();
            let mut buf = [0u8; 4096];
            loop {
                stream.set_read_timeout(Some(remaining()?))?;
                match stream.read(&mut buf) {
                    Ok(0) => return Ok(reply),
                    Ok(n) => reply.extend_from_slice(&buf[..n]),
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    Err(e) => return Err(e).context("receive"),
                }
            }
        })
        .with_context(|| format!("TCP exchange from namespace {ns} to {addr}"))
    }

    /// A TCP server in `ns` on `addr` (bound with IP_FREEBIND, so it may be the VIP before the
    /// host holds it) answering each connection with `reply`, then closing: the "service behind
    /// the VIP". Returns once listening; stops when the lab is dropped.
    pub fn serve_in(&self, ns: &str, addr: SocketAddr, reply: Vec<u8>) -> Result<()> {
        let file = netns_file(ns)?;
        let (ready_tx, ready_rx) = mpsc::channel::<Result<()>>();
        let stop = self.stop.clone();
        let ns_name = ns.to_string();
        let handle = std::thread::Builder::new()
            .name(format!("lab-serve-{addr}"))
            .spawn(move || {
                let listener =
                    match enter_netns(&file, &ns_name).and_then(|()| listen_freebind(addr)) {
                        Ok(l) => {
                            let _ = ready_tx.send(Ok(()));
                            l
                        }
                        Err(e) => {
                            let _ = ready_tx.send(Err(e));
                            return;
                        }
                    };
                let reply = Arc::new(reply);
                // accept() wakes up every 50 ms (SO_RCVTIMEO) to notice the stop flag.
                while !stop.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((stream, _)) => {
                            let reply = reply.clone();
                            std::thread::spawn(move || answer(stream, &reply));
                        }
                        Err(e)
                            if matches!(
                                e.kind(),
                                ErrorKind::WouldBlock
                                    | ErrorKind::TimedOut
                                    | ErrorKind::Interrupted
                            ) => {}
                        Err(e) => {
                            eprintln!("lab server on {addr} in {ns_name}: accept: {e}");
                            std::thread::sleep(Duration::from_millis(20));
                        }
                    }
                }
            })
            .context("spawning the server thread")?;
        let ready = ready_rx
            .recv()
            .map_err(|_| anyhow!("server thread died before listening"))
            .and_then(|r| r);
        if let Err(e) = ready {
            let _ = handle.join();
            return Err(e).with_context(|| format!("serving TCP on {addr} in namespace {ns}"));
        }
        lock(&self.servers).push(handle);
        Ok(())
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        // Servers and processes first: they keep namespaces alive after `ip netns del`.
        self.stop.store(true, Ordering::Relaxed);
        for handle in lock(&self.servers).drain(..) {
            if handle.join().is_err() {
                eprintln!("lab {}: a server thread panicked", self.id);
            }
        }
        for state in lock(&self.processes).drain(..) {
            lock(&state).kill_and_reap();
        }
        if let Some(cg) = &self.cgroup
            && let Err(e) = remove_cgroup(cg)
        {
            eprintln!("lab {}: cleanup: {e:#}", self.id);
        }
        for ns in self.created.iter().rev() {
            if let Err(e) = ip(&format!("netns del {ns}")) {
                eprintln!("lab {}: cleanup: {e:#}", self.id);
            }
        }
        // Kept after a panic, or always with SPACED_LAB_KEEP=1 (a test that returns an error
        // does not panic until the harness sees the error, after the lab is gone).
        let keep = std::env::var_os("SPACED_LAB_KEEP").is_some_and(|v| v == "1")
            || self.keep.load(Ordering::Relaxed);
        if let Some(dir) = self.dir.take()
            && (std::thread::panicking() || keep)
        {
            let path = dir.keep();
            eprintln!("lab {}: logs kept in {}", self.id, path.display());
        }
    }
}

/// A router namespace joining several labs (each its own bridge and /24): every lab gets a
/// port on it at `.254` and its hosts a default route through it. Links between subnets are
/// cut one way or both with blackhole rules in the router, as a WAN fault would.
pub struct Router {
    ns: String,
    /// (subnet prefix "10.a.b", switch namespace) of each joined lab.
    subnets: Vec<String>,
    next_rule: AtomicU32,
}

impl Router {
    /// Joins `labs` (each lab's hosts routed through the router; their clients too).
    pub fn join(labs: &[&Lab]) -> Result<Router> {
        let pid = std::process::id();
        let counter = LAB_COUNTER.fetch_add(1, Ordering::Relaxed);
        let mut router = Router {
            ns: format!("{NS_PREFIX}{pid:x}-{:x}-rt", counter % 0x1_0000),
            subnets: Vec::new(),
            next_rule: AtomicU32::new(100),
        };
        ip(&format!("netns add {}", router.ns))?;
        let built = (|| -> Result<()> {
            let rt = router.ns.clone();
            sysctl(&rt, &["net.ipv4.ip_forward=1"])?;
            ip(&format!("-n {rt} link set lo up"))?;
            for (k, lab) in labs.iter().enumerate() {
                let sw = lab.switch_ns();
                let net = format!("10.{}.{}", lab.net4[0], lab.net4[1]);
                ip(&format!(
                    "-n {sw} link add rt{k} type veth peer name l{k} netns {rt}"
                ))?;
                ip(&format!("-n {sw} link set rt{k} master {}", lab.bridge))?;
                ip(&format!("-n {sw} link set rt{k} up"))?;
                ip(&format!("-n {rt} addr add {net}.254/24 dev l{k}"))?;
                ip(&format!("-n {rt} link set l{k} up"))?;
                for h in lab.hosts.iter().chain(std::iter::once(&lab.client)) {
                    ip(&format!("-n {} route add default via {net}.254", h.ns))?;
                }
                router.subnets.push(net);
            }
            Ok(())
        })();
        built.with_context(|| format!("building router {}", router.ns))?;
        Ok(router)
    }

    /// The router's namespace.
    pub fn ns(&self) -> &str {
        &self.ns
    }

    /// Drops every packet from `from` to `to` (addresses or `a.b.c.d/len` prefixes) that the
    /// router forwards; returns the rule's handle for [`unblock`](Self::unblock).
    pub fn block(&self, from: &str, to: &str) -> Result<u32> {
        let prio = self.next_rule.fetch_add(1, Ordering::Relaxed);
        ip(&format!(
            "-n {} rule add from {from} to {to} blackhole priority {prio}",
            self.ns
        ))?;
        Ok(prio)
    }

    /// Removes a rule [`block`](Self::block) added.
    pub fn unblock(&self, rule: u32) -> Result<()> {
        ip(&format!("-n {} rule del priority {rule}", self.ns))?;
        Ok(())
    }

    /// The /24 of the `k`-th joined lab, as `10.a.b.0/24`.
    pub fn subnet(&self, k: usize) -> String {
        format!("{}.0/24", self.subnets[k])
    }
}

impl Drop for Router {
    fn drop(&mut self) {
        if let Err(e) = ip(&format!("netns del {}", self.ns)) {
            eprintln!("router {}: cleanup: {e:#}", self.ns);
        }
    }
}

/// A process started by `Lab::spawn_in`. Cloning gives another handle to the same process.
#[derive(Clone)]
pub struct LabProcess {
    pid: u32,
    ns: String,
    log: PathBuf,
    state: Arc<Mutex<ProcState>>,
    /// The cgroup it was started in (see `Lab::spawn_in`).
    cgroup: Option<PathBuf>,
}

/// The child plus its exit status once reaped (so we never signal a pid that may be reused).
struct ProcState {
    child: Child,
    status: Option<ExitStatus>,
}

impl ProcState {
    fn poll(&mut self) -> std::io::Result<Option<ExitStatus>> {
        if self.status.is_none() {
            self.status = self.child.try_wait()?;
        }
        Ok(self.status)
    }

    /// SIGKILLs the whole process group (the process called setpgid(0) at spawn) and reaps.
    fn kill_and_reap(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            // Not reaped yet, so the pid (= pgid) cannot have been reused.
            let _ = killpg(Pid::from_raw(self.child.id() as i32), Signal::SIGKILL);
            match self.child.wait() {
                Ok(status) => self.status = Some(status),
                Err(e) => eprintln!("lab: reaping pid {}: {e}", self.child.id()),
            }
        }
        self.status
    }
}

impl LabProcess {
    /// SIGKILLs every process of its cgroup at once (`cgroup.kill`: what `systemctl kill -s
    /// KILL` or a stop timeout does to a unit), and reaps the process.
    pub fn cgroup_kill(&self) -> Result<()> {
        let dir = self.cgroup_dir()?;
        std::fs::write(dir.join("cgroup.kill"), "1")
            .with_context(|| format!("writing {}/cgroup.kill", dir.display()))?;
        lock(&self.state).kill_and_reap();
        Ok(())
    }

    /// Freezes (`true`) or thaws its whole cgroup (`cgroup.freeze`, as `systemctl freeze`),
    /// and waits until the kernel reports it done.
    pub fn cgroup_freeze(&self, frozen: bool) -> Result<()> {
        let dir = self.cgroup_dir()?;
        std::fs::write(dir.join("cgroup.freeze"), if frozen { "1" } else { "0" })
            .with_context(|| format!("writing {}/cgroup.freeze", dir.display()))?;
        let want = format!("frozen {}", u8::from(frozen));
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let events = std::fs::read_to_string(dir.join("cgroup.events"))
                .with_context(|| format!("reading {}/cgroup.events", dir.display()))?;
            if events.lines().any(|l| l == want) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("cgroup {} did not report `{want}`", dir.display());
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    fn cgroup_dir(&self) -> Result<&Path> {
        self.cgroup
            .as_deref()
            .context("this host has no cgroup v2 hierarchy: the lab cannot kill or freeze a cgroup")
    }

    /// The process id (`ip netns exec` and the `sh` in `spawn_in` both `exec`, so this is the program itself).
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The namespace it runs in.
    pub fn ns(&self) -> &str {
        &self.ns
    }

    /// Sends `sig` to the process (e.g. SIGTERM for a graceful stop, SIGSTOP to freeze it);
    /// errors if it already exited and was reaped.
    pub fn signal(&self, sig: Signal) -> Result<()> {
        let mut state = lock(&self.state);
        if let Some(status) = state.poll().context("checking the process")? {
            bail!(
                "pid {} in {} already exited ({status}); not sending {sig}",
                self.pid,
                self.ns
            );
        }
        kill(Pid::from_raw(self.pid as i32), sig)
            .with_context(|| format!("sending {sig} to pid {} in {}", self.pid, self.ns))
    }

    /// Sends `sig` to the process's whole group: the process and every child it started (the
    /// fence guard among them), as `systemctl kill` or a frozen cgroup treats a unit.
    pub fn signal_group(&self, sig: Signal) -> Result<()> {
        let mut state = lock(&self.state);
        if let Some(status) = state.poll().context("checking the process")? {
            bail!(
                "pid {} in {} already exited ({status}); not sending {sig} to its group",
                self.pid,
                self.ns
            );
        }
        killpg(Pid::from_raw(self.pid as i32), sig)
            .with_context(|| format!("sending {sig} to process group {} in {}", self.pid, self.ns))
    }

    /// The pids of the process's children (its fence guard, say).
    pub fn children(&self) -> Vec<u32> {
        // Each thread's children are listed under that thread: a child started from a
        // worker thread is not the main thread's.
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{}/task", self.pid)) else {
            return Vec::new();
        };
        tasks
            .flatten()
            .filter_map(|t| std::fs::read_to_string(t.path().join("children")).ok())
            .flat_map(|c| {
                c.split_whitespace()
                    .filter_map(|p| p.parse().ok())
                    .collect::<Vec<u32>>()
            })
            .collect()
    }

    /// Waits up to `timeout` for the process to exit: Some(status) if it did, None if still running.
    pub fn wait(&self, timeout: Duration) -> Result<Option<ExitStatus>> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = lock(&self.state)
                .poll()
                .context("waiting for the process")?
            {
                return Ok(Some(status));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// True while the process has not exited.
    pub fn is_running(&self) -> bool {
        matches!(lock(&self.state).poll(), Ok(None))
    }

    /// SIGKILLs the process (and its process group) now and reaps it, e.g. to simulate a crash.
    pub fn kill(&self) -> Option<ExitStatus> {
        lock(&self.state).kill_and_reap()
    }

    /// Path of the file holding its stdout and stderr.
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// The log so far (lossy UTF-8), for assertion messages.
    pub fn read_log(&self) -> String {
        match std::fs::read(&self.log) {
            Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
            Err(e) => format!("<cannot read {}: {e}>", self.log.display()),
        }
    }
}

/// Samples which namespaces hold an address, in rounds every `period`: one thread per namespace
/// (entered once), all woken together each round, so a round is a near-simultaneous snapshot.
/// Used to assert that two hosts never hold a VIP at the same sampled instant.
pub struct AddressWatch {
    stop: Arc<AtomicBool>,
    coordinator: Option<JoinHandle<WatchReport>>,
}

/// What an `AddressWatch` saw.
#[derive(Debug, Clone, Default)]
pub struct WatchReport {
    /// Number of completed sample rounds (each samples every namespace once).
    pub samples: usize,
    /// Largest number of namespaces holding the address in one round.
    pub max_holders: usize,
    /// Start (since the watch started) and holders of every stretch of rounds with 2+ holders;
    /// a new entry whenever the set of holders changes. Should be empty for a correct failover.
    pub overlaps: Vec<(Duration, Vec<String>)>,
    /// Rounds in which 2+ namespaces held the address (how long the overlaps lasted, in samples).
    pub overlap_samples: usize,
    /// Holders over time, transitions only (the first round is always recorded).
    pub holders_over_time: Vec<(Duration, Vec<String>)>,
    /// Individual samples that failed (getifaddrs errors); such a sample counts as "not held".
    pub errors: usize,
}

/// Round state shared between the watch coordinator and its samplers.
struct RoundState {
    round: u64,
    quit: bool,
    done: usize,
    results: Vec<Option<bool>>,
}

struct Rounds {
    state: Mutex<RoundState>,
    start: Condvar,
    done: Condvar,
}

impl AddressWatch {
    /// Starts sampling `namespaces` for `ip` (on any interface) every `period`; returns after
    /// the first round, so changes made afterwards are seen.
    pub fn start(
        lab: &Lab,
        namespaces: &[String],
        ip_addr: IpAddr,
        period: Duration,
    ) -> Result<AddressWatch> {
        let each: Vec<(String, IpAddr)> = namespaces.iter().map(|n| (n.clone(), ip_addr)).collect();
        Self::start_each(lab, &each, period)
    }

    /// Like [`start`](Self::start), with an address of its own per namespace (a site's VIP on
    /// each of its hosts, say): a namespace counts as a holder when it holds its address.
    pub fn start_each(
        lab: &Lab,
        watched: &[(String, IpAddr)],
        period: Duration,
    ) -> Result<AddressWatch> {
        let _ = lab; // namespaces are opened by name; the lab must just outlive the watch's use
        let namespaces: Vec<String> = watched.iter().map(|(n, _)| n.clone()).collect();
        if namespaces.is_empty() {
            bail!("AddressWatch needs at least one namespace");
        }
        let files = namespaces
            .iter()
            .map(|ns| netns_file(ns))
            .collect::<Result<Vec<_>>>()?;
        let n = namespaces.len();
        let rounds = Arc::new(Rounds {
            state: Mutex::new(RoundState {
                round: 0,
                quit: false,
                done: 0,
                results: vec![None; n],
            }),
            start: Condvar::new(),
            done: Condvar::new(),
        });
        let quit = |rounds: &Rounds, samplers: Vec<JoinHandle<()>>| {
            lock(&rounds.state).quit = true;
            rounds.start.notify_all();
            for s in samplers {
                let _ = s.join();
            }
        };

        let (ready_tx, ready_rx) = mpsc::channel::<Result<()>>();
        let mut samplers = Vec::with_capacity(n);
        for (i, (file, (ns, ip_addr))) in files.into_iter().zip(watched).enumerate() {
            let rounds2 = rounds.clone();
            let ready_tx = ready_tx.clone();
            let (ns, ip_addr) = (ns.clone(), *ip_addr);
            let spawned = std::thread::Builder::new()
                .name(format!("lab-watch-{i}"))
                .spawn(move || sampler(i, &file, &ns, ip_addr, &rounds2, ready_tx));
            match spawned {
                Ok(h) => samplers.push(h),
                Err(e) => {
                    quit(&rounds, samplers);
                    return Err(e).context("spawning an AddressWatch sampler thread");
                }
            }
        }
        drop(ready_tx);
        for _ in 0..n {
            let ready = ready_rx
                .recv()
                .map_err(|_| anyhow!("AddressWatch sampler died during setup"))
                .and_then(|r| r);
            if let Err(e) = ready {
                quit(&rounds, samplers);
                return Err(e).context("starting AddressWatch");
            }
        }

        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let names = namespaces;
        let (first_tx, first_rx) = mpsc::channel::<()>();
        let rounds2 = rounds.clone();
        let coordinator = std::thread::Builder::new()
            .name("lab-watch".into())
            .spawn(move || {
                let report = coordinate(&rounds2, &names, period, &stop2, first_tx);
                quit(&rounds2, samplers);
                report
            });
        let coordinator = match coordinator {
            Ok(c) => c,
            Err(e) => {
                // The samplers moved into the failed closure are gone; tell them to quit anyway.
                lock(&rounds.state).quit = true;
                rounds.start.notify_all();
                return Err(e).context("spawning the AddressWatch coordinator");
            }
        };
        let _ = first_rx.recv();
        Ok(AddressWatch {
            stop,
            coordinator: Some(coordinator),
        })
    }

    /// Stops sampling and returns what was seen.
    pub fn stop(mut self) -> WatchReport {
        self.finish()
    }

    fn finish(&mut self) -> WatchReport {
        self.stop.store(true, Ordering::Relaxed);
        match self.coordinator.take().map(|c| c.join()) {
            Some(Ok(report)) => report,
            Some(Err(panic)) => std::panic::resume_unwind(panic),
            None => WatchReport::default(),
        }
    }
}

impl Drop for AddressWatch {
    fn drop(&mut self) {
        if self.coordinator.is_some() {
            self.stop.store(true, Ordering::Relaxed);
            if let Some(c) = self.coordinator.take() {
                let _ = c.join();
            }
        }
    }
}

/// One sampler thread: enter `ns` once, then answer rounds until told to quit.
fn sampler(
    i: usize,
    file: &File,
    ns: &str,
    ip_addr: IpAddr,
    rounds: &Rounds,
    ready: mpsc::Sender<Result<()>>,
) {
    let entered = enter_netns(file, ns);
    let ok = entered.is_ok();
    let _ = ready.send(entered);
    let mut seen = 0;
    loop {
        {
            let mut st = lock(&rounds.state);
            while st.round == seen && !st.quit {
                st = rounds.start.wait(st).unwrap_or_else(|p| p.into_inner());
            }
            if st.quit || !ok {
                return;
            }
            seen = st.round;
        }
        let holds = local_addresses(None).ok().map(|a| a.contains(&ip_addr));
        let mut st = lock(&rounds.state);
        st.results[i] = holds;
        st.done += 1;
        if st.done == st.results.len() {
            rounds.done.notify_one();
        }
    }
}

/// The coordinator loop: start a round, wait for every sampler, record, sleep to the next tick.
fn coordinate(
    rounds: &Rounds,
    names: &[String],
    period: Duration,
    stop: &AtomicBool,
    first: mpsc::Sender<()>,
) -> WatchReport {
    let mut report = WatchReport::default();
    let start = Instant::now();
    let mut next = start;
    let mut prev: Option<Vec<String>> = None;
    while !stop.load(Ordering::Relaxed) {
        let at = Instant::now().duration_since(start);
        let results = {
            let mut st = lock(&rounds.state);
            st.done = 0;
            st.round += 1;
            rounds.start.notify_all();
            while st.done < names.len() {
                st = rounds.done.wait(st).unwrap_or_else(|p| p.into_inner());
            }
            st.results.clone()
        };
        report.samples += 1;
        report.errors += results.iter().filter(|r| r.is_none()).count();
        let holders: Vec<String> = names
            .iter()
            .zip(&results)
            .filter(|(_, r)| **r == Some(true))
            .map(|(n, _)| n.clone())
            .collect();
        report.max_holders = report.max_holders.max(holders.len());
        if holders.len() >= 2 {
            report.overlap_samples += 1;
        }
        if prev.as_ref() != Some(&holders) {
            if holders.len() >= 2 {
                report.overlaps.push((at, holders.clone()));
            }
            report.holders_over_time.push((at, holders.clone()));
            prev = Some(holders);
        }
        if report.samples == 1 {
            let _ = first.send(());
        }
        next += period;
        let now = Instant::now();
        if next > now {
            std::thread::sleep(next - now);
        } else {
            next = now; // fell behind (busy machine): don't burst to catch up
        }
    }
    report
}

/// Switch-side veth name of a host ("sw-h1"); ≤ 15 chars for host names up to 12 chars.
fn switch_port(host: &Host) -> String {
    format!("sw-{}", host.name)
}

/// Runs `ip <args>` (from the root namespace; `-n` selects the target) and returns stdout.
/// `args` is split on whitespace: every name and address the lab uses is free of it.
fn ip(args: &str) -> Result<String> {
    let mut cmd = Command::new("ip");
    cmd.args(args.split_whitespace());
    run(cmd, &format!("`ip {args}`"))
}

fn tc(args: &str) -> Result<String> {
    let mut cmd = Command::new("tc");
    cmd.args(args.split_whitespace());
    run(cmd, &format!("`tc {args}`"))
}

/// Which direction of a host's link [`Lab::cut_one_way`] cuts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Oneway {
    /// Nothing the host sends gets out; it hears everything.
    Mute,
    /// Nothing reaches the host; what it sends gets out.
    Deaf,
}

/// Sets sysctls inside a namespace (`ip netns exec <ns> sysctl -q -w k=v ...`).
fn sysctl(ns: &str, settings: &[&str]) -> Result<()> {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", ns, "sysctl", "-q", "-w"])
        .args(settings);
    run(
        cmd,
        &format!("`sysctl -w {}` in namespace {ns}", settings.join(" ")),
    )?;
    Ok(())
}

/// Runs a command to completion; on failure the error says what ran, the exit status and stderr.
fn run(mut cmd: Command, what: &str) -> Result<String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {what}"))?;
    if !out.status.success() {
        bail!(
            "{what} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn netns_file(ns: &str) -> Result<File> {
    let path = Path::new(NETNS_DIR).join(ns);
    File::open(&path)
        .with_context(|| format!("opening network namespace {ns} ({})", path.display()))
}

/// Moves the calling thread (only it: netns is per thread on Linux) into the namespace.
fn enter_netns(file: &File, ns: &str) -> Result<()> {
    setns(file, CloneFlags::CLONE_NEWNET)
        .with_context(|| format!("setns into network namespace {ns}"))
}

/// Moves the calling thread into network namespace `ns` for good (a thread of its own, made
/// for that: a prober or poller that lives inside a lab host).
pub fn enter_namespace(ns: &str) -> Result<()> {
    enter_netns(&netns_file(ns)?, ns)
}

/// Runs the future `work` makes on a thread of its own, named `name`, inside namespace `ns`,
/// on a current-thread tokio runtime of its own (a client or poller living in a lab host).
/// Failing to enter the namespace or build the runtime is printed and ends the thread.
pub fn spawn_async_in<F>(
    ns: &str,
    name: &str,
    work: impl FnOnce() -> F + Send + 'static,
) -> Result<JoinHandle<()>>
where
    F: std::future::Future<Output = ()>,
{
    let (ns, who) = (ns.to_string(), name.to_string());
    std::thread::Builder::new()
        .name(name.to_string())
        .spawn(move || {
            if let Err(e) = enter_namespace(&ns) {
                eprintln!("{who}: {e:#}");
                return;
            }
            match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt.block_on(work()),
                Err(e) => eprintln!("{who}: {e}"),
            }
        })
        .with_context(|| format!("spawning {name}"))
}

/// Runs `f` on a scoped thread inside `ns`, leaving the caller's namespace untouched.
fn with_netns<T: Send>(ns: &str, f: impl FnOnce() -> Result<T> + Send) -> Result<T> {
    let file = netns_file(ns)?;
    std::thread::scope(|s| {
        s.spawn(|| {
            enter_netns(&file, ns)?;
            f()
        })
        .join()
        .map_err(|_| anyhow!("thread inside namespace {ns} panicked"))?
    })
}

/// IP addresses of the current thread's namespace, of one interface or all.
fn local_addresses(iface: Option<&str>) -> Result<Vec<IpAddr>> {
    let addrs = nix::ifaddrs::getifaddrs().context("getifaddrs")?;
    Ok(addrs
        // IPv4 aliases report their label (`eth0:0`) as the interface name.
        .filter(|a| {
            iface.is_none_or(|name| {
                a.interface_name == name
                    || a.interface_name
                        .strip_prefix(name)
                        .is_some_and(|rest| rest.starts_with(':'))
            })
        })
        .filter_map(|a| {
            let addr = a.address?;
            if let Some(v4) = addr.as_sockaddr_in() {
                Some(IpAddr::V4(v4.ip()))
            } else {
                addr.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip()))
            }
        })
        .collect())
}

/// A listening TCP socket on `addr` with IP_FREEBIND, SO_REUSEADDR and a 50 ms accept timeout.
fn listen_freebind(addr: SocketAddr) -> Result<TcpListener> {
    let family = if addr.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    };
    let fd = socket(family, SockType::Stream, SockFlag::SOCK_CLOEXEC, None).context("socket")?;
    setsockopt(&fd, sockopt::ReuseAddr, &true).context("SO_REUSEADDR")?;
    setsockopt(&fd, sockopt::IpFreebind, &true).context("IP_FREEBIND")?;
    if addr.is_ipv6() {
        setsockopt(&fd, sockopt::Ipv6V6Only, &true).context("IPV6_V6ONLY")?;
    }
    setsockopt(&fd, sockopt::ReceiveTimeout, &TimeVal::milliseconds(50)).context("SO_RCVTIMEO")?;
    match addr {
        SocketAddr::V4(a) => bind(fd.as_raw_fd(), &SockaddrIn::from(a)),
        SocketAddr::V6(a) => bind(fd.as_raw_fd(), &SockaddrIn6::from(a)),
    }
    .with_context(|| format!("bind {addr}"))?;
    listen(&fd, Backlog::new(128).context("backlog")?).context("listen")?;
    Ok(TcpListener::from(fd))
}

/// Answers one connection: reply, half-close, then drain what the client sent so closing does
/// not turn into a RST that could destroy the reply before the client read it.
fn answer(mut stream: TcpStream, reply: &[u8]) {
    let _ = stream.set_nodelay(true);
    let _ = stream.set_write_timeout(Some(Duration::from_secs(2)));
    if stream.write_all(reply).is_err() {
        return;
    }
    let _ = stream.shutdown(Shutdown::Write);
    let _ = stream.set_read_timeout(Some(Duration::from_secs(1)));
    let mut buf = [0u8; 1024];
    while matches!(stream.read(&mut buf), Ok(n) if n > 0) {}
}

/// Kills whatever still runs in cgroup `dir` and below, then removes it and its children.
fn remove_cgroup(dir: &Path) -> Result<()> {
    if !dir.exists() {
        return Ok(());
    }
    std::fs::write(dir.join("cgroup.kill"), "1")
        .with_context(|| format!("writing {}/cgroup.kill", dir.display()))?;
    let children: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("listing {}", dir.display()))?
        .filter_map(|e| e.ok())
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .map(|e| e.path())
        .collect();
    // The kill is asynchronous: a cgroup can be removed once its last process is gone.
    let deadline = Instant::now() + Duration::from_secs(5);
    for d in children.iter().chain(std::iter::once(&dir.to_path_buf())) {
        loop {
            match std::fs::remove_dir(d) {
                Ok(()) => break,
                Err(e) if Instant::now() > deadline => {
                    return Err(e).with_context(|| format!("removing cgroup {}", d.display()));
                }
                Err(_) => std::thread::sleep(Duration::from_millis(10)),
            }
        }
    }
    Ok(())
}

/// The test process a lab's namespace or cgroup (`slab-<pid in hex>-…`) belongs to.
fn lab_pid(name: &str) -> Option<u32> {
    let rest = name.strip_prefix(NS_PREFIX)?;
    u32::from_str_radix(rest.split('-').next()?, 16).ok()
}

/// Deletes namespaces left by labs of test processes that no longer exist (killed runs).
fn reap_stale_labs() {
    let Ok(list) = ip("netns list") else { return };
    for name in list.lines().filter_map(|l| l.split_whitespace().next()) {
        let Some(rest) = name.strip_prefix(NS_PREFIX) else {
            continue;
        };
        let Some(pid) = lab_pid(name) else {
            continue;
        };
        if rest.split('-').count() == 3 && !Path::new(&format!("/proc/{pid}")).exists() {
            match ip(&format!("netns del {name}")) {
                Ok(_) => eprintln!("lab: removed stale namespace {name} (pid {pid} is gone)"),
                Err(e) => eprintln!("lab: removing stale namespace {name}: {e:#}"),
            }
        }
    }
    // And their cgroups (`slab-<pid>-<n>`).
    let Some(mount) = spaced_node::takeover::cgroup::mounted_cgroup2() else {
        return;
    };
    let Ok(entries) = std::fs::read_dir(&mount) else {
        return;
    };
    for e in entries.filter_map(|e| e.ok()) {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = lab_pid(&name) else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            match remove_cgroup(&e.path()) {
                Ok(()) => eprintln!("lab: removed stale cgroup {name} (pid {pid} is gone)"),
                Err(e) => eprintln!("lab: removing stale cgroup {name}: {e:#}"),
            }
        }
    }
}

/// Names of all existing named network namespaces (`ip netns list`), e.g. to check cleanup.
pub fn netns_list() -> Result<Vec<String>> {
    Ok(ip("netns list")?
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .collect())
}

/// Formats a MAC as `ip` prints it ("02:c8:05:00:00:01").
pub fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

fn parse_mac(s: &str) -> Result<[u8; 6]> {
    let parts: Vec<u8> = s
        .split(':')
        .map(|p| u8::from_str_radix(p, 16))
        .collect::<std::result::Result<_, _>>()
        .with_context(|| format!("bad MAC {s:?}"))?;
    parts
        .try_into()
        .map_err(|_| anyhow!("bad MAC {s:?}: not 6 bytes"))
}

/// Locks a mutex, tolerating poisoning (a panicking test must still be able to clean up).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A tmpfs of a few MiB mounted for a test, unmounted when dropped.
pub struct SmallDisk(PathBuf);

impl SmallDisk {
    pub fn mount(at: PathBuf, size: &str) -> Result<SmallDisk> {
        std::fs::create_dir_all(&at)?;
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&at)
            .output()?;
        if !out.status.success() {
            bail!("mount tmpfs: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(SmallDisk(at))
    }

    /// Fills the disk up with a file, leaving nothing free.
    pub fn fill(&self) -> Result<()> {
        use std::io::Write;
        let mut f = std::fs::File::create(self.0.join("filler"))?;
        let chunk = vec![0u8; 64 << 10];
        loop {
            if let Err(e) = f.write_all(&chunk).and_then(|()| f.flush()) {
                if e.raw_os_error() == Some(28) {
                    return Ok(());
                }
                return Err(e.into());
            }
        }
    }
}

impl SmallDisk {
    /// Removes the filler: the disk has room again.
    pub fn free(&self) -> Result<()> {
        match std::fs::remove_file(self.0.join("filler")) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Where it is mounted.
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .output();
    }
}

/// Which of `namespaces` run a live process whose arguments are exactly `argv` (a zombie does
/// not count: it has run its last instruction). A process belongs to the network namespace it
/// runs in, the host a lab process was started in.
pub fn hosts_running(namespaces: &[String], argv: &[&str]) -> Result<Vec<String>> {
    running_in(&netns_inodes(namespaces)?, argv)
}

/// Each network namespace's inode (what `/proc/PID/ns/net` names), with its name.
fn netns_inodes(namespaces: &[String]) -> Result<Vec<(u64, String)>> {
    namespaces
        .iter()
        .map(|ns| {
            use std::os::unix::fs::MetadataExt;
            let path = Path::new(NETNS_DIR).join(ns);
            std::fs::metadata(&path)
                .map(|m| (m.ino(), ns.clone()))
                .with_context(|| format!("network namespace {ns} ({})", path.display()))
        })
        .collect()
}

/// [`hosts_running`] over namespaces already looked up.
fn running_in(inodes: &[(u64, String)], argv: &[&str]) -> Result<Vec<String>> {
    let wanted: Vec<u8> = argv.iter().flat_map(|a| a.bytes().chain([0])).collect();
    let mut found = BTreeSet::new();
    for entry in std::fs::read_dir("/proc").context("reading /proc")? {
        let Ok(entry) = entry else { continue };
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .filter(|n| n.bytes().all(|b| b.is_ascii_digit()))
        else {
            continue;
        };
        // A process may end between the reads: whatever cannot be read is not running.
        if std::fs::read(format!("/proc/{pid}/cmdline"))
            .ok()
            .as_deref()
            != Some(&wanted[..])
        {
            continue;
        }
        let zombie = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|s| {
                s.rsplit_once(')')
                    .map(|(_, rest)| rest.trim_start().starts_with('Z'))
            })
            .unwrap_or(true);
        if zombie {
            continue;
        }
        let Ok(link) = std::fs::read_link(format!("/proc/{pid}/ns/net")) else {
            continue;
        };
        let inode: Option<u64> = link
            .to_str()
            .and_then(|l| l.strip_prefix("net:[")?.strip_suffix(']')?.parse().ok());
        if let Some((_, ns)) = inodes.iter().find(|(i, _)| Some(*i) == inode) {
            found.insert(ns.clone());
        }
    }
    Ok(found.into_iter().collect())
}

/// Samples [`hosts_running`] every `period` on a thread of its own, with the same report as
/// [`AddressWatch`]: who ran the process over time, and every sample in which two did.
pub struct ProcessWatch {
    stop: Arc<AtomicBool>,
    sampler: Option<JoinHandle<WatchReport>>,
}

impl ProcessWatch {
    /// Starts sampling; returns after the first sample.
    pub fn start(namespaces: &[String], argv: &[&str], period: Duration) -> Result<ProcessWatch> {
        // The namespaces are looked up once, not at every sample.
        let inodes = netns_inodes(namespaces)?;
        let argv: Vec<String> = argv.iter().map(|a| a.to_string()).collect();
        running_in(
            &inodes,
            &argv.iter().map(String::as_str).collect::<Vec<_>>(),
        )?;
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let sampler = std::thread::Builder::new()
            .name("lab-process-watch".into())
            .spawn(move || {
                let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
                let began = Instant::now();
                let mut report = WatchReport::default();
                let mut last: Option<Vec<String>> = None;
                let mut overlapping: Option<Vec<String>> = None;
                while !stop2.load(Ordering::Relaxed) {
                    let at = began.elapsed();
                    let holders = match running_in(&inodes, &argv) {
                        Ok(h) => h,
                        Err(_) => {
                            report.errors += 1;
                            std::thread::sleep(period);
                            continue;
                        }
                    };
                    report.samples += 1;
                    report.max_holders = report.max_holders.max(holders.len());
                    if holders.len() >= 2 {
                        report.overlap_samples += 1;
                        if overlapping.as_ref() != Some(&holders) {
                            report.overlaps.push((at, holders.clone()));
                            overlapping = Some(holders.clone());
                        }
                    } else {
                        overlapping = None;
                    }
                    if last.as_ref() != Some(&holders) {
                        report.holders_over_time.push((at, holders.clone()));
                        last = Some(holders);
                    }
                    std::thread::sleep(period);
                }
                report
            })
            .context("spawning a ProcessWatch thread")?;
        Ok(ProcessWatch {
            stop,
            sampler: Some(sampler),
        })
    }

    /// Stops sampling and returns what it saw.
    pub fn stop(mut self) -> WatchReport {
        self.stop.store(true, Ordering::Relaxed);
        self.sampler
            .take()
            .and_then(|s| s.join().ok())
            .unwrap_or_default()
    }
}

impl Drop for ProcessWatch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(s) = self.sampler.take() {
            let _ = s.join();
        }
    }
}
