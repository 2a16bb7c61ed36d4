//! IP takeover primitives: check, probe, add, remove and announce a virtual IP on a Linux interface.
//!
//! The VIP agent decides *when* a VIP moves; this module only knows *how*: addresses go
//! through rtnetlink, conflict probes (RFC 5227 ARP probes, RFC 4862 DAD-style neighbour
//! solicitations) and announcements (gratuitous ARP, unsolicited neighbour advertisements)
//! are raw Ethernet frames sent with `pnet::datalink`.
//!
//! Network namespaces are per thread on Linux. [`Takeover::new`] binds its netlink socket to
//! the namespace of the thread that calls it, and the raw sockets of [`Takeover::probe`] and
//! [`Takeover::announce`] are opened on the calling thread; a call from a thread in another
//! namespace is refused instead of silently acting on the wrong host view.

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::net::{IpAddr, Ipv6Addr};
use std::os::unix::fs::MetadataExt;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::TryStreamExt;
use pnet::datalink::{self, Channel, NetworkInterface};
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::packet_route::address::{
    AddressAttribute, AddressFlags, AddressHeaderFlags, AddressMessage,
};
use rtnetlink::packet_route::link::{LinkAttribute, LinkFlags, LinkLayerType, LinkMessage};
use tracing::{debug, info, warn};

use super::addr::MAX_LABEL_LEN;
pub use super::addr::{TakeoverError, VipAddr, format_mac};
use super::frames::*;
use super::probe::*;

/// Bit of CAP_NET_ADMIN in the capability masks: needed to add and remove addresses.
const CAP_NET_ADMIN_BIT: u32 = 12;
/// Bit of CAP_NET_RAW in the capability masks: needed for AF_PACKET sockets.
const CAP_NET_RAW_BIT: u32 = 13;
/// How long one receive call of a probe may block, which bounds how far past its deadline a probe can run.
const PROBE_READ_TICK: Duration = Duration::from_millis(5);
/// errno ENODEV: the interface vanished (or was recreated) under a cached ifindex.
const ENODEV: i32 = 19;
/// errno EEXIST: the address is already configured.
const EEXIST: i32 = 17;
/// errno EADDRNOTAVAIL: the address to delete is not configured.
const EADDRNOTAVAIL: i32 = 99;
/// errno ENOENT: some kernels answer this for a missing address.
const ENOENT: i32 = 2;
/// errno ENXIO: sending on an ifindex that no longer exists.
const ENXIO: i32 = 6;

/// Reads CapEff from /proc/self/status; error names the missing one: "CAP_NET_ADMIN" (bit 12) or "CAP_NET_RAW" (bit 13).
pub fn check_capabilities() -> Result<(), TakeoverError> {
    let text = std::fs::read_to_string("/proc/self/status").map_err(|e| {
        TakeoverError::CapabilityRead {
            detail: e.to_string(),
        }
    })?;
    if cap_eff(&text).is_none() {
        return Err(TakeoverError::CapabilityRead {
            detail: "no parsable CapEff line".into(),
        });
    }
    let (net_admin, net_raw) = caps_from_status(&text);
    if !net_admin {
        return Err(TakeoverError::MissingCapability {
            cap: "CAP_NET_ADMIN",
        });
    }
    if !net_raw {
        return Err(TakeoverError::MissingCapability { cap: "CAP_NET_RAW" });
    }
    Ok(())
}

/// The effective capability mask from the text of /proc/<pid>/status, if present.
fn cap_eff(status: &str) -> Option<u64> {
    status.lines().find_map(|line| {
        let hex = line.strip_prefix("CapEff:")?.trim();
        u64::from_str_radix(hex, 16).ok()
    })
}

/// Whether the CapEff line of a `/proc/<pid>/status` text grants (CAP_NET_ADMIN, CAP_NET_RAW); both false if absent.
pub fn caps_from_status(status: &str) -> (bool, bool) {
    let mask = cap_eff(status).unwrap_or(0);
    (
        mask & (1 << CAP_NET_ADMIN_BIT) != 0,
        mask & (1 << CAP_NET_RAW_BIT) != 0,
    )
}

/// The repeat schedule after a takeover: offsets from the takeover instant at which `announce` is sent again.
///
/// Immediately, then 0.25 s, 1 s, 2 s and 4 s: the early repeats cover a lost first burst, the late
/// ones hosts and switches that were busy or had their entry refreshed by the old holder in between.
pub fn announce_schedule() -> &'static [Duration] {
    static SCHEDULE: [Duration; 5] = [
        Duration::ZERO,
        Duration::from_millis(250),
        Duration::from_secs(1),
        Duration::from_secs(2),
        Duration::from_secs(4),
    ];
    &SCHEDULE
}

/// What the module caches about an interface: enough to address netlink requests and build frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct LinkInfo {
    /// Kernel ifindex, used by netlink requests and to bind AF_PACKET sockets.
    index: u32,
    /// The interface's MAC: the sender of our frames and the address neighbours must learn.
    mac: [u8; 6],
}

/// Identity (device, inode) of a thread's network namespace, to catch calls from the wrong namespace.
type NetnsId = (u64, u64);

/// The namespace of the calling thread, if /proc tells it.
fn current_netns() -> Option<NetnsId> {
    std::fs::metadata("/proc/thread-self/ns/net")
        .ok()
        .map(|m| (m.dev(), m.ino()))
}

/// Netlink handle plus per-interface cache: the object the VIP agent keeps for its whole life.
pub struct Takeover {
    /// rtnetlink request handle, bound to the namespace `new` ran in.
    handle: rtnetlink::Handle,
    /// The task driving the netlink socket; aborted on drop so no task outlives its user.
    connection: tokio::task::JoinHandle<()>,
    /// ifindex/MAC per interface name, so announcements (sync, latency-critical) need no netlink round trip.
    links: Mutex<HashMap<String, LinkInfo>>,
    /// Namespace `new` ran in; raw sockets opened from another one would act on the wrong host view.
    netns: Option<NetnsId>,
}

impl Drop for Takeover {
    fn drop(&mut self) {
        self.connection.abort();
    }
}

impl fmt::Debug for Takeover {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Takeover")
            .field("netns", &self.netns)
            .finish_non_exhaustive()
    }
}

