//! PROXY protocol version 2: the binary header that tells a backend which client a relayed TCP connection came from.
//!
//! Layout (all integers big-endian):
//!
//! | bytes | content |
//! | --- | --- |
//! | 0..12 | signature `\r\n\r\n\0\r\nQUIT\n` |
//! | 12 | version (high nibble, 2) and command (low nibble: 0 LOCAL, 1 PROXY) |
//! | 13 | address family (high nibble: 1 IPv4, 2 IPv6) and transport (low nibble: 1 stream) |
//! | 14..16 | length of everything after these 16 bytes |
//! | 16.. | source address, destination address, source port, destination port; then optional TLVs |
//!
//! [`encode`] writes only PROXY headers for TCP; [`decode`] exists for tests
//! and test backends and accepts exactly what a TCP proxy sends.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};

/// The 12 bytes every v2 header starts with; chosen by the spec so they
/// cannot begin a valid v1 header or common protocol.
pub const SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";

/// Signature, version/command, family/transport and the 2-byte length.
const FIXED_LEN: usize = 16;

/// Version 2 in the high nibble of byte 12.
const VERSION_2: u8 = 0x20;
/// Command for a connection made by the proxy itself (health checks).
const COMMAND_LOCAL: u8 = 0x00;
/// Command for a relayed connection: the addresses are the real ones.
const COMMAND_PROXY: u8 = 0x01;

/// Family/transport byte: TCP over IPv4.
const TCP_OVER_IPV4: u8 = 0x11;
/// Family/transport byte: TCP over IPv6.
const TCP_OVER_IPV6: u8 = 0x21;

/// Address block for IPv4: two 4-byte addresses, two ports.
const IPV4_BLOCK_LEN: u16 = 12;
/// Address block for IPv6: two 16-byte addresses, two ports.
const IPV6_BLOCK_LEN: u16 = 36;

/// Why bytes are not a PROXY v2 header this crate can use.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProxyHeaderError {
    /// The bytes do not start with the v2 signature: the peer does not
    /// speak PROXY v2 (or a v1 text header was sent).
    #[error(
        "not a PROXY protocol v2 header: signature byte {offset} is {found:#04x}, expected {expected:#04x}"
    )]
    BadSignature {
        /// Position of the first differing byte.
        offset: usize,
        /// The byte received there.
        found: u8,
        /// The signature byte expected there.
        expected: u8,
    },
    /// The version nibble is not 2.
    #[error(
        "PROXY protocol header has version {version} (byte 12 is {byte:#04x}); only version 2 is supported"
    )]
    UnsupportedVersion {
        /// The version nibble.
        version: u8,
        /// The whole version/command byte, for debugging captures.
        byte: u8,
    },
    /// The command nibble is neither LOCAL (0) nor PROXY (1).
    #[error(
        "PROXY protocol v2 command {command} is undefined (byte 12 is {byte:#04x}); only 0 LOCAL and 1 PROXY exist"
    )]
    UnknownCommand {
        /// The command nibble.
        command: u8,
        /// The whole version/command byte.
        byte: u8,
    },
    /// A complete, valid LOCAL header: the sender opened the connection for
    /// itself (e.g. a health check) and carries no client address. Not a
    /// failure of the peer; the caller skips `header_len` bytes and treats
    /// the connection as unproxied.
    #[error(
        "PROXY protocol v2 LOCAL header of {header_len} bytes: the proxy's own connection, no client address"
    )]
    Local {
        /// Bytes to skip to reach the payload, TLVs included.
        header_len: usize,
    },
    /// The family/transport is not TCP over IPv4 or IPv6 (UDP, UNIX
    /// sockets, UNSPEC on a PROXY command, or undefined values).
    #[error(
        "PROXY protocol v2 family/transport {byte:#04x} is not supported; only TCP over IPv4 (0x11) and TCP over IPv6 (0x21)"
    )]
    UnsupportedFamily {
        /// The family/transport byte (13).
        byte: u8,
    },
    /// The declared length cannot hold the addresses of the declared family.
    #[error(
        "PROXY protocol v2 header declares {declared} address bytes, fewer than the {needed} that {family} needs"
    )]
    LengthTooShort {
        /// "TCP over IPv4" or "TCP over IPv6".
        family: &'static str,
        /// The length field.
        declared: u16,
        /// The address block size of the family.
        needed: u16,
    },
}

