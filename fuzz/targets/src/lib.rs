//! What each fuzz target does with its bytes. `fuzz/` (outside the workspace) drives these
//! functions with libFuzzer on the stable toolchain; this crate's tests replay the committed
//! corpora and the inputs of past crashes through them, so `cargo test` keeps them fixed.
//!
//! Every target feeds the bytes to the code the daemon runs on input from the network, a
//! file or the command line, and checks a property on top of "does not panic": what a
//! decoder accepts it can encode again, a decision made on a prefix of a stream is the one
//! made on the whole, a refused command changes nothing, applying is deterministic.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::OnceLock;

use spaced_fabric::{
    Command, DeviceAssignment, DeviceMode, Fabric, NewDevice, PlacementKind, ServiceScope,
    ServiceSpec,
};
use spaced_raft::codec;
use spaced_raft::frame::{FrameBudget, MAX_FRAME, read_frame_within};

/// The targets, by name (the file names under `fuzz/fuzz_targets/` and `fuzz/corpus/`).
pub const TARGETS: &[(&str, fn(&[u8]))] = &[
    ("raft_frame", raft_frame),
    ("admin_frame", admin_frame),
    ("dr_frame", dr_frame),
    ("device_hello", device_hello),
    ("http_head", http_head),
    ("lb_peek", lb_peek),
    ("proxy_v2", proxy_v2),
    ("guard_line", guard_line),
    ("config", config),
    ("csv_import", csv_import),
    ("fabric_apply", fabric_apply),
];

/// Reads one frame of at most `max` bytes from `data` as a server does (against a budget),
/// and returns its body.
fn frame(data: &[u8], max: usize) -> Option<Vec<u8>> {
    let budget = FrameBudget::new(MAX_FRAME);
    let mut reader = data;
    let frame = futures::executor::block_on(read_frame_within(&mut reader, max, &budget));
    frame.ok().flatten().map(|f| f.bytes)
}

/// A node's QUIC stream carrying Raft: a frame, then a request (as the server decodes it)
/// or a reply (as the dialer does). What decodes encodes again.
pub fn raft_frame(data: &[u8]) {
    let Some(body) = frame(data, MAX_FRAME) else {
        return;
    };
    if let Ok(req) = codec::decode::<spaced_raft::network::RaftRequest>(&body) {
        codec::encode(&req).expect("a decoded Raft request encodes");
    }
    if let Ok(reply) = codec::decode::<spaced_raft::network::WireReply>(&body) {
        codec::encode(&reply).expect("a decoded Raft reply encodes");
    }
}

/// spacectl's stream: a frame, a signed request, the request inside it; and a reply.
pub fn admin_frame(data: &[u8]) {
    use spaced_node::admin::{AdminReply, AdminRequest, MAX_ADMIN_FRAME, SignedRequest};
    let Some(body) = frame(data, MAX_ADMIN_FRAME) else {
        return;
    };
    if let Ok(signed) = codec::decode::<SignedRequest>(&body) {
        if let Ok(req) = codec::decode::<AdminRequest>(&signed.request) {
            codec::encode(&req).expect("a decoded admin request encodes");
            if let AdminRequest::Write(cmd) = &req {
                let _ = spaced_node::admin::server::admin_may_write(cmd);
            }
        }
    }
    if let Ok(reply) = codec::decode::<AdminReply>(&body) {
        codec::encode(&reply).expect("a decoded admin reply encodes");
    }
}

/// The disaster-recovery link between two sites: a request frame and a reply.
pub fn dr_frame(data: &[u8]) {
    use spaced_replication::protocol::{DrReply, DrRequest, MAX_REQUEST};
    let Some(body) = frame(data, MAX_REQUEST) else {
        return;
    };
    if let Ok(req) = codec::decode::<DrRequest>(&body) {
        codec::encode(&req).expect("a decoded DR request encodes");
    }
    if let Ok(reply) = codec::decode::<DrReply>(&body) {
        codec::encode(&reply).expect("a decoded DR reply encodes");
    }
}