/// The negative errno of a netlink NACK, as a positive number.
pub(super) fn netlink_errno(err: &rtnetlink::Error) -> Option<i32> {
    match err {
        rtnetlink::Error::NetlinkError(msg) => msg.code.map(|c| c.get().abs()),
        _ => None,
    }
}

/// The local address a netlink address message describes (IFA_LOCAL, else IFA_ADDRESS).
fn message_address(msg: &AddressMessage) -> Option<IpAddr> {
    let mut address = None;
    for attr in &msg.attributes {
        match attr {
            AddressAttribute::Local(ip) => return Some(*ip),
            AddressAttribute::Address(ip) => address = Some(*ip),
            _ => {}
        }
    }
    address
}

/// The IPv4 label of a netlink address message, if it has one.
fn message_label(msg: &AddressMessage) -> Option<&str> {
    msg.attributes.iter().find_map(|attr| match attr {
        AddressAttribute::Label(label) => Some(label.as_str()),
        _ => None,
    })
}

/// Whether `ip` lies inside `net/prefix` (same family only).
fn in_subnet(ip: IpAddr, net: IpAddr, prefix: u8) -> bool {
    match (ip, net) {
        (IpAddr::V4(a), IpAddr::V4(b)) => {
            let p = u32::from(prefix.min(32));
            let mask = if p == 0 { 0 } else { u32::MAX << (32 - p) };
            u32::from(a) & mask == u32::from(b) & mask
        }
        (IpAddr::V6(a), IpAddr::V6(b)) => {
            let p = u32::from(prefix.min(128));
            let mask = if p == 0 { 0 } else { u128::MAX << (128 - p) };
            u128::from(a) & mask == u128::from(b) & mask
        }
        _ => false,
    }
}

/// Whether an IPv6 address is link-local (fe80::/10), which never defines a VIP subnet.
fn is_v6_link_local(ip: &Ipv6Addr) -> bool {
    ip.segments()[0] & 0xffc0 == 0xfe80
}

/// The first free Linux-style alias label `<if>:<n>` not in `used`, or None once labels would exceed 15 bytes.
fn alias_label(interface: &str, used: &[&str]) -> Option<String> {
    (0u32..)
        .map(|n| format!("{interface}:{n}"))
        .take_while(|label| label.len() <= MAX_LABEL_LEN)
        .find(|label| !used.contains(&label.as_str()))
}

impl Takeover {
    /// Opens a netlink connection in the calling thread's network namespace (spawn the rtnetlink connection on tokio).
    pub async fn new() -> Result<Self, TakeoverError> {
        let (connection, handle, _messages) =
            rtnetlink::new_connection().map_err(|e| TakeoverError::Netlink {
                action: "open connection",
                address: "-".into(),
                interface: "-".into(),
                detail: e.to_string(),
            })?;
        let connection = tokio::spawn(connection);
        Ok(Self {
            handle,
            connection,
            links: Mutex::new(HashMap::new()),
            netns: current_netns(),
        })
    }

    /// Interface exists and is up-able, and the VIP lies inside a subnet already configured on it
    /// (v4: some address on the interface with the same network; v6: same, ignoring link-local).
    ///
    /// The VIP's own address (if already added) does not count as a subnet, so the check stays
    /// meaningful after a takeover. An interface that is administratively down is accepted with a
    /// warning: it can be brought up, but announcements will fail until it is.
    pub async fn check(&self, vip: &VipAddr) -> Result<(), TakeoverError> {
        let link = self.lookup_link(&vip.interface).await?;
        let addresses = self.addresses(vip, link.index, "list addresses").await?;
        let mut subnets = Vec::new();
        let mut inside = false;
        for msg in &addresses {
            let Some(ip) = message_address(msg) else {
                continue;
            };
            if ip.is_ipv4() != vip.address.is_ipv4() || ip == vip.address {
                continue;
            }
            if matches!(ip, IpAddr::V6(v6) if is_v6_link_local(&v6)) {
                continue;
            }
            subnets.push(format!("{ip}/{}", msg.header.prefix_len));
            if in_subnet(vip.address, ip, msg.header.prefix_len) {
                inside = true;
            }
        }
        if !inside {
            return Err(TakeoverError::OutsideSubnet {
                address: vip.address,
                interface: vip.interface.clone(),
                subnets,
            });
        }
        debug!(vip = %vip.address, prefix = vip.prefix, interface = %vip.interface, ifindex = link.index, "VIP check passed");
        Ok(())
    }

    /// RFC 5227-style probe: is some other host already using the VIP?
    ///
    /// IPv4: sends `count` ARP probes (sender IP 0.0.0.0, target = VIP) `interval` apart and listens
    /// for ARP requests or replies whose *sender* IP is the VIP. IPv6: sends DAD-style neighbour
    /// solicitations from `::` to the VIP's solicited-node group and listens for a neighbour
    /// advertisement for the VIP. Returns the MAC of the first other host that claims the address
    /// (frames from our own MAC are ignored), None if it stayed silent until `wait` after the last
    /// probe. Never runs longer than `count * interval + wait`. Another host merely *probing* for
    /// the same address is not reported. With `count == 0` it only listens for `wait`.
    pub async fn probe(
        &self,
        vip: &VipAddr,
        count: u32,
        interval: Duration,
        wait: Duration,
    ) -> Result<Option<[u8; 6]>, TakeoverError> {
        let start = Instant::now();
        let link = self.link(&vip.interface).await?;
        let frame = match vip.address {
            IpAddr::V4(ip) => arp_probe_frame(link.mac, ip),
            IpAddr::V6(ip) => dad_solicitation_frame(link.mac, ip),
        };
        let mut channel = self.open_channel(vip, link, Some(PROBE_READ_TICK))?;

        // The hard bound is count*interval + wait from the call; the natural end is `wait` after the
        // last probe. One receive may block PROBE_READ_TICK past the deadline, so keep that margin.
        let budget = interval.saturating_mul(count).saturating_add(wait);
        let natural = interval
            .saturating_mul(count.saturating_sub(1))
            .saturating_add(wait);
        let deadline = start + natural.min(budget.saturating_sub(PROBE_READ_TICK));
        let cancel = Arc::new(AtomicBool::new(false));
        let _cancel_on_drop = CancelOnDrop(cancel.clone());
        let job = ProbeJob {
            vip: vip.clone(),
            own_mac: link.mac,
            frame,
            count,
            interval,
            start,
            deadline,
            cancel,
        };
        debug!(vip = %vip.address, interface = %vip.interface, count, ?interval, ?wait, "probing for address conflict");
        // The answer travels through a oneshot so the caller does not also wait for the socket's
        // close, which the blocking thread does afterwards.
        let (answer_tx, answer_rx) = tokio::sync::oneshot::channel();
        tokio::task::spawn_blocking(move || {
            let answer = job.run(&mut channel);
            let _ = answer_tx.send(answer);
            drop(channel);
        });
        let answer = answer_rx.await.map_err(|_| TakeoverError::Raw {
            interface: vip.interface.clone(),
            detail: format!("probe task for {} ended without an answer", vip.address),
        })??;
        match answer {
            Some(mac) => {
                warn!(vip = %vip.address, interface = %vip.interface, mac = %format_mac(&mac), "probe: address is claimed by another host")
            }
            None => {
                debug!(vip = %vip.address, interface = %vip.interface, elapsed = ?start.elapsed(), "probe: no answer")
            }
        }
        Ok(answer)
    }

