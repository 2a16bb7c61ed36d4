//! A balancer's counters, kept as plain atomics on the hot path and rendered as Prometheus text on demand.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::backend::Backends;
use crate::relay::RelayCounters;

/// Counters of one balancer (one listener).
#[derive(Debug, Default)]
pub struct LbStats {
    /// Connections accepted and handed to a backend choice.
    pub accepted: AtomicU64,
    /// Connections open right now (client side).
    pub active: AtomicU64,
    /// Connections refused at accept because `max_conns` were open.
    pub refused_limit: AtomicU64,
    /// Connections closed because no backend was up (or all attempts failed).
    pub no_backend: AtomicU64,
    /// Failed backend connection attempts (each was redispatched if a retry was left).
    pub connect_errors: AtomicU64,
    /// Connections routed by a session route found in the peeked request.
    pub sticky_routed: AtomicU64,
    /// Peeks that ran out of time before the first request was complete.
    pub peek_timeouts: AtomicU64,
    /// Relays that ended with an error other than a peer's reset.
    pub relay_errors: AtomicU64,
    /// Relays ended by a peer's reset, a write to a closed peer or a half-close forwarded to a
    /// peer already gone (common at teardown).
    pub relay_resets: AtomicU64,
    /// Relays closed by the idle timeout.
    pub idle_closed: AtomicU64,
    /// Connections cut when a drain's grace period ran out.
    pub drain_cut: AtomicU64,
    /// Bytes moved by splice(2), each way, updated as they move.
    pub spliced: RelayCounters,
    /// Bytes written from user space, each way: small messages (the relay
    /// copies until a read fills its buffer) and PROXY protocol headers.
    pub copied: RelayCounters,
}

/// Reads an atomic counter.
fn get(c: &AtomicU64) -> u64 {
    c.load(Ordering::Relaxed)
}

/// One balancer's figures to render: its label, counters, backends, and whether it accepts.
pub struct Rendered<'a> {
    /// `listener` label value, e.g. `10.0.0.100:443`.
    pub listener: &'a str,
    /// Its counters.
    pub stats: &'a LbStats,
    /// Its backends.
    pub backends: &'a Backends,
    /// Whether it currently accepts connections (VIP held, or standalone).
    pub accepting: bool,
}

