//! Raw Ethernet frames of IP takeover, built and read without IO: gratuitous ARP (request and
//! reply forms), RFC 5227 ARP probes, IPv6 unsolicited neighbour advertisements and DAD-style
//! solicitations, and the readers that spot another host claiming an address.

use std::net::{Ipv4Addr, Ipv6Addr};

use pnet::datalink::MacAddr;

/// EtherType of ARP frames.
pub(super) const ETHERTYPE_ARP: u16 = 0x0806;
/// EtherType of IPv6 frames.
pub(super) const ETHERTYPE_IPV6: u16 = 0x86dd;
/// IPv6 next-header value of ICMPv6.
pub(super) const IPPROTO_ICMPV6: u8 = 58;
/// ICMPv6 type of a neighbour solicitation.
pub(super) const ICMPV6_NEIGHBOR_SOLICITATION: u8 = 135;
/// ICMPv6 type of a neighbour advertisement.
pub(super) const ICMPV6_NEIGHBOR_ADVERTISEMENT: u8 = 136;
/// Override flag of a neighbour advertisement (first byte of the flags word).
pub(super) const NA_FLAG_OVERRIDE: u8 = 0x20;
/// ND option type carrying the target's link-layer address.
pub(super) const ND_OPT_TARGET_LL_ADDR: u8 = 2;
/// Length of an Ethernet header without VLAN tag.
pub(super) const ETH_HEADER_LEN: usize = 14;
/// Length of an ARP payload for Ethernet/IPv4.
pub(super) const ARP_LEN: usize = 28;
/// Minimum Ethernet frame without FCS; short frames are padded to it so NICs that do not pad still send valid frames.
pub(super) const ETH_MIN_FRAME: usize = 60;
/// Length of the fixed IPv6 header.
pub(super) const IPV6_HEADER_LEN: usize = 40;
/// Ethernet broadcast address: gratuitous ARP must reach every host on the segment.
pub(super) const BROADCAST_MAC: [u8; 6] = [0xff; 6];

/// Appends an Ethernet header.
pub(super) fn push_ethernet(frame: &mut Vec<u8>, dst: [u8; 6], src: [u8; 6], ethertype: u16) {
    frame.extend_from_slice(&dst);
    frame.extend_from_slice(&src);
    frame.extend_from_slice(&ethertype.to_be_bytes());
}

/// An Ethernet/IPv4 ARP frame, padded to the 60-byte Ethernet minimum.
pub(super) fn arp_frame(
    opcode: u16,
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    sender: ([u8; 6], Ipv4Addr),
    target: ([u8; 6], Ipv4Addr),
) -> Vec<u8> {
    let mut frame = Vec::with_capacity(ETH_MIN_FRAME);
    push_ethernet(&mut frame, dst_mac, src_mac, ETHERTYPE_ARP);
    frame.extend_from_slice(&1u16.to_be_bytes()); // hardware type: Ethernet
    frame.extend_from_slice(&0x0800u16.to_be_bytes()); // protocol type: IPv4
    frame.push(6); // hardware address length
    frame.push(4); // protocol address length
    frame.extend_from_slice(&opcode.to_be_bytes());
    frame.extend_from_slice(&sender.0);
    frame.extend_from_slice(&sender.1.octets());
    frame.extend_from_slice(&target.0);
    frame.extend_from_slice(&target.1.octets());
    frame.resize(ETH_MIN_FRAME, 0);
    frame
}

/// Gratuitous ARP request: who-has VIP tell VIP, broadcast, target MAC zero.
pub(super) fn garp_request_frame(mac: [u8; 6], vip: Ipv4Addr) -> Vec<u8> {
    arp_frame(1, mac, BROADCAST_MAC, (mac, vip), ([0; 6], vip))
}

/// Gratuitous ARP reply: VIP is-at our MAC, broadcast; target fields repeat the sender (RFC 5944 §4.6).
pub(super) fn garp_reply_frame(mac: [u8; 6], vip: Ipv4Addr) -> Vec<u8> {
    arp_frame(2, mac, BROADCAST_MAC, (mac, vip), (mac, vip))
}