    /// Adds the address (idempotent: already present = Ok).
    ///
    /// IPv4: labelled `<if>:<n>` with the lowest free alias index (eth0:0 for the first VIP) and the
    /// broadcast address set; when `<if>:<n>` would exceed the kernel's 15-byte label limit the
    /// label is left to the kernel (the interface name) and a warning is logged. IPv6: added with
    /// IFA_F_NODAD so it is usable at once — the agent's own probe replaces DAD.
    pub async fn add(&self, vip: &VipAddr) -> Result<(), TakeoverError> {
        let link = self.link(&vip.interface).await?;
        let addresses = self.addresses(vip, link.index, "list addresses").await?;
        if addresses
            .iter()
            .any(|m| message_address(m) == Some(vip.address))
        {
            debug!(vip = %vip.address, interface = %vip.interface, "VIP already present; add is a no-op");
            return Ok(());
        }
        let mut request = self
            .handle
            .address()
            .add(link.index, vip.address, vip.prefix);
        let mut label = None;
        match vip.address {
            IpAddr::V4(_) => {
                let used: Vec<&str> = addresses.iter().filter_map(message_label).collect();
                label = alias_label(&vip.interface, &used);
                match &label {
                    Some(l) => request
                        .message_mut()
                        .attributes
                        .push(AddressAttribute::Label(l.clone())),
                    None => warn!(
                        vip = %vip.address,
                        interface = %vip.interface,
                        "no alias label fits in 15 bytes; the address is labelled with the interface name"
                    ),
                }
            }
            IpAddr::V6(_) => {
                let msg = request.message_mut();
                msg.header.flags |= AddressHeaderFlags::Nodad;
                msg.attributes
                    .push(AddressAttribute::Flags(AddressFlags::Nodad));
            }
        }
        match request.execute().await {
            Ok(()) => {}
            Err(e) if netlink_errno(&e) == Some(EEXIST) => {
                debug!(vip = %vip.address, interface = %vip.interface, "VIP appeared concurrently; add is a no-op");
                return Ok(());
            }
            Err(e) => return Err(self.netlink_error(vip, "add address", e)),
        }
        info!(vip = %vip.address, prefix = vip.prefix, interface = %vip.interface, label = label.as_deref().unwrap_or(""), "VIP added");
        Ok(())
    }

    /// Removes it (idempotent: absent = Ok). Every entry of that address on the interface goes,
    /// whatever prefix it was added with.
    pub async fn remove(&self, vip: &VipAddr) -> Result<(), TakeoverError> {
        let link = self.link(&vip.interface).await?;
        let addresses = self.addresses(vip, link.index, "list addresses").await?;
        let mut removed = 0usize;
        for found in addresses
            .iter()
            .filter(|m| message_address(m) == Some(vip.address))
        {
            let mut msg = AddressMessage::default();
            msg.header = found.header.clone();
            msg.attributes = found
                .attributes
                .iter()
                .filter(|a| {
                    matches!(
                        a,
                        AddressAttribute::Address(_)
                            | AddressAttribute::Local(_)
                            | AddressAttribute::Label(_)
                    )
                })
                .cloned()
                .collect();
            match self.handle.address().del(msg).execute().await {
                Ok(()) => removed += 1,
                Err(e) if matches!(netlink_errno(&e), Some(EADDRNOTAVAIL) | Some(ENOENT)) => {
                    debug!(vip = %vip.address, interface = %vip.interface, "VIP vanished concurrently");
                }
                Err(e) => return Err(self.netlink_error(vip, "delete address", e)),
            }
        }
        if removed == 0 {
            debug!(vip = %vip.address, interface = %vip.interface, "VIP not present; remove is a no-op");
        } else {
            info!(vip = %vip.address, interface = %vip.interface, "VIP removed");
        }
        Ok(())
    }

    /// The IP addresses this host's neighbour table maps to `mac` (the host that answered a
    /// conflict probe): its own addresses, when this host has talked to it.
    pub async fn neighbours_with_mac(
        &self,
        mac: &[u8],
    ) -> Result<Vec<std::net::IpAddr>, TakeoverError> {
        use futures::TryStreamExt;
        use rtnetlink::packet_route::neighbour::{NeighbourAddress, NeighbourAttribute};
        let mut found = Vec::new();
        let mut dump = self.handle.neighbours().get().execute();
        while let Some(msg) = dump.try_next().await.map_err(|e| TakeoverError::Netlink {
            action: "list neighbours",
            address: String::new(),
            interface: String::new(),
            detail: e.to_string(),
        })? {
            let same = msg.attributes.iter().any(
                |a| matches!(a, NeighbourAttribute::LinkLayerAddress(l) if l.as_slice() == mac),
            );
            if !same {
                continue;
            }
            for a in &msg.attributes {
                match a {
                    NeighbourAttribute::Destination(NeighbourAddress::Inet(ip)) => {
                        found.push(std::net::IpAddr::V4(*ip))
                    }
                    NeighbourAttribute::Destination(NeighbourAddress::Inet6(ip)) => {
                        found.push(std::net::IpAddr::V6(*ip))
                    }
                    _ => {}
                }
            }
        }
        found.sort();
        found.dedup();
        Ok(found)
    }

