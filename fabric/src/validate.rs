//! Shape checks for names, ids and addresses: shared by `apply` and by callers that check input
//! before they propose it.

use std::net::{IpAddr, SocketAddr};

use crate::command::CommandError;

/// A management IP must be one a backend connection can go to.
pub fn check_mgmt_ip(ip: &IpAddr) -> Result<(), CommandError> {
    if ip.is_unspecified() || ip.is_multicast() {
        return Err(invalid(
            "management IP",
            &ip.to_string(),
            "must be a unicast address",
        ));
    }
    Ok(())
}

pub(crate) fn invalid(what: &str, value: &str, why: &str) -> CommandError {
    CommandError::Invalid {
        what: what.into(),
        value: value.into(),
        why: why.into(),
    }
}
pub(crate) fn exists(what: &str, key: impl ToString) -> CommandError {
    CommandError::Exists {
        what: what.into(),
        key: key.to_string(),
    }
}
pub(crate) fn not_found(what: &str, key: impl ToString) -> CommandError {
    CommandError::NotFound {
        what: what.into(),
        key: key.to_string(),
    }
}

/// Checks a node, role, placement or service name: 1..=63 of `[a-z0-9-]`, no leading/trailing `-`.
pub fn check_name(what: &str, name: &str) -> Result<(), CommandError> {
    if name.is_empty() || name.len() > 63 {
        return Err(invalid(what, name, "must be 1 to 63 characters"));
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return Err(invalid(what, name, "only a-z, 0-9 and '-' are allowed"));
    }
    if name.starts_with('-') || name.ends_with('-') {
        return Err(invalid(what, name, "must not start or end with '-'"));
    }
    Ok(())
}

/// Checks a device id: 1..=128 printable characters without spaces or commas.
pub fn check_device_id(id: &str) -> Result<(), CommandError> {
    if id.is_empty() || id.len() > 128 {
        return Err(invalid("device id", id, "must be 1 to 128 characters"));
    }
    if !id.chars().all(|c| c.is_ascii_graphic() && c != ',') {
        return Err(invalid(
            "device id",
            id,
            "only printable ASCII without spaces or commas",
        ));
    }
    Ok(())
}

/// Checks a device address: `ip`, `ip:port`, `[v6]:port`, `host` or `host:port` with a non-zero port.
pub fn check_device_addr(addr: &str) -> Result<(), CommandError> {
    if addr.parse::<IpAddr>().is_ok() || addr.parse::<SocketAddr>().is_ok_and(|a| a.port() != 0) {
        return Ok(());
    }
    let (host, port) = match addr.rsplit_once(':') {
        Some((h, p)) => (h, Some(p)),
        None => (addr, None),
    };
    if let Some(p) = port {
        match p.parse::<u16>() {
            Ok(0) | Err(_) => return Err(invalid("device address", addr, "port must be 1..65535")),
            Ok(_) => {}
        }
    }
    let host_ok = !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        });
    if !host_ok {
        return Err(invalid(
            "device address",
            addr,
            "expected ip, ip:port, host or host:port",
        ));
    }
    Ok(())
}

/// Checks `ip/prefix` with a prefix valid for the address family.
pub fn check_vip_address(address: &str) -> Result<(), CommandError> {
    let Some((ip, prefix)) = address.split_once('/') else {
        return Err(invalid("VIP address", address, "expected ip/prefix"));
    };
    let ip: IpAddr = ip
        .parse()
        .map_err(|_| invalid("VIP address", address, "not an IP address"))?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    match prefix.parse::<u8>() {
        Ok(p) if p <= max => Ok(()),
        _ => Err(invalid(
            "VIP address",
            address,
            &format!("prefix must be 0..={max}"),
        )),
    }
}

/// The bare IP of a VIP address written `ip/prefix`.
pub fn vip_ip(address: &str) -> Option<IpAddr> {
    address.split_once('/').and_then(|(ip, _)| ip.parse().ok())
}