/// RFC 5227 ARP probe: sender IP 0.0.0.0 so no neighbour cache learns anything from it.
pub(super) fn arp_probe_frame(mac: [u8; 6], vip: Ipv4Addr) -> Vec<u8> {
    arp_frame(
        1,
        mac,
        BROADCAST_MAC,
        (mac, Ipv4Addr::UNSPECIFIED),
        ([0; 6], vip),
    )
}

/// The MAC of another host claiming `vip` in an ARP frame (its sender IP is `vip`), if this frame is one.
pub(super) fn arp_claimant(frame: &[u8], vip: Ipv4Addr, own_mac: [u8; 6]) -> Option<[u8; 6]> {
    if frame.len() < ETH_HEADER_LEN + ARP_LEN {
        return None;
    }
    if u16::from_be_bytes([frame[12], frame[13]]) != ETHERTYPE_ARP {
        return None;
    }
    let arp = &frame[ETH_HEADER_LEN..ETH_HEADER_LEN + ARP_LEN];
    let well_formed =
        arp[0..2] == [0, 1] && arp[2..4] == [0x08, 0x00] && arp[4] == 6 && arp[5] == 4;
    let opcode = u16::from_be_bytes([arp[6], arp[7]]);
    if !well_formed || !(opcode == 1 || opcode == 2) {
        return None;
    }
    let sha: [u8; 6] = arp[8..14].try_into().ok()?;
    let spa = Ipv4Addr::new(arp[14], arp[15], arp[16], arp[17]);
    (spa == vip && sha != own_mac).then_some(sha)
}

/// The Ethernet multicast MAC an IPv6 multicast group maps to (33:33 + low 32 bits).
pub(super) fn ipv6_multicast_mac(group: Ipv6Addr) -> [u8; 6] {
    let o = group.octets();
    [0x33, 0x33, o[12], o[13], o[14], o[15]]
}

/// The solicited-node multicast group of an address (ff02::1:ffXX:XXXX).
pub(super) fn solicited_node(ip: Ipv6Addr) -> Ipv6Addr {
    let o = ip.octets();
    Ipv6Addr::from([
        0xff, 0x02, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x01, 0xff, o[13], o[14], o[15],
    ])
}

/// ICMPv6 checksum over the IPv6 pseudo-header and the message (whose checksum field must be zero).
pub(super) fn icmpv6_checksum(src: Ipv6Addr, dst: Ipv6Addr, message: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    let mut add = |bytes: &[u8]| {
        for chunk in bytes.chunks(2) {
            let word = if chunk.len() == 2 {
                u16::from_be_bytes([chunk[0], chunk[1]])
            } else {
                u16::from_be_bytes([chunk[0], 0])
            };
            sum += u32::from(word);
        }
    };
    add(&src.octets());
    add(&dst.octets());
    add(&(message.len() as u32).to_be_bytes());
    add(&[0, 0, 0, IPPROTO_ICMPV6]);
    add(message);
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An Ethernet/IPv6 frame carrying an ICMPv6 message with hop limit 255 (required for ND), checksum filled in.
pub(super) fn icmpv6_frame(
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    src: Ipv6Addr,
    dst: Ipv6Addr,
    mut message: Vec<u8>,
) -> Vec<u8> {
    message[2] = 0;
    message[3] = 0;
    let checksum = icmpv6_checksum(src, dst, &message);
    message[2..4].copy_from_slice(&checksum.to_be_bytes());
    let mut frame = Vec::with_capacity(ETH_HEADER_LEN + IPV6_HEADER_LEN + message.len());
    push_ethernet(&mut frame, dst_mac, src_mac, ETHERTYPE_IPV6);
    frame.extend_from_slice(&[0x60, 0, 0, 0]); // version 6, traffic class 0, flow label 0
    frame.extend_from_slice(&(message.len() as u16).to_be_bytes());
    frame.push(IPPROTO_ICMPV6);
    frame.push(255); // hop limit: receivers drop ND messages with anything else
    frame.extend_from_slice(&src.octets());
    frame.extend_from_slice(&dst.octets());
    frame.extend_from_slice(&message);
    frame
}

/// Unsolicited neighbour advertisement for `vip` to ff02::1: Override set, Solicited clear, target link-layer option.
pub(super) fn unsolicited_na_frame(mac: [u8; 6], vip: Ipv6Addr) -> Vec<u8> {
    let all_nodes = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1);
    let mut message = vec![
        ICMPV6_NEIGHBOR_ADVERTISEMENT,
        0,
        0,
        0,
        NA_FLAG_OVERRIDE,
        0,
        0,
        0,
    ];
    message.extend_from_slice(&vip.octets());
    message.extend_from_slice(&[ND_OPT_TARGET_LL_ADDR, 1]);
    message.extend_from_slice(&mac);
    icmpv6_frame(mac, ipv6_multicast_mac(all_nodes), vip, all_nodes, message)
}