    /// Whether the address is on the interface now (any prefix length).
    pub async fn present(&self, vip: &VipAddr) -> Result<bool, TakeoverError> {
        let link = self.link(&vip.interface).await?;
        let addresses = self.addresses(vip, link.index, "list addresses").await?;
        Ok(addresses
            .iter()
            .any(|m| message_address(m) == Some(vip.address)))
    }

    /// One announcement burst, sent at once so neighbours and switches move their entries to us.
    ///
    /// IPv4: a gratuitous ARP request (sender = target = VIP, target MAC zero) and a gratuitous ARP
    /// reply (opcode 2, sender = target = VIP, target MAC ours), both to Ethernet broadcast — some
    /// stacks only honour one of the two forms. IPv6: an unsolicited neighbour advertisement from
    /// the VIP to ff02::1 with the Override flag and our link-layer address. Neighbours update
    /// existing entries from these; by default they do not create new ones. Synchronous (no
    /// netlink round trip when the interface is cached) so the agent can call it from a timer.
    pub fn announce(&self, vip: &VipAddr) -> Result<(), TakeoverError> {
        let link = self.link_sync(&vip.interface)?;
        let frames = match vip.address {
            IpAddr::V4(ip) => vec![
                garp_request_frame(link.mac, ip),
                garp_reply_frame(link.mac, ip),
            ],
            IpAddr::V6(ip) => vec![unsolicited_na_frame(link.mac, ip)],
        };
        let mut channel = self.open_channel(vip, link, None)?;
        let sent = frames
            .iter()
            .try_for_each(|frame| send_frame(channel.0.as_mut(), frame));
        close_in_background(channel);
        sent.map_err(|e| {
            if e.raw_os_error() == Some(ENODEV) || e.raw_os_error() == Some(ENXIO) {
                self.forget(&vip.interface);
            }
            TakeoverError::Raw {
                interface: vip.interface.clone(),
                detail: format!("sending announcement for {}: {e}", vip.address),
            }
        })?;
        info!(vip = %vip.address, interface = %vip.interface, mac = %format_mac(&link.mac), frames = frames.len(), "VIP announced");
        Ok(())
    }

    /// Cached link info, or a fresh netlink look-up.
    async fn link(&self, interface: &str) -> Result<LinkInfo, TakeoverError> {
        if let Some(info) = self.cached(interface) {
            return Ok(info);
        }
        self.lookup_link(interface).await
    }

    /// The cache entry for an interface, if any.
    fn cached(&self, interface: &str) -> Option<LinkInfo> {
        match self.links.lock() {
            Ok(map) => map.get(interface).copied(),
            Err(poisoned) => poisoned.into_inner().get(interface).copied(),
        }
    }

    /// Stores an interface's info in the cache.
    fn remember(&self, interface: &str, info: LinkInfo) {
        let mut map = match self.links.lock() {
            Ok(map) => map,
            Err(poisoned) => poisoned.into_inner(),
        };
        map.insert(interface.to_string(), info);
    }

    /// Drops an interface from the cache (it vanished or was recreated with another ifindex).
    fn forget(&self, interface: &str) {
        let mut map = match self.links.lock() {
            Ok(map) => map,
            Err(poisoned) => poisoned.into_inner(),
        };
        if map.remove(interface).is_some() {
            debug!(interface, "forgot cached interface");
        }
    }

    /// Looks the interface up over netlink, validates it can carry an announced VIP, and caches it.
    async fn lookup_link(&self, interface: &str) -> Result<LinkInfo, TakeoverError> {
        let lookup_error = |e: rtnetlink::Error| {
            if netlink_errno(&e) == Some(ENODEV) {
                TakeoverError::NoInterface {
                    interface: interface.to_string(),
                }
            } else {
                TakeoverError::Netlink {
                    action: "look up interface",
                    address: "-".into(),
                    interface: interface.to_string(),
                    detail: e.to_string(),
                }
            }
        };
        let mut stream = self
            .handle
            .link()
            .get()
            .match_name(interface.to_string())
            .execute();
        let msg: LinkMessage = match stream.try_next().await {
            Ok(Some(msg)) => msg,
            Ok(None) => {
                self.forget(interface);
                return Err(TakeoverError::NoInterface {
                    interface: interface.to_string(),
                });
            }
            Err(e) => {
                self.forget(interface);
                return Err(lookup_error(e));
            }
        };
        let unsuitable = |reason: &str| TakeoverError::UnsuitableInterface {
            interface: interface.to_string(),
            reason: reason.to_string(),
        };
        let flags = msg.header.flags;
        if flags.contains(LinkFlags::Loopback) {
            return Err(unsuitable("it is a loopback interface"));
        }
        if flags.contains(LinkFlags::Noarp) {
            return Err(unsuitable(
                "it has NOARP set, so neighbours would ignore ARP/ND announcements",
            ));
        }
        if msg.header.link_layer_type != LinkLayerType::Ether {
            return Err(unsuitable(&format!(
                "link type {:?} is not Ethernet",
                msg.header.link_layer_type
            )));
        }
        let mac = msg
            .attributes
            .iter()
            .find_map(|attr| match attr {
                LinkAttribute::Address(bytes) => <[u8; 6]>::try_from(bytes.as_slice()).ok(),
                _ => None,
            })
            .ok_or_else(|| unsuitable("it has no 6-byte hardware address"))?;
        if !flags.contains(LinkFlags::Up) {
            warn!(
                interface,
                "interface is administratively down; announcements will fail until it is up"
            );
        }
        let info = LinkInfo {
            index: msg.header.index,
            mac,
        };
        self.remember(interface, info);
        Ok(info)
    }

