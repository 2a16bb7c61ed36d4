//! Helpers shared by the balancer's integration tests.

/// Segments the kernel counted into the socket whose local port is `port`, in state
/// `state` (`ss -ti`'s `segs_in`).
pub fn segments_in(state: &str, port: u16) -> u64 {
    let out = std::process::Command::new("ss")
        .args(["-tinH", "state", state, &format!("sport = :{port}")])
        .output()
        .expect("ss (iproute2) runs");
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace()
        .find_map(|w| w.strip_prefix("segs_in:"))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no segs_in for port {port} in state {state}: {text:?}"))
}