/// DAD-style neighbour solicitation for `vip` from :: to its solicited-node group, without source link-layer option (RFC 4862 §5.4.2).
pub(super) fn dad_solicitation_frame(mac: [u8; 6], vip: Ipv6Addr) -> Vec<u8> {
    let group = solicited_node(vip);
    let mut message = vec![ICMPV6_NEIGHBOR_SOLICITATION, 0, 0, 0, 0, 0, 0, 0];
    message.extend_from_slice(&vip.octets());
    icmpv6_frame(
        mac,
        ipv6_multicast_mac(group),
        Ipv6Addr::UNSPECIFIED,
        group,
        message,
    )
}

/// The MAC of another host advertising `vip` in a neighbour advertisement, if this frame is one.
///
/// Takes the target link-layer option when present, else the Ethernet source.
pub(super) fn na_claimant(frame: &[u8], vip: Ipv6Addr, own_mac: [u8; 6]) -> Option<[u8; 6]> {
    let icmp_at = ETH_HEADER_LEN + IPV6_HEADER_LEN;
    if frame.len() < icmp_at + 24 {
        return None;
    }
    if u16::from_be_bytes([frame[12], frame[13]]) != ETHERTYPE_IPV6 {
        return None;
    }
    let ip = &frame[ETH_HEADER_LEN..icmp_at];
    if ip[0] >> 4 != 6 || ip[6] != IPPROTO_ICMPV6 || ip[7] != 255 {
        return None;
    }
    let payload_len = usize::from(u16::from_be_bytes([ip[4], ip[5]]));
    let end = (icmp_at + payload_len).min(frame.len());
    let icmp = &frame[icmp_at..end];
    if icmp.len() < 24 || icmp[0] != ICMPV6_NEIGHBOR_ADVERTISEMENT || icmp[1] != 0 {
        return None;
    }
    let target: [u8; 16] = icmp[8..24].try_into().ok()?;
    if Ipv6Addr::from(target) != vip {
        return None;
    }
    let mut mac: Option<[u8; 6]> = None;
    let mut options = &icmp[24..];
    while options.len() >= 8 {
        let len = usize::from(options[1]) * 8;
        if len == 0 || len > options.len() {
            break;
        }
        if options[0] == ND_OPT_TARGET_LL_ADDR && len >= 8 {
            mac = options[2..8].try_into().ok();
        }
        options = &options[len..];
    }
    let mac = match mac {
        Some(mac) => mac,
        None => frame[6..12].try_into().ok()?,
    };
    (mac != own_mac).then_some(mac)
}

/// pnet's MAC type from raw bytes.
pub(super) fn mac_addr(m: [u8; 6]) -> MacAddr {
    MacAddr::new(m[0], m[1], m[2], m[3], m[4], m[5])
}

#[cfg(test)]
mod tests {
    use super::*;
    use pnet::packet::Packet;
    use pnet::packet::arp::{ArpOperations, ArpPacket};
    use pnet::packet::ethernet::{EtherTypes, EthernetPacket};
    use pnet::packet::icmpv6::{self, Icmpv6Packet, Icmpv6Types};
    use pnet::packet::ipv6::Ipv6Packet;