/// Appends Prometheus text for all `balancers`, one HELP/TYPE block per metric.
pub fn render_prometheus(balancers: &[Rendered<'_>], out: &mut String) {
    type Field = fn(&LbStats) -> u64;
    let scalar: [(&str, &str, &str, Field); 11] = [
        (
            "spaced_lb_connections_total",
            "counter",
            "Client connections accepted.",
            |s| get(&s.accepted),
        ),
        (
            "spaced_lb_connections_active",
            "gauge",
            "Client connections open now.",
            |s| get(&s.active),
        ),
        (
            "spaced_lb_refused_total",
            "counter",
            "Connections refused at accept because max_conns were open.",
            |s| get(&s.refused_limit),
        ),
        (
            "spaced_lb_no_backend_total",
            "counter",
            "Connections closed because no backend was up or reachable.",
            |s| get(&s.no_backend),
        ),
        (
            "spaced_lb_connect_errors_total",
            "counter",
            "Failed backend connection attempts.",
            |s| get(&s.connect_errors),
        ),
        (
            "spaced_lb_sticky_routed_total",
            "counter",
            "Connections routed by a JSESSIONID route.",
            |s| get(&s.sticky_routed),
        ),
        (
            "spaced_lb_peek_timeouts_total",
            "counter",
            "First requests not complete within the peek timeout.",
            |s| get(&s.peek_timeouts),
        ),
        (
            "spaced_lb_relay_errors_total",
            "counter",
            "Relays ended by an error other than a peer's reset.",
            |s| get(&s.relay_errors),
        ),
        (
            "spaced_lb_relay_resets_total",
            "counter",
            "Relays ended by a peer that went away (reset, broken pipe, not connected).",
            |s| get(&s.relay_resets),
        ),
        (
            "spaced_lb_idle_closed_total",
            "counter",
            "Relays closed by the idle timeout.",
            |s| get(&s.idle_closed),
        ),
        (
            "spaced_lb_drain_cut_total",
            "counter",
            "Connections cut at the end of a drain's grace period.",
            |s| get(&s.drain_cut),
        ),
    ];
    for (name, kind, help, field) in scalar {
        header(out, name, kind, help);
        for b in balancers {
            let _ = writeln!(
                out,
                "{name}{{listener=\"{}\"}} {}",
                b.listener,
                field(b.stats)
            );
        }
    }

    header(
        out,
        "spaced_lb_accepting",
        "gauge",
        "1 while the balancer accepts connections (it holds the VIP), 0 otherwise.",
    );
    for b in balancers {
        let _ = writeln!(
            out,
            "spaced_lb_accepting{{listener=\"{}\"}} {}",
            b.listener,
            u8::from(b.accepting)
        );
    }

    for (name, help, by) in [
        (
            "spaced_lb_splice_bytes_total",
            "Bytes moved by splice(2), by direction.",
            (|s| &s.spliced) as fn(&LbStats) -> &RelayCounters,
        ),
        (
            "spaced_lb_copy_bytes_total",
            "Bytes written from user space (small messages, PROXY headers), by direction.",
            |s| &s.copied,
        ),
    ] {
        header(out, name, "counter", help);
        for b in balancers {
            let counters = by(b.stats);
            for (direction, counter) in [
                ("client_to_backend", &counters.client_to_backend),
                ("backend_to_client", &counters.backend_to_client),
            ] {
                let _ = writeln!(
                    out,
                    "{name}{{listener=\"{}\",direction=\"{direction}\"}} {}",
                    b.listener,
                    get(counter)
                );
            }
        }
    }

    type BackendField = fn(&crate::backend::Backend) -> u64;
    let per_backend: [(&str, &str, &str, BackendField); 5] = [
        (
            "spaced_lb_backend_up",
            "gauge",
            "1 if the health checks consider the backend up.",
            |b| u64::from(b.is_up()),
        ),
        (
            "spaced_lb_backend_connections_active",
            "gauge",
            "Connections relayed to the backend now.",
            |b| b.active(),
        ),
        (
            "spaced_lb_backend_connections_total",
            "counter",
            "Connections relayed to the backend.",
            |b| b.total(),
        ),
        (
            "spaced_lb_backend_connect_errors_total",
            "counter",
            "Failed connection attempts to the backend from the data path.",
            |b| b.connect_errors(),
        ),
        (
            "spaced_lb_backend_transitions_total",
            "counter",
            "Health state changes of the backend.",
            |b| b.transitions(),
        ),
    ];
    for (name, kind, help, field) in per_backend {
        header(out, name, kind, help);
        for b in balancers {
            for backend in b.backends.snapshot().iter() {
                let _ = writeln!(
                    out,
                    "{name}{{listener=\"{}\",backend=\"{}\",addr=\"{}\"}} {}",
                    b.listener,
                    escape(backend.name()),
                    backend.spec.addr,
                    field(backend)
                );
            }
        }
    }
}

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

/// Escapes a label value (names come from configuration and the fabric).
fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::BackendSpec;

    #[test]
    fn renders_counters_and_backends_with_labels() {
        let stats = LbStats::default();
        stats.accepted.store(5, Ordering::Relaxed);
        stats
            .spliced
            .backend_to_client
            .store(1234, Ordering::Relaxed);
        stats.copied.client_to_backend.store(28, Ordering::Relaxed);
        let backends = Backends::new();
        backends.update(&[BackendSpec {
            name: "n\"2".into(),
            addr: "127.0.0.1:80".parse().unwrap(),
        }]);
        let mut out = String::new();
        render_prometheus(
            &[Rendered {
                listener: "10.0.0.1:80",
                stats: &stats,
                backends: &backends,
                accepting: true,
            }],
            &mut out,
        );
        assert!(out.contains("spaced_lb_connections_total{listener=\"10.0.0.1:80\"} 5\n"));
        assert!(out.contains(
            "spaced_lb_splice_bytes_total{listener=\"10.0.0.1:80\",direction=\"backend_to_client\"} 1234\n"
        ));
        assert!(out.contains(
            "spaced_lb_copy_bytes_total{listener=\"10.0.0.1:80\",direction=\"client_to_backend\"} 28\n"
        ));
        assert_eq!(
            out.matches("# TYPE spaced_lb_copy_bytes_total counter")
                .count(),
            1
        );
        assert!(out.contains(
            "spaced_lb_backend_up{listener=\"10.0.0.1:80\",backend=\"n\\\"2\",addr=\"127.0.0.1:80\"} 1\n"
        ));
        assert!(out.contains("spaced_lb_accepting{listener=\"10.0.0.1:80\"} 1\n"));
        assert_eq!(out.matches("# TYPE spaced_lb_backend_up gauge").count(), 1);
    }
}