/// A device-initiated connection's first line. An accepted id is a valid device id.
pub fn device_hello(data: &[u8]) {
    let mut reader = data;
    let hello = futures::executor::block_on(spaced_node::devices::agent::read_hello(&mut reader));
    if let Ok(id) = hello {
        spaced_fabric::check_device_id(&id).expect("an accepted hello is a valid device id");
        assert!(!id.contains('\n') && !id.contains('\r'), "{id:?}");
    }
}

/// The status page's HTTP server reading a request head.
pub fn http_head(data: &[u8]) {
    use spaced_node::ops::http::{Head, MAX_HEADER_BYTES, read_head};
    let mut reader = data;
    if let Ok(Head::Request { method, path }) = futures::executor::block_on(read_head(&mut reader))
    {
        assert!(!method.is_empty() && method.len() + path.len() <= MAX_HEADER_BYTES + 2048);
    }
}

/// The balancer's peek at a connection's first bytes for a JSESSIONID route. A decision
/// made on a prefix (as when the request arrives in pieces) is the one made on the whole.
pub fn lb_peek(data: &[u8]) {
    use spaced_lb::peek::{Peeked, session_route};
    let whole = session_route(data);
    for cut in [data.len() / 2, data.len().saturating_sub(1)] {
        match session_route(&data[..cut]) {
            Peeked::Incomplete => {}
            early => assert_eq!(
                early,
                whole,
                "decided on {cut} of {} bytes, then changed its mind",
                data.len()
            ),
        }
    }
    if let Peeked::Route(r) = whole {
        assert!(!r.is_empty());
    }
}

/// A PROXY v2 header (the balancer writes them; test backends read them). A header read is
/// within the bytes given, and what is written is read back the same.
pub fn proxy_v2(data: &[u8]) {
    use spaced_lb::proxy_v2::{decode, encode};
    if let Ok(Some((client, local, len))) = decode(data) {
        assert!(len <= data.len());
        let again = encode(client, local);
        match decode(&again) {
            Ok(Some((c, l, n))) if n == again.len() => {
                // IPv4 and IPv6 mixed are sent as IPv6 (IPv4-mapped).
                if client.is_ipv4() == local.is_ipv4() {
                    assert_eq!((c, l), (client, local));
                }
            }
            other => panic!("encode({client}, {local}) reads back as {other:?}"),
        }
    }
}

/// The fence guard's line protocol (spaced → its guard process).
pub fn guard_line(data: &[u8]) {
    let line = String::from_utf8_lossy(data);
    let _ = spaced_node::takeover::guard::parse_line(&line);
}

/// A node's config file.
pub fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = spaced_node::ops::config::NodeConfig::parse_str(text, Path::new("/fuzz/spaced.toml"));
}

/// `spacectl device import`'s CSV. Accepted rows are valid devices, at most one per line.
pub fn csv_import(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(rows) = spaced_node::ctl::parse_import(text) {
        assert!(rows.len() <= text.lines().count());
        for (_, d) in rows {
            spaced_fabric::check_device_id(&d.id).expect("an imported id is valid");
        }
    }
}

/// The fabric the command sequences start from: three nodes, two VIPs (one held), a
/// singleton service, three devices (one assigned).
pub fn start_fabric() -> &'static Fabric {
    static START: OnceLock<Fabric> = OnceLock::new();
    START.get_or_init(|| {
        let mut f = Fabric::default();
        for c in start_commands() {
            f.apply(&c).expect("the start fabric's commands apply");
        }
        f
    })
}