    /// Solicited flag of a neighbour advertisement: must be clear in an unsolicited one.
    const NA_FLAG_SOLICITED: u8 = 0x40;
    const MAC_A: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0x00, 0x0a];
    const MAC_B: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0x00, 0x0b];

    #[test]
    fn takeover_garp_request_fields() {
        let vip: Ipv4Addr = "10.213.1.100".parse().unwrap();
        let frame = garp_request_frame(MAC_A, vip);
        assert_eq!(frame.len(), 60);
        let eth = EthernetPacket::new(&frame).unwrap();
        assert_eq!(eth.get_destination(), MacAddr::broadcast());
        assert_eq!(eth.get_source(), mac_addr(MAC_A));
        assert_eq!(eth.get_ethertype(), EtherTypes::Arp);
        let arp = ArpPacket::new(eth.payload()).unwrap();
        assert_eq!(arp.get_operation(), ArpOperations::Request);
        assert_eq!(arp.get_sender_hw_addr(), mac_addr(MAC_A));
        assert_eq!(arp.get_sender_proto_addr(), vip);
        assert_eq!(arp.get_target_hw_addr(), MacAddr::zero());
        assert_eq!(arp.get_target_proto_addr(), vip);
    }

    #[test]
    fn takeover_garp_reply_fields() {
        let vip: Ipv4Addr = "10.213.1.100".parse().unwrap();
        let frame = garp_reply_frame(MAC_A, vip);
        let eth = EthernetPacket::new(&frame).unwrap();
        assert_eq!(eth.get_destination(), MacAddr::broadcast());
        assert_eq!(eth.get_ethertype(), EtherTypes::Arp);
        let arp = ArpPacket::new(eth.payload()).unwrap();
        assert_eq!(arp.get_operation(), ArpOperations::Reply);
        assert_eq!(arp.get_sender_hw_addr(), mac_addr(MAC_A));
        assert_eq!(arp.get_sender_proto_addr(), vip);
        assert_eq!(arp.get_target_proto_addr(), vip);
    }

    #[test]
    fn takeover_arp_probe_and_claim_detection() {
        let vip: Ipv4Addr = "10.213.1.100".parse().unwrap();
        let probe = arp_probe_frame(MAC_A, vip);
        let eth = EthernetPacket::new(&probe).unwrap();
        let arp = ArpPacket::new(eth.payload()).unwrap();
        assert_eq!(arp.get_operation(), ArpOperations::Request);
        assert_eq!(arp.get_sender_proto_addr(), Ipv4Addr::UNSPECIFIED);
        assert_eq!(arp.get_target_proto_addr(), vip);
        // Our own probe and own announcements are not claims by someone else.
        assert_eq!(arp_claimant(&probe, vip, MAC_A), None);
        assert_eq!(
            arp_claimant(&garp_request_frame(MAC_A, vip), vip, MAC_A),
            None
        );
        // Another host's probe (sender 0.0.0.0) is not a claim either.
        assert_eq!(arp_claimant(&arp_probe_frame(MAC_B, vip), vip, MAC_A), None);
        // A reply or a gratuitous request from B with sender IP = VIP is.
        let reply = arp_frame(
            2,
            MAC_B,
            MAC_A,
            (MAC_B, vip),
            (MAC_A, Ipv4Addr::UNSPECIFIED),
        );
        assert_eq!(arp_claimant(&reply, vip, MAC_A), Some(MAC_B));
        assert_eq!(
            arp_claimant(&garp_request_frame(MAC_B, vip), vip, MAC_A),
            Some(MAC_B)
        );
        // Other addresses and truncated frames are ignored.
        let other: Ipv4Addr = "10.213.1.101".parse().unwrap();
        assert_eq!(
            arp_claimant(&garp_reply_frame(MAC_B, other), vip, MAC_A),
            None
        );
        assert_eq!(arp_claimant(&reply[..30], vip, MAC_A), None);
    }

    fn check_icmpv6(frame: &[u8]) -> (Ipv6Addr, Ipv6Addr, Vec<u8>) {
        let eth = EthernetPacket::new(frame).unwrap();
        assert_eq!(eth.get_ethertype(), EtherTypes::Ipv6);
        let ip = Ipv6Packet::new(eth.payload()).unwrap();
        assert_eq!(ip.get_version(), 6);
        assert_eq!(ip.get_hop_limit(), 255);
        assert_eq!(ip.get_next_header().0, IPPROTO_ICMPV6);
        assert_eq!(usize::from(ip.get_payload_length()), ip.payload().len());
        let icmp = Icmpv6Packet::new(ip.payload()).unwrap();
        let expected = icmpv6::checksum(&icmp, &ip.get_source(), &ip.get_destination());
        assert_eq!(
            icmp.get_checksum(),
            expected,
            "ICMPv6 checksum (pnet's computation)"
        );
        // Independent check: the one's-complement sum over pseudo-header + message is 0xffff.
        assert_eq!(
            icmpv6_checksum(ip.get_source(), ip.get_destination(), ip.payload()),
            0
        );
        (ip.get_source(), ip.get_destination(), ip.payload().to_vec())
    }

    #[test]
    fn takeover_unsolicited_na_fields() {
        let vip: Ipv6Addr = "fd00:213::100".parse().unwrap();
        let frame = unsolicited_na_frame(MAC_A, vip);
        let eth = EthernetPacket::new(&frame).unwrap();
        assert_eq!(eth.get_destination(), MacAddr::new(0x33, 0x33, 0, 0, 0, 1));
        assert_eq!(eth.get_source(), mac_addr(MAC_A));
        let (src, dst, icmp) = check_icmpv6(&frame);
        assert_eq!(src, vip);
        assert_eq!(dst, "ff02::1".parse::<Ipv6Addr>().unwrap());
        assert_eq!(icmp[0], 136);
        assert_eq!(
            Icmpv6Packet::new(&icmp).unwrap().get_icmpv6_type(),
            Icmpv6Types::NeighborAdvert
        );
        assert_eq!(icmp[1], 0);
        assert_ne!(icmp[4] & NA_FLAG_OVERRIDE, 0, "Override flag");
        assert_eq!(
            icmp[4] & NA_FLAG_SOLICITED,
            0,
            "Solicited must be clear for unsolicited NA"
        );
        assert_eq!(icmp[4] & 0x80, 0, "Router flag clear");
        assert_eq!(&icmp[8..24], &vip.octets());
        assert_eq!(&icmp[24..26], &[2, 1]);
        assert_eq!(&icmp[26..32], &MAC_A);
        assert_eq!(na_claimant(&frame, vip, MAC_B), Some(MAC_A));
        assert_eq!(na_claimant(&frame, vip, MAC_A), None);
        assert_eq!(
            na_claimant(&frame, "fd00:213::101".parse().unwrap(), MAC_B),
            None
        );
    }

    #[test]
    fn takeover_dad_solicitation_fields() {
        let vip: Ipv6Addr = "fd00:213::12:3456".parse().unwrap();
        let frame = dad_solicitation_frame(MAC_A, vip);
        let eth = EthernetPacket::new(&frame).unwrap();
        assert_eq!(
            eth.get_destination(),
            MacAddr::new(0x33, 0x33, 0xff, 0x12, 0x34, 0x56)
        );
        let (src, dst, icmp) = check_icmpv6(&frame);
        assert_eq!(src, Ipv6Addr::UNSPECIFIED);
        assert_eq!(dst, "ff02::1:ff12:3456".parse::<Ipv6Addr>().unwrap());
        assert_eq!(icmp[0], 135);
        assert_eq!(&icmp[8..24], &vip.octets());
        assert_eq!(icmp.len(), 24, "no source link-layer option from ::");
        assert_eq!(
            na_claimant(&frame, vip, MAC_B),
            None,
            "a solicitation is not a claim"
        );
    }
}