    /// Sync look-up for `announce`: the cache, else the interface list of this namespace.
    fn link_sync(&self, interface: &str) -> Result<LinkInfo, TakeoverError> {
        if let Some(info) = self.cached(interface) {
            return Ok(info);
        }
        self.ensure_same_netns(interface)?;
        let found = datalink::interfaces()
            .into_iter()
            .find(|i| i.name == interface)
            .ok_or_else(|| TakeoverError::NoInterface {
                interface: interface.to_string(),
            })?;
        let mac =
            found
                .mac
                .map(|m| m.octets())
                .ok_or_else(|| TakeoverError::UnsuitableInterface {
                    interface: interface.to_string(),
                    reason: "it has no hardware address".into(),
                })?;
        let info = LinkInfo {
            index: found.index,
            mac,
        };
        self.remember(interface, info);
        Ok(info)
    }

    /// All addresses of one interface (both families).
    async fn addresses(
        &self,
        vip: &VipAddr,
        index: u32,
        action: &'static str,
    ) -> Result<Vec<AddressMessage>, TakeoverError> {
        let mut request = self.handle.address().get().set_link_index_filter(index);
        // Let the kernel filter by ifindex too (it honours this for dumps with strict checking; harmless otherwise).
        request.message_mut().header.index = index;
        request.message_mut().header.family = AddressFamily::Unspec;
        request
            .execute()
            .try_collect()
            .await
            .map_err(|e| self.netlink_error(vip, action, e))
    }

    /// Wraps a netlink error with its context, dropping the cache entry when the interface vanished.
    fn netlink_error(
        &self,
        vip: &VipAddr,
        action: &'static str,
        e: rtnetlink::Error,
    ) -> TakeoverError {
        if netlink_errno(&e) == Some(ENODEV) {
            self.forget(&vip.interface);
            return TakeoverError::NoInterface {
                interface: vip.interface.clone(),
            };
        }
        TakeoverError::Netlink {
            action,
            address: vip.address.to_string(),
            interface: vip.interface.clone(),
            detail: e.to_string(),
        }
    }

    /// Refuses raw-socket work from a thread that is not in the namespace `new` ran in.
    fn ensure_same_netns(&self, interface: &str) -> Result<(), TakeoverError> {
        match (self.netns, current_netns()) {
            (Some(ours), Some(now)) if ours != now => Err(TakeoverError::Raw {
                interface: interface.to_string(),
                detail: "called from a thread in another network namespace than Takeover::new"
                    .into(),
            }),
            _ => Ok(()),
        }
    }