/// Encodes the header for a proxied TCP connection from `client` to `local` (the address the client connected to). Mixed families: map IPv4 to IPv4-mapped IPv6 and use the IPv6 form.
pub fn encode(client: SocketAddr, local: SocketAddr) -> Vec<u8> {
    let mut header = Vec::with_capacity(FIXED_LEN + usize::from(IPV6_BLOCK_LEN));
    header.extend_from_slice(&SIGNATURE);
    header.push(VERSION_2 | COMMAND_PROXY);
    match (client.ip(), local.ip()) {
        (IpAddr::V4(source), IpAddr::V4(destination)) => {
            header.push(TCP_OVER_IPV4);
            header.extend_from_slice(&IPV4_BLOCK_LEN.to_be_bytes());
            header.extend_from_slice(&source.octets());
            header.extend_from_slice(&destination.octets());
        }
        (source, destination) => {
            header.push(TCP_OVER_IPV6);
            header.extend_from_slice(&IPV6_BLOCK_LEN.to_be_bytes());
            header.extend_from_slice(&as_ipv6(source).octets());
            header.extend_from_slice(&as_ipv6(destination).octets());
        }
    }
    header.extend_from_slice(&client.port().to_be_bytes());
    header.extend_from_slice(&local.port().to_be_bytes());
    header
}

/// An address in IPv6 form; IPv4 becomes `::ffff:a.b.c.d`.
fn as_ipv6(ip: IpAddr) -> Ipv6Addr {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    }
}

/// Parses a header at the start of `buf` (for tests and test backends): Ok(Some((client, local, header_len))), Ok(None) if more bytes are needed, Err on anything malformed (bad signature, version, unsupported command/family, length too short for the family).
///
/// Errors are reported as soon as the bytes that show them have arrived,
/// so a non-PROXY peer is rejected after its first differing byte. TLVs
/// after the addresses are skipped (`header_len` covers them). A complete
/// LOCAL header gives [`ProxyHeaderError::Local`] with its length, whatever
/// its family. IPv6 addresses are returned as sent, IPv4-mapped ones
/// included.
pub fn decode(buf: &[u8]) -> Result<Option<(SocketAddr, SocketAddr, usize)>, ProxyHeaderError> {
    for (offset, (&found, &expected)) in buf.iter().zip(SIGNATURE.iter()).enumerate() {
        if found != expected {
            return Err(ProxyHeaderError::BadSignature {
                offset,
                found,
                expected,
            });
        }
    }
    let Some(&version_command) = buf.get(SIGNATURE.len()) else {
        return Ok(None);
    };
    let version = version_command >> 4;
    if version != VERSION_2 >> 4 {
        return Err(ProxyHeaderError::UnsupportedVersion {
            version,
            byte: version_command,
        });
    }
    let command = version_command & 0x0f;
    if command != COMMAND_LOCAL && command != COMMAND_PROXY {
        return Err(ProxyHeaderError::UnknownCommand {
            command,
            byte: version_command,
        });
    }
    let Some(&family) = buf.get(13) else {
        return Ok(None);
    };
    let needed = match family {
        _ if command == COMMAND_LOCAL => 0,
        TCP_OVER_IPV4 => IPV4_BLOCK_LEN,
        TCP_OVER_IPV6 => IPV6_BLOCK_LEN,
        byte => return Err(ProxyHeaderError::UnsupportedFamily { byte }),
    };
    let Some(&[high, low]) = buf.get(14..FIXED_LEN) else {
        return Ok(None);
    };
    let declared = u16::from_be_bytes([high, low]);
    if declared < needed {
        return Err(ProxyHeaderError::LengthTooShort {
            family: if family == TCP_OVER_IPV4 {
                "TCP over IPv4"
            } else {
                "TCP over IPv6"
            },
            declared,
            needed,
        });
    }
    let header_len = FIXED_LEN + usize::from(declared);
    let Some(body) = buf.get(FIXED_LEN..header_len) else {
        return Ok(None);
    };
    if command == COMMAND_LOCAL {
        return Err(ProxyHeaderError::Local { header_len });
    }
    let (client, local) = if family == TCP_OVER_IPV4 {
        let (addresses, ports) = body.split_at(8);
        let source = Ipv4Addr::from(octets::<4>(&addresses[..4]));
        let destination = Ipv4Addr::from(octets::<4>(&addresses[4..]));
        let (source_port, destination_port) = ports_of(ports);
        (
            SocketAddr::V4(SocketAddrV4::new(source, source_port)),
            SocketAddr::V4(SocketAddrV4::new(destination, destination_port)),
        )
    } else {
        let (addresses, ports) = body.split_at(32);
        let source = Ipv6Addr::from(octets::<16>(&addresses[..16]));
        let destination = Ipv6Addr::from(octets::<16>(&addresses[16..]));
        let (source_port, destination_port) = ports_of(ports);
        (
            SocketAddr::V6(SocketAddrV6::new(source, source_port, 0, 0)),
            SocketAddr::V6(SocketAddrV6::new(destination, destination_port, 0, 0)),
        )
    };
    Ok(Some((client, local, header_len)))
}