/// The commands that build [`start_fabric`] (the seed corpus uses them too).
pub fn start_commands() -> Vec<Command> {
    let roles = |r: &[&str]| r.iter().map(|s| s.to_string()).collect::<BTreeSet<_>>();
    let node = |id: u64, r: &[&str]| Command::RegisterNode {
        id,
        name: format!("n{id}"),
        raft_addr: format!("127.0.0.1:{}", 7000 + id),
        mgmt_ip: None,
        roles: roles(r),
        at: 1,
    };
    let vip = |name: &str, address: &str, r: &[&str]| Command::AddPlacement {
        name: name.into(),
        kind: PlacementKind::Vip {
            address: address.into(),
            interface: "eth0".into(),
        },
        eligible_roles: roles(r),
    };
    vec![
        node(1, &["ha", "app"]),
        node(2, &["ha", "app"]),
        node(3, &["db"]),
        vip("cluster", "10.0.0.100/24", &["ha"]),
        vip("db", "10.0.0.101/24", &["db"]),
        Command::GrantPlacement {
            name: "cluster".into(),
            to: 1,
            expected_epoch: 0,
        },
        Command::PutService {
            name: "poller".into(),
            spec: ServiceSpec {
                command: vec!["/bin/sleep".into(), "60".into()],
                scope: ServiceScope::Singleton,
                health_check: None,
                roles: roles(&["app"]),
            },
        },
        Command::AddDevices {
            devices: ["d1", "d2", "d3"]
                .iter()
                .map(|id| NewDevice {
                    id: id.to_string(),
                    addr: "10.1.0.1:830".into(),
                    mode: DeviceMode::SpaceInitiated,
                })
                .collect(),
            at: 2,
        },
        Command::AssignDevices {
            assignments: vec![DeviceAssignment {
                device: "d1".into(),
                from: None,
                to: Some(1),
            }],
            at: 3,
        },
    ]
}

/// Commands read one after another from the bytes, applied at rising log indexes to two
/// copies of [`start_fabric`]: both give the same results and the same fabric, a refused
/// command leaves the fabric as it was, and the fabric survives a snapshot's encoding.
pub fn fabric_apply(data: &[u8]) {
    let mut a = start_fabric().clone();
    let mut b = a.clone();
    let mut rest = data;
    let mut index = 100;
    while let Ok((cmd, used)) = codec::decode_prefix::<Command>(rest) {
        rest = &rest[used.max(1).min(rest.len())..];
        index += 1;
        let before = a.clone();
        let ra = a.apply_at(index, &cmd);
        let rb = b.apply_at(index, &cmd);
        assert_eq!(ra, rb, "{cmd:?} gave two results");
        assert_eq!(a, b, "{cmd:?} left two fabrics");
        if ra.is_err() {
            assert_eq!(a, before, "the refused {cmd:?} changed the fabric");
        }
        if rest.is_empty() {
            break;
        }
    }
    let bytes = codec::encode(&a).expect("a fabric encodes");
    let back: Fabric = codec::decode(&bytes).expect("an encoded fabric decodes");
    assert_eq!(back, a, "a fabric changed through its encoding");
}

/// A frame: the body's length (4 bytes, big-endian), then the body.
fn framed(body: &[u8]) -> Vec<u8> {
    let mut out = (body.len() as u32).to_be_bytes().to_vec();
    out.extend_from_slice(body);
    out
}

