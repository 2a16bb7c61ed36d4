//! A VIP as the host sees it ([`VipAddr`]: address, prefix, interface) and why a takeover
//! primitive failed ([`TakeoverError`]); shared by the netlink side and the probe.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr};

use thiserror::Error;

/// Longest interface name or IPv4 address label the kernel stores (IFNAMSIZ - 1).
pub(super) const MAX_LABEL_LEN: usize = 15;

/// A VIP as the host sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VipAddr {
    /// The floating address itself: what clients connect to and what ARP/ND announce.
    pub address: IpAddr,
    /// Prefix length it is configured with, so the kernel derives the same subnet (and IPv4 broadcast) as for the host's own address.
    pub prefix: u8,
    /// Interface (in the current network namespace) that carries the VIP and on which it is announced.
    pub interface: String,
}

impl VipAddr {
    /// Parses `"10.0.0.5/24"` or `"fd00::5/64"` plus an interface name, refusing what could never be a VIP
    /// (missing or out-of-range prefix, unspecified/multicast/loopback address, bad interface name).
    pub fn parse(cidr: &str, interface: &str) -> Result<Self, TakeoverError> {
        let invalid = |reason: String| TakeoverError::InvalidVip {
            input: cidr.to_string(),
            interface: interface.to_string(),
            reason,
        };
        if interface.is_empty() {
            return Err(invalid("interface name is empty".into()));
        }
        if interface.len() > MAX_LABEL_LEN {
            return Err(invalid(format!(
                "interface name is longer than {MAX_LABEL_LEN} bytes"
            )));
        }
        if interface
            .chars()
            .any(|c| c == '/' || c == ':' || c == '\0' || c.is_whitespace())
        {
            return Err(invalid(
                "interface name contains '/', ':', NUL or whitespace (give the base interface, not an alias)"
                    .into(),
            ));
        }
        let cidr_trimmed = cidr.trim();
        let Some((addr_text, prefix_text)) = cidr_trimmed.split_once('/') else {
            return Err(invalid(
                "missing prefix length (write it as address/prefix, e.g. 10.0.0.5/24)".into(),
            ));
        };
        let address: IpAddr = addr_text
            .parse()
            .map_err(|_| invalid(format!("{addr_text:?} is not an IP address")))?;
        let prefix: u8 = prefix_text
            .parse()
            .map_err(|_| invalid(format!("{prefix_text:?} is not a prefix length")))?;
        let max = if address.is_ipv4() { 32 } else { 128 };
        if prefix > max {
            return Err(invalid(format!(
                "prefix length {prefix} exceeds {max} for this address family"
            )));
        }
        if prefix == 0 {
            return Err(invalid("prefix length 0 would cover every address".into()));
        }
        if address.is_unspecified() || address.is_multicast() || address.is_loopback() {
            return Err(invalid(format!(
                "{address} is an unspecified, multicast or loopback address"
            )));
        }
        if address == IpAddr::V4(Ipv4Addr::BROADCAST) {
            return Err(invalid(
                "255.255.255.255 is the limited broadcast address".into(),
            ));
        }
        Ok(Self {
            address,
            prefix,
            interface: interface.to_string(),
        })
    }
}

impl fmt::Display for VipAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{} dev {}", self.address, self.prefix, self.interface)
    }
}

/// Why a takeover primitive failed; every variant names the interface and/or address involved.
#[derive(Debug, Error)]
pub enum TakeoverError {
    /// The configured VIP text cannot describe a usable VIP.
    #[error("invalid VIP {input:?} on interface {interface:?}: {reason}")]
    InvalidVip {
        /// The text as configured, so the operator finds the offending line.
        input: String,
        /// The interface it was configured for.
        interface: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The process lacks a capability that moving VIPs needs.
    #[error(
        "missing capability {cap}: moving VIPs needs CAP_NET_ADMIN (addresses) and CAP_NET_RAW (ARP/ND frames)"
    )]
    MissingCapability {
        /// Name of the first missing capability, e.g. "CAP_NET_ADMIN".
        cap: &'static str,
    },
    /// The capability set itself could not be read.
    #[error("cannot read effective capabilities from /proc/self/status: {detail}")]
    CapabilityRead {
        /// What went wrong reading or parsing the file.
        detail: String,
    },
    /// The interface does not exist in this network namespace.
    #[error("interface {interface:?} does not exist in this network namespace")]
    NoInterface {
        /// The interface name that was looked up.
        interface: String,
    },
    /// The interface exists but cannot carry an announced VIP (loopback, NOARP, not Ethernet).
    #[error("interface {interface:?} cannot carry a VIP: {reason}")]
    UnsuitableInterface {
        /// The interface name.
        interface: String,
        /// Why it is unsuitable.
        reason: String,
    },
    /// The VIP is not inside any subnet configured on the interface, so no neighbour could reach it there.
    #[error("VIP {address} is outside every subnet configured on {interface} (configured: {configured})", configured = if .subnets.is_empty() { "none".to_string() } else { .subnets.join(", ") })]
    OutsideSubnet {
        /// The VIP address.
        address: IpAddr,
        /// The interface it was checked against.
        interface: String,
        /// The interface's own addresses as `addr/prefix`, so the operator sees what would fit.
        subnets: Vec<String>,
    },
    /// A netlink request was refused or failed.
    #[error("netlink {action} of {address} on {interface} failed: {detail}")]
    Netlink {
        /// What was being done, e.g. "add address".
        action: &'static str,
        /// The address concerned ("-" for link look-ups).
        address: String,
        /// The interface concerned.
        interface: String,
        /// The kernel's or the library's message.
        detail: String,
    },
    /// Sending or receiving raw Ethernet frames failed.
    #[error("raw frame I/O on {interface} failed: {detail}")]
    Raw {
        /// The interface the AF_PACKET socket is bound to.
        interface: String,
        /// What failed.
        detail: String,
    },
    /// Another host answers for the address (built by callers from [`Takeover::probe`]'s result).
    #[error("address {address} on {interface} is already in use by {mac}")]
    Conflict {
        /// The contested address.
        address: IpAddr,
        /// The interface the probe ran on.
        interface: String,
        /// MAC of the host that answered, as aa:bb:cc:dd:ee:ff.
        mac: String,
    },
}

impl TakeoverError {
    /// Builds a [`TakeoverError::Conflict`] from a probe answer, so every caller reports conflicts alike.
    pub fn conflict(vip: &VipAddr, mac: [u8; 6]) -> Self {
        Self::Conflict {
            address: vip.address,
            interface: vip.interface.clone(),
            mac: format_mac(&mac),
        }
    }
}

/// Formats a MAC as lower-case colon-separated hex, the way `ip` prints it, for logs and errors.
pub fn format_mac(mac: &[u8; 6]) -> String {
    let parts: Vec<String> = mac.iter().map(|b| format!("{b:02x}")).collect();
    parts.join(":")
}