    /// Opens a non-promiscuous AF_PACKET channel on the interface (on the calling thread).
    fn open_channel(
        &self,
        vip: &VipAddr,
        link: LinkInfo,
        read_timeout: Option<Duration>,
    ) -> Result<RawChannel, TakeoverError> {
        self.ensure_same_netns(&vip.interface)?;
        let iface = NetworkInterface {
            name: vip.interface.clone(),
            description: String::new(),
            index: link.index,
            mac: Some(mac_addr(link.mac)),
            ips: Vec::new(),
            flags: 0,
        };
        let config = datalink::Config {
            read_timeout,
            write_timeout: Some(Duration::from_millis(200)),
            promiscuous: false,
            ..datalink::Config::default()
        };
        match datalink::channel(&iface, config) {
            Ok(Channel::Ethernet(tx, rx)) => Ok((tx, rx)),
            Ok(_) => Err(TakeoverError::Raw {
                interface: vip.interface.clone(),
                detail: "datalink backend returned a non-Ethernet channel".into(),
            }),
            Err(e) => {
                if e.raw_os_error() == Some(ENODEV) {
                    self.forget(&vip.interface);
                }
                let detail = if e.kind() == io::ErrorKind::PermissionDenied {
                    format!("opening AF_PACKET socket: {e} (needs CAP_NET_RAW)")
                } else {
                    format!("opening AF_PACKET socket: {e}")
                };
                Err(TakeoverError::Raw {
                    interface: vip.interface.clone(),
                    detail,
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    fn parse_err(cidr: &str, interface: &str) -> String {
        match VipAddr::parse(cidr, interface) {
            Ok(v) => panic!("{cidr} on {interface:?} parsed as {v:?}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn takeover_parse_accepts_v4_and_v6() {
        let v4 = VipAddr::parse("10.213.0.5/24", "eth0").unwrap();
        assert_eq!(v4.address, "10.213.0.5".parse::<IpAddr>().unwrap());
        assert_eq!(v4.prefix, 24);
        assert_eq!(v4.interface, "eth0");
        assert_eq!(v4.to_string(), "10.213.0.5/24 dev eth0");
        let v6 = VipAddr::parse("fd00:213::5/64", "eth0").unwrap();
        assert_eq!(v6.prefix, 64);
        assert!(v6.address.is_ipv6());
    }

    #[test]
    fn takeover_parse_errors_are_specific() {
        assert!(parse_err("10.213.0.5", "eth0").contains("missing prefix"));
        assert!(parse_err("10.213.0.5/33", "eth0").contains("exceeds 32"));
        assert!(parse_err("fd00::5/129", "eth0").contains("exceeds 128"));
        assert!(parse_err("10.213.0.300/24", "eth0").contains("not an IP address"));
        assert!(parse_err("10.213.0.5/x", "eth0").contains("not a prefix length"));
        assert!(parse_err("10.213.0.5/24", "").contains("interface name is empty"));
        assert!(parse_err("10.213.0.5/24", "eth0:1").contains("alias"));
        assert!(parse_err("10.213.0.5/24", "a-very-long-interface").contains("longer than 15"));
        assert!(parse_err("0.0.0.0/24", "eth0").contains("unspecified"));
        assert!(parse_err("ff02::1/64", "eth0").contains("multicast"));
        assert!(parse_err("10.213.0.5/0", "eth0").contains("prefix length 0"));
        // The error names the input and the interface.
        let msg = parse_err("10.213.0.5/33", "eth7");
        assert!(
            msg.contains("10.213.0.5/33") && msg.contains("eth7"),
            "{msg}"
        );
    }

    #[test]
    fn takeover_caps_from_status_reads_capeff() {
        let both = "Name:\tspaced\nCapInh:\t0000000000000000\nCapPrm:\t0000000000003000\nCapEff:\t0000000000003000\n";
        assert_eq!(caps_from_status(both), (true, true));
        let admin_only = "CapEff:\t0000000000001000\n";
        assert_eq!(caps_from_status(admin_only), (true, false));
        let raw_only = "CapEff:\t0000000000002000\n";
        assert_eq!(caps_from_status(raw_only), (false, true));
        let root = "CapEff:\t000001ffffffffff\n";
        assert_eq!(caps_from_status(root), (true, true));
        // CapPrm alone does not count: only the effective set lets the process act.
        let permitted_only = "CapPrm:\t0000000000003000\nCapEff:\t0000000000000000\n";
        assert_eq!(caps_from_status(permitted_only), (false, false));
        assert_eq!(caps_from_status("garbage"), (false, false));
        assert_eq!(cap_eff("garbage"), None);
    }

    #[test]
    fn takeover_check_capabilities_names_missing_cap() {
        let (admin, raw) = caps_from_status(&std::fs::read_to_string("/proc/self/status").unwrap());
        match check_capabilities() {
            Ok(()) => assert!(admin && raw),
            Err(TakeoverError::MissingCapability { cap }) => {
                assert!(cap == "CAP_NET_ADMIN" || cap == "CAP_NET_RAW");
                assert!(!(admin && raw));
            }
            Err(e) => panic!("unexpected error {e}"),
        }
    }

    #[test]
    fn takeover_announce_schedule_is_increasing_and_starts_now() {
        let s = announce_schedule();
        assert_eq!(s.first(), Some(&Duration::ZERO));
        assert!(s.windows(2).all(|w| w[0] < w[1]));
        assert!(s.len() >= 3);
    }

    #[test]
    fn takeover_alias_labels() {
        assert_eq!(alias_label("eth0", &[]).as_deref(), Some("eth0:0"));
        assert_eq!(
            alias_label("eth0", &["eth0", "eth0:0"]).as_deref(),
            Some("eth0:1")
        );
        assert_eq!(alias_label("eth0", &["eth0:1"]).as_deref(), Some("eth0:0"));
        // 13 chars + ":n" fits; ":10" would not.
        let used: Vec<String> = (0..10).map(|n| format!("abcdefghijklm:{n}")).collect();
        let used_refs: Vec<&str> = used.iter().map(String::as_str).collect();
        assert_eq!(
            alias_label("abcdefghijklm", &used_refs[..9]).as_deref(),
            Some("abcdefghijklm:9")
        );
        assert_eq!(alias_label("abcdefghijklm", &used_refs), None);
        assert_eq!(alias_label("abcdefghijklmno", &[]), None);
    }

    #[test]
    fn takeover_subnet_math() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert!(in_subnet(ip("10.213.1.100"), ip("10.213.1.1"), 24));
        assert!(!in_subnet(ip("10.213.2.100"), ip("10.213.1.1"), 24));
        assert!(in_subnet(ip("fd00:213::100"), ip("fd00:213::1"), 64));
        assert!(!in_subnet(ip("fd00:214::100"), ip("fd00:213::1"), 64));
        assert!(!in_subnet(ip("10.213.1.100"), ip("fd00:213::1"), 0));
        assert!(is_v6_link_local(&"fe80::1".parse().unwrap()));
        assert!(!is_v6_link_local(&"fd00::1".parse().unwrap()));
    }

    // ---------------------------------------------------------------- lab tests

    /// Two namespaces joined by a veth pair; deleted on drop, even when an assertion fails.
    struct Lab {
        a: String,
        b: String,
        /// Third octet of the lab's IPv4 subnet 10.213.<k>.0/24.
        k: u8,
    }

    impl Drop for Lab {
        fn drop(&mut self) {
            for ns in [&self.a, &self.b] {
                let _ = Command::new("ip")
                    .args(["netns", "del", ns.as_str()])
                    .output();
            }
        }
    }

    /// Runs `ip` with args, panicking with its stderr on failure; returns stdout.
    fn ip(args: &[&str]) -> String {
        let out = Command::new("ip").args(args).output().expect("run ip");
        assert!(
            out.status.success(),
            "ip {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    impl Lab {
        fn new() -> Lab {
            let pid = std::process::id();
            let lab = Lab {
                a: format!("tko-{pid}-a"),
                b: format!("tko-{pid}-b"),
                k: (pid % 200 + 10) as u8,
            };
            // A previous process with the same pid may have left them behind.
            for ns in [&lab.a, &lab.b] {
                let _ = Command::new("ip")
                    .args(["netns", "del", ns.as_str()])
                    .output();
            }
            ip(&["netns", "add", &lab.a]);
            ip(&["netns", "add", &lab.b]);
            ip(&[
                "-n", &lab.a, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0",
                "netns", &lab.b,
            ]);
            for (ns, host) in [(&lab.a, 1), (&lab.b, 2)] {
                ip(&[
                    "-n",
                    ns,
                    "addr",
                    "add",
                    &format!("10.213.{}.{host}/24", lab.k),
                    "dev",
                    "eth0",
                ]);
                ip(&[
                    "-n",
                    ns,
                    "addr",
                    "add",
                    &format!("fd00:213::{host}/64"),
                    "dev",
                    "eth0",
                    "nodad",
                ]);
                ip(&["-n", ns, "link", "set", "lo", "up"]);
                ip(&["-n", ns, "link", "set", "eth0", "up"]);
            }
            // A second pair inside a with a 15-byte name, to see the label fallback.
            ip(&[
                "-n",
                &lab.a,
                "link",
                "add",
                "tko-long-name15",
                "type",
                "veth",
                "peer",
                "name",
                "tkopeer0",
            ]);
            ip(&[
                "-n",
                &lab.a,
                "addr",
                "add",
                &format!("10.213.{}.1/24", lab.k + 1),
                "dev",
                "tko-long-name15",
            ]);
            ip(&["-n", &lab.a, "link", "set", "tko-long-name15", "up"]);
            ip(&["-n", &lab.a, "link", "set", "tkopeer0", "up"]);
            lab
        }

        fn mac(&self, ns: &str) -> [u8; 6] {
            let out = ip(&["-n", ns, "-o", "link", "show", "dev", "eth0"]);
            let text = out
                .split_whitespace()
                .skip_while(|w| *w != "link/ether")
                .nth(1)
                .expect("link/ether in ip output");
            let bytes: Vec<u8> = text
                .split(':')
                .map(|h| u8::from_str_radix(h, 16).unwrap())
                .collect();
            bytes.try_into().unwrap()
        }

        fn v4(&self, host: u8) -> String {
            format!("10.213.{}.{host}", self.k)
        }
    }

    /// Runs `f` on a fresh thread moved into namespace `ns`, with a current-thread tokio runtime.
    fn in_netns<F, Fut, T>(ns: &str, f: F) -> T
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: std::future::Future<Output = T>,
        T: Send + 'static,
    {
        let path = format!("/var/run/netns/{ns}");
        let thread = std::thread::spawn(move || {
            let file = std::fs::File::open(&path).expect("open netns file");
            nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(f())
        });
        match thread.join() {
            Ok(v) => v,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }

    /// Polls `ip -n <ns> neigh show <addr> dev eth0` until it mentions `mac`, or times out.
    fn wait_for_neigh(ns: &str, addr: &str, mac: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(3);
        loop {
            let out = ip(&["-n", ns, "neigh", "show", addr, "dev", "eth0"]);
            if out.contains(mac) || Instant::now() > deadline {
                return out;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn is_root() -> bool {
        nix::unistd::Uid::effective().is_root()
    }

    #[test]
    fn takeover_lab_in_namespaces() {
        if !is_root() {
            if std::env::var("CI").as_deref() == Ok("true") {
                panic!("takeover lab test needs root in CI");
            }
            println!("skipped: needs root");
            return;
        }
        let _ = tracing_subscriber::fmt()
            .with_test_writer()
            .with_env_filter("spaced_node=debug")
            .try_init();
        let lab = Lab::new();
        let mac_a = lab.mac(&lab.a);
        let mac_b = lab.mac(&lab.b);
        let mac_a_text = format_mac(&mac_a);
        let (a, b, k) = (lab.a.clone(), lab.b.clone(), lab.k);
        let vip1 = lab.v4(100);
        let vip_b = lab.v4(50);
        let vip_free = lab.v4(51);

        in_netns(&lab.a, move || async move {
            let t = Takeover::new().await.expect("netlink in a");
            let vip = VipAddr::parse(&format!("{vip1}/24"), "eth0").unwrap();

            // check: inside the subnet is fine; outside and missing interface are refused clearly.
            t.check(&vip).await.expect("VIP inside subnet passes check");
            let outside = VipAddr::parse("10.213.250.10/24", "eth0").unwrap();
            let err = t.check(&outside).await.expect_err("outside subnet");
            let msg = err.to_string();
            assert!(matches!(err, TakeoverError::OutsideSubnet { .. }), "{msg}");
            assert!(
                msg.contains("10.213.250.10")
                    && msg.contains("eth0")
                    && msg.contains(&format!("10.213.{k}.1/24")),
                "{msg}"
            );
            let missing = VipAddr::parse(&format!("{vip1}/24"), "nosuch0").unwrap();
            let err = t.check(&missing).await.expect_err("missing interface");
            assert!(matches!(err, TakeoverError::NoInterface { .. }), "{err}");
            assert!(err.to_string().contains("nosuch0"), "{err}");
            let lo = VipAddr::parse("127.1.0.1/8", "lo");
            assert!(lo.is_err(), "loopback VIP rejected at parse");

            // add / present / idempotency / label / broadcast.
            assert!(!t.present(&vip).await.unwrap());
            t.add(&vip).await.expect("add");
            assert!(t.present(&vip).await.unwrap());
            let shown = ip(&["-n", &a, "-4", "addr", "show", "dev", "eth0"]);
            let line = shown
                .lines()
                .find(|l| l.contains(&format!("{vip1}/24")))
                .unwrap_or_else(|| panic!("VIP missing:\n{shown}"));
            assert!(line.contains("eth0:0"), "label eth0:0 expected: {line}");
            assert!(
                line.contains(&format!("brd 10.213.{k}.255")),
                "broadcast expected: {line}"
            );
            t.add(&vip).await.expect("second add is a no-op");
            // A second VIP gets the next alias; after removing the first, its label is reused.
            let vip2 = VipAddr::parse(&format!("10.213.{k}.101/24"), "eth0").unwrap();
            t.add(&vip2).await.unwrap();
            let shown = ip(&["-n", &a, "-4", "addr", "show", "dev", "eth0"]);
            assert!(
                shown
                    .lines()
                    .any(|l| l.contains(&format!("10.213.{k}.101/24")) && l.contains("eth0:1")),
                "{shown}"
            );
            t.remove(&vip2).await.unwrap();

            // announce: seed b with a stale wrong entry, then see it move to a's MAC.
            let seed = || {
                ip(&[
                    "-n",
                    &b,
                    "neigh",
                    "replace",
                    &vip1,
                    "lladdr",
                    "02:00:00:00:00:99",
                    "dev",
                    "eth0",
                    "nud",
                    "stale",
                ]);
                let before = ip(&["-n", &b, "neigh", "show", &vip1, "dev", "eth0"]);
                assert!(
                    before.contains("02:00:00:00:00:99"),
                    "seeded entry: {before}"
                );
            };
            seed();
            t.announce(&vip).expect("announce v4");
            let neigh = wait_for_neigh(&b, &vip1, &mac_a_text);
            assert!(
                neigh.contains(&mac_a_text),
                "b's neighbour entry should map {vip1} to {mac_a_text}: {neigh}"
            );
            // Each gratuitous form alone must be accepted too (Linux overrides a fresh entry only for
            // what it recognises as gratuitous; for replies that needs target MAC = sender MAC).
            let vip1_v4: std::net::Ipv4Addr = vip1.parse().unwrap();
            let link = t.link(&vip.interface).await.unwrap();
            for (form, frame) in [
                ("request", garp_request_frame(link.mac, vip1_v4)),
                ("reply", garp_reply_frame(link.mac, vip1_v4)),
            ] {
                seed();
                let (mut tx, _rx) = t.open_channel(&vip, link, None).unwrap();
                send_frame(tx.as_mut(), &frame).unwrap();
                let neigh = wait_for_neigh(&b, &vip1, &mac_a_text);
                assert!(
                    neigh.contains(&mac_a_text),
                    "GARP {form} alone should update b: {neigh}"
                );
            }
            // Raw-socket work from a thread in another namespace is refused, not misdirected.
            let b_path = format!("/var/run/netns/{b}");
            let wrong_ns = std::thread::scope(|s| {
                s.spawn(|| {
                    let file = std::fs::File::open(&b_path).unwrap();
                    nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
                    t.announce(&vip)
                })
                .join()
                .unwrap()
            });
            match wrong_ns {
                Err(TakeoverError::Raw { detail, .. }) => {
                    assert!(detail.contains("another network namespace"), "{detail}")
                }
                other => panic!("announce from namespace b should be refused, got {other:?}"),
            }

            // remove: gone, and removing again is fine.
            t.remove(&vip).await.expect("remove");
            assert!(!t.present(&vip).await.unwrap());
            let shown = ip(&["-n", &a, "-4", "addr", "show", "dev", "eth0"]);
            assert!(!shown.contains(&format!("{vip1}/")), "{shown}");
            t.remove(&vip).await.expect("second remove is a no-op");

            // Label fallback on a 15-byte interface name.
            let long =
                VipAddr::parse(&format!("10.213.{}.100/24", k + 1), "tko-long-name15").unwrap();
            t.check(&long).await.expect("check on long-named interface");
            t.add(&long).await.expect("add on long-named interface");
            let shown = ip(&["-n", &a, "-4", "addr", "show", "dev", "tko-long-name15"]);
            assert!(
                shown
                    .lines()
                    .any(|l| l.contains(&format!("10.213.{}.100/24", k + 1))
                        && l.trim_end().ends_with("tko-long-name15")),
                "{shown}"
            );
            t.remove(&long).await.unwrap();

            // probe v4: b holds vip_b -> Some(b's mac); a free address -> None within the bound.
            ip(&[
                "-n",
                &b,
                "addr",
                "add",
                &format!("{vip_b}/24"),
                "dev",
                "eth0",
            ]);
            let held = VipAddr::parse(&format!("{vip_b}/24"), "eth0").unwrap();
            let started = Instant::now();
            let answer = t
                .probe(
                    &held,
                    3,
                    Duration::from_millis(100),
                    Duration::from_millis(300),
                )
                .await
                .unwrap();
            assert_eq!(answer, Some(mac_b), "probe should find b");
            // Bounds below carry a scheduling allowance (a loaded 2-core CI machine): they
            // check that a probe ends near its bound, not how fast this machine is.
            let slack = Duration::from_millis(500);
            assert!(started.elapsed() < Duration::from_millis(600) + slack);
            let free = VipAddr::parse(&format!("{vip_free}/24"), "eth0").unwrap();
            let started = Instant::now();
            let answer = t
                .probe(
                    &free,
                    2,
                    Duration::from_millis(100),
                    Duration::from_millis(200),
                )
                .await
                .unwrap();
            let took = started.elapsed();
            assert_eq!(answer, None);
            assert!(
                took <= Duration::from_millis(400) + slack,
                "probe overran its bound: {took:?}"
            );
            assert!(
                took >= Duration::from_millis(250),
                "probe returned too early: {took:?}"
            );

            // Zero probes: only listen, and still within the bound.
            let started = Instant::now();
            let answer = t
                .probe(&free, 0, Duration::ZERO, Duration::from_millis(50))
                .await
                .unwrap();
            let took = started.elapsed();
            assert_eq!(answer, None);
            assert!(
                took <= Duration::from_millis(50) + slack,
                "listen-only probe overran: {took:?}"
            );

            // IPv6: add with nodad (not tentative), announce NA, probe.
            let vip6 = VipAddr::parse("fd00:213::100/64", "eth0").unwrap();
            t.check(&vip6).await.expect("v6 check");
            let outside6 = VipAddr::parse("fd00:214::100/64", "eth0").unwrap();
            assert!(matches!(
                t.check(&outside6).await,
                Err(TakeoverError::OutsideSubnet { .. })
            ));
            t.add(&vip6).await.expect("add v6");
            t.add(&vip6).await.expect("add v6 again");
            assert!(t.present(&vip6).await.unwrap());
            let shown = ip(&["-n", &a, "-6", "addr", "show", "dev", "eth0"]);
            let line = shown
                .lines()
                .find(|l| l.contains("fd00:213::100/64"))
                .unwrap_or_else(|| panic!("v6 VIP missing:\n{shown}"));
            assert!(
                !line.contains("tentative"),
                "nodad VIP must not be tentative: {line}"
            );
            ip(&[
                "-n",
                &b,
                "neigh",
                "replace",
                "fd00:213::100",
                "lladdr",
                "02:00:00:00:00:99",
                "dev",
                "eth0",
                "nud",
                "stale",
            ]);
            t.announce(&vip6).expect("announce v6");
            let neigh = wait_for_neigh(&b, "fd00:213::100", &mac_a_text);
            assert!(
                neigh.contains(&mac_a_text),
                "b's v6 neighbour entry should move to {mac_a_text}: {neigh}"
            );
            t.remove(&vip6).await.unwrap();
            assert!(!t.present(&vip6).await.unwrap());

            ip(&[
                "-n",
                &b,
                "addr",
                "add",
                "fd00:213::50/64",
                "dev",
                "eth0",
                "nodad",
            ]);
            let held6 = VipAddr::parse("fd00:213::50/64", "eth0").unwrap();
            let answer = t
                .probe(
                    &held6,
                    3,
                    Duration::from_millis(100),
                    Duration::from_millis(300),
                )
                .await
                .unwrap();
            assert_eq!(answer, Some(mac_b), "v6 probe should find b");
            let free6 = VipAddr::parse("fd00:213::51/64", "eth0").unwrap();
            let started = Instant::now();
            let answer = t
                .probe(
                    &free6,
                    2,
                    Duration::from_millis(100),
                    Duration::from_millis(200),
                )
                .await
                .unwrap();
            assert_eq!(answer, None);
            assert!(started.elapsed() <= Duration::from_millis(400) + slack);
        });
        drop(lab);
    }
}