/// The first `N` bytes of `bytes` as an array; callers have checked the
/// length, and a short slice is zero-padded rather than panicking.
fn octets<const N: usize>(bytes: &[u8]) -> [u8; N] {
    let mut out = [0u8; N];
    for (to, from) in out.iter_mut().zip(bytes) {
        *to = *from;
    }
    out
}

/// Source and destination port from the 4 bytes after the addresses.
fn ports_of(bytes: &[u8]) -> (u16, u16) {
    let [a, b, c, d] = octets::<4>(bytes);
    (u16::from_be_bytes([a, b]), u16::from_be_bytes([c, d]))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(text: &str) -> SocketAddr {
        text.parse().unwrap()
    }

    #[test]
    fn ipv4_header_matches_the_spec_bytes() {
        let header = encode(addr("192.0.2.10:51234"), addr("198.51.100.1:443"));
        #[rustfmt::skip]
        let expected: [u8; 28] = [
            // signature
            0x0d, 0x0a, 0x0d, 0x0a, 0x00, 0x0d, 0x0a, 0x51, 0x55, 0x49, 0x54, 0x0a,
            0x21,       // version 2, PROXY
            0x11,       // TCP over IPv4
            0x00, 0x0c, // 12 address bytes follow
            192, 0, 2, 10,   // source address
            198, 51, 100, 1, // destination address
            0xc8, 0x22, // source port 51234
            0x01, 0xbb, // destination port 443
        ];
        assert_eq!(header, expected);
    }

    #[test]
    fn round_trips() {
        let cases = [
            (
                "192.0.2.10:51234",
                "198.51.100.1:443",
                "192.0.2.10:51234",
                "198.51.100.1:443",
                28,
            ),
            (
                "[2001:db8::7]:40000",
                "[2001:db8::1]:8443",
                "[2001:db8::7]:40000",
                "[2001:db8::1]:8443",
                52,
            ),
            // Mixed families: the IPv4 side comes back IPv4-mapped.
            (
                "192.0.2.10:1",
                "[2001:db8::1]:2",
                "[::ffff:192.0.2.10]:1",
                "[2001:db8::1]:2",
                52,
            ),
            (
                "[2001:db8::7]:3",
                "198.51.100.1:4",
                "[2001:db8::7]:3",
                "[::ffff:198.51.100.1]:4",
                52,
            ),
        ];
        for (client, local, want_client, want_local, len) in cases {
            let header = encode(addr(client), addr(local));
            assert_eq!(header.len(), len);
            assert_eq!(
                decode(&header),
                Ok(Some((addr(want_client), addr(want_local), len))),
                "{client} -> {local}"
            );
            // Payload after the header is not part of it.
            let mut with_payload = header.clone();
            with_payload.extend_from_slice(b"GET / HTTP/1.1\r\n");
            assert_eq!(decode(&with_payload).unwrap().unwrap().2, len);
        }
    }

    #[test]
    fn truncated_header_needs_more_bytes() {
        for header in [
            encode(addr("192.0.2.10:1"), addr("198.51.100.1:2")),
            encode(addr("[2001:db8::7]:3"), addr("[2001:db8::1]:4")),
        ] {
            for cut in 0..header.len() {
                assert_eq!(decode(&header[..cut]), Ok(None), "cut at {cut}");
            }
        }
    }

    #[test]
    fn corrupted_headers_are_rejected() {
        let good = encode(addr("192.0.2.10:1"), addr("198.51.100.1:2"));
        let corrupt = |at: usize, value: u8| {
            let mut bytes = good.clone();
            bytes[at] = value;
            bytes
        };
        assert_eq!(
            decode(&corrupt(7, b'X')),
            Err(ProxyHeaderError::BadSignature {
                offset: 7,
                found: b'X',
                expected: b'Q'
            })
        );
        // Rejected from the first wrong byte, without waiting for more.
        assert!(matches!(
            decode(b"\r\nGET"),
            Err(ProxyHeaderError::BadSignature { offset: 2, .. })
        ));
        assert!(matches!(
            decode(b"PROXY TCP4 192.0.2.10 198.51.100.1 1 2\r\n"),
            Err(ProxyHeaderError::BadSignature { offset: 0, .. })
        ));
        assert_eq!(
            decode(&corrupt(12, 0x11)),
            Err(ProxyHeaderError::UnsupportedVersion {
                version: 1,
                byte: 0x11
            })
        );
        assert_eq!(
            decode(&corrupt(12, 0x22)),
            Err(ProxyHeaderError::UnknownCommand {
                command: 2,
                byte: 0x22
            })
        );
        for family in [0x00, 0x12, 0x22, 0x31, 0x32, 0x41] {
            assert_eq!(
                decode(&corrupt(13, family)),
                Err(ProxyHeaderError::UnsupportedFamily { byte: family })
            );
        }
        assert_eq!(
            decode(&corrupt(15, 11)),
            Err(ProxyHeaderError::LengthTooShort {
                family: "TCP over IPv4",
                declared: 11,
                needed: 12
            })
        );
        let v6 = encode(addr("[2001:db8::7]:3"), addr("[2001:db8::1]:4"));
        let mut short_v6 = v6[..FIXED_LEN].to_vec();
        short_v6[15] = 12;
        assert!(matches!(
            decode(&short_v6),
            Err(ProxyHeaderError::LengthTooShort { needed: 36, .. })
        ));
    }

    #[test]
    fn tlvs_after_the_addresses_are_skipped() {
        let mut header = encode(addr("192.0.2.10:51234"), addr("198.51.100.1:443"));
        // PP2_TYPE_AUTHORITY "lb.example" (type 0x02, length 10) and a NOOP TLV (type 0x04, length 2).
        let tlvs: &[u8] = b"\x02\x00\x0alb.example\x04\x00\x02\x00\x00";
        header[14..16].copy_from_slice(&(12 + tlvs.len() as u16).to_be_bytes());
        header.extend_from_slice(tlvs);
        let total = header.len();
        assert_eq!(total, 28 + 18);
        assert_eq!(decode(&header[..total - 1]), Ok(None));
        header.extend_from_slice(b"payload");
        assert_eq!(
            decode(&header),
            Ok(Some((
                addr("192.0.2.10:51234"),
                addr("198.51.100.1:443"),
                total
            )))
        );
    }

    #[test]
    fn local_command_is_reported_with_its_length() {
        let mut header = SIGNATURE.to_vec();
        header.extend_from_slice(&[0x20, 0x00, 0x00, 0x03, 0xaa, 0xbb]);
        assert_eq!(decode(&header), Ok(None));
        header.push(0xcc);
        assert_eq!(
            decode(&header),
            Err(ProxyHeaderError::Local { header_len: 19 })
        );
        let message = decode(&header).unwrap_err().to_string();
        assert!(message.contains("LOCAL"), "{message}");
    }
}