/// Well-formed inputs for each target, from which libFuzzer starts (`fuzz/run --seed` writes
/// them to `fuzz/corpus/`; the replay test runs them as well).
pub fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    use spaced_node::admin::{AdminRequest, SignedRequest};
    use spaced_raft::network::{LeaseTerms, RaftRequest, RaftRpc};
    let enc = |v: &dyn Fn() -> Result<Vec<u8>, codec::CodecError>| v().expect("a seed encodes");
    let terms = LeaseTerms {
        duration_ms: 300,
        renew_every_ms: 75,
        margin_ms: 50,
        drift_ppm: 1000,
    };
    let mut out: Vec<(&'static str, Vec<u8>)> = Vec::new();
    let rpcs = vec![
        RaftRpc::Describe,
        RaftRpc::Renew {
            held: vec![("cluster".into(), 7)],
            terms,
        },
        RaftRpc::Silence {
            keys: vec![("cluster".into(), 7, 2)],
            terms,
        },
        RaftRpc::Propose(start_commands()[5].clone()),
        RaftRpc::Release {
            name: "cluster".into(),
            epoch: 7,
        },
        RaftRpc::CheckVip {
            address: "10.0.0.100/24".into(),
            interface: "eth0".into(),
        },
        RaftRpc::Leaving,
        RaftRpc::SiteHold,
    ];
    for rpc in rpcs {
        let req = RaftRequest { from: 2, rpc };
        out.push(("raft_frame", framed(&enc(&|| codec::encode(&req)))));
    }
    for req in [
        AdminRequest::Status,
        AdminRequest::ListDevices,
        AdminRequest::Write(start_commands()[3].clone()),
        AdminRequest::AddDevices(vec![NewDevice {
            id: "d9".into(),
            addr: "10.1.0.9".into(),
            mode: DeviceMode::DeviceInitiated,
        }]),
    ] {
        let signed = SignedRequest {
            request: enc(&|| codec::encode(&req)),
            at_ms: 1_700_000_000_000,
            nonce: 42,
            signature: spaced_raft::proof::Signature {
                scheme: 0x0403,
                bytes: vec![0x30; 70],
            },
        };
        out.push(("admin_frame", framed(&enc(&|| codec::encode(&signed)))));
    }
    let hold = spaced_replication::protocol::DrRequest::Hold(spaced_replication::witness::Hold {
        pair: ("east".into(), "west".into()),
        site: "east".into(),
        epoch: 3,
        lease_ms: 3000,
    });
    out.push(("dr_frame", framed(&enc(&|| codec::encode(&hold)))));
    for hello in ["d1\n", "router-17.lab\r\n", "x\r\nmore"] {
        out.push(("device_hello", hello.as_bytes().to_vec()));
    }
    for head in [
        "GET /metrics HTTP/1.1\r\nHost: n1\r\n\r\n",
        "GET /api/status?x=1 HTTP/1.0\r\nAccept: */*\r\nUser-Agent: curl\r\n\r\n",
    ] {
        out.push(("http_head", head.as_bytes().to_vec()));
    }
    for req in [
        "GET /app HTTP/1.1\r\nHost: v\r\nCookie: a=b; JSESSIONID=abc123.n2\r\n\r\n",
        "POST /app;jsessionid=xyz.n1?q=1 HTTP/1.1\r\nHost: v\r\n\r\n",
        "GET / HTTP/1.1\r\nHost: v\r\n\r\n",
        "\x16\x03\x01\x02\x00",
    ] {
        out.push(("lb_peek", req.as_bytes().to_vec()));
    }
    for (c, l) in [
        ("192.0.2.1:40000", "10.0.0.100:80"),
        ("[2001:db8::1]:40000", "[2001:db8::100]:443"),
    ] {
        let header =
            spaced_lb::proxy_v2::encode(c.parse().expect("addr"), l.parse().expect("addr"));
        out.push(("proxy_v2", header));
    }
    for line in [
        "hold cluster 10.0.0.100/24 eth0 123456789 7",
        "hold-group poller 4242 99999 3",
        "members 1=n1@127.0.0.1:7001 2=n2@127.0.0.1:7002",
        "drop cluster",
        "identity\t3\t/etc/spaced/ca.pem\t/etc/spaced/n3.pem\t/etc/spaced/n3.key",
    ] {
        out.push(("guard_line", line.as_bytes().to_vec()));
    }
    out.push((
        "config",
        include_bytes!("../../../contrib/deb/spaced.toml.example").to_vec(),
    ));
    out.push((
        "csv_import",
        b"id,addr,mode\n# lab\nd1,10.0.0.1\nd2,10.0.0.2:830,device-initiated\n".to_vec(),
    ));
    let mut seq = Vec::new();
    for cmd in [
        Command::ReleasePlacement {
            name: "cluster".into(),
            epoch: start_fabric().placements["cluster"].epoch,
        },
        Command::GrantPlacement {
            name: "db".into(),
            to: 3,
            expected_epoch: 0,
        },
        Command::RemoveDevice { id: "d2".into() },
        Command::AssignDevices {
            assignments: vec![DeviceAssignment {
                device: "d3".into(),
                from: None,
                to: Some(2),
            }],
            at: 9,
        },
    ] {
        seq.extend(enc(&|| codec::encode(&cmd)));
        out.push(("fabric_apply", seq.clone()));
    }
    out
}
