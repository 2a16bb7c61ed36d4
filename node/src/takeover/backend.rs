//! The real VIP backend: netlink address + gratuitous ARP / NA, an RFC 5227 probe before
//! claiming, and a fence guard process that takes the address down if `spaced` dies or stalls.

use std::sync::Arc;
use std::time::{Duration, Instant};

use spaced_raft::network::BoxFuture;

use crate::placement::agent::{HoldError, VipBackend, VipSpec};
use crate::takeover::guard::{GuardCell, GuardError};
use crate::takeover::{Takeover, TakeoverError, VipAddr};

/// Probe before claiming: one ARP probe, then 5 ms of listening (RFC 5227's seconds-long
/// timing is for address autoconfiguration, not for a failover path; a conflicting host on the
/// same LAN answers within a millisecond, and the probe is for a foreign host holding the
/// address, not a safety mechanism between nodes: the leases are). Every millisecond here is
/// one more of every failover.
const PROBES: u32 = 1;
const PROBE_INTERVAL: Duration = Duration::from_millis(5);
const PROBE_WAIT: Duration = Duration::from_millis(5);
/// How long a netlink request may go unanswered before it counts as failed (the kernel answers
/// in well under a millisecond; a stuck answer must not stall a self-fence).
const NETLINK_WITHIN: Duration = Duration::from_secs(1);

/// Runs a netlink request within `limit`.
async fn within<T>(
    limit: Duration,
    action: &'static str,
    addr: &VipAddr,
    request: impl std::future::Future<Output = Result<T, TakeoverError>>,
) -> Result<T, TakeoverError> {
    tokio::time::timeout(limit, request)
        .await
        .map_err(|_| TakeoverError::Netlink {
            action,
            address: addr.address.to_string(),
            interface: addr.interface.clone(),
            detail: format!("no answer within {limit:?}"),
        })?
}

/// Netlink/raw-frame backend, shared by the agent's tasks.
pub struct NetlinkBackend {
    /// netlink + raw sockets in this process's namespace.
    tk: Arc<Takeover>,
    /// Started on the first VIP this node takes.
    guard: Arc<GuardCell>,
}

impl From<TakeoverError> for HoldError {
    fn from(e: TakeoverError) -> Self {
        HoldError::Host(e.to_string())
    }
}

impl From<GuardError> for HoldError {
    fn from(e: GuardError) -> Self {
        HoldError::Guard(e.to_string())
    }
}

impl NetlinkBackend {
    /// Opens netlink; the fence guard, once started, is moved into `fence`.
    pub async fn new(fence: crate::ops::config::FenceCgroup) -> Result<Self, TakeoverError> {
        let tk = Takeover::new().await?;
        Ok(NetlinkBackend {
            tk: Arc::new(tk),
            guard: Arc::new(GuardCell::new("VIPs", fence)),
        })
    }

    /// The fence guard of this backend's VIPs (the root tells it how to report its fence).
    pub fn guard_cell(&self) -> Arc<GuardCell> {
        self.guard.clone()
    }

    /// The VIP can live on this host: interface present, address inside one of its subnets.
    pub async fn check(&self, address: &str, interface: &str) -> Result<(), TakeoverError> {
        check_address(&self.tk, address, interface).await
    }

    /// Removes the address of a VIP this node does not hold, if it is up here: called at
    /// start-up, before this node holds any lease, for what a killed predecessor left behind.
    /// Returns whether there was one.
    pub async fn remove_leftover(
        &self,
        address: &str,
        interface: &str,
    ) -> Result<bool, TakeoverError> {
        let addr = VipAddr::parse(address, interface)?;
        if !within(
            NETLINK_WITHIN,
            "look up address",
            &addr,
            self.tk.present(&addr),
        )
        .await?
        {
            return Ok(false);
        }
        within(
            NETLINK_WITHIN,
            "remove address",
            &addr,
            self.tk.remove(&addr),
        )
        .await?;
        Ok(true)
    }
}

/// Interface present in this namespace, address inside one of its subnets.
async fn check_address(tk: &Takeover, address: &str, interface: &str) -> Result<(), TakeoverError> {
    let vip = VipAddr::parse(address, interface)?;
    tk.check(&vip).await
}

impl VipBackend for NetlinkBackend {
    fn guard_state(&self) -> Option<(Option<bool>, u64)> {
        Some(self.guard.state())
    }

    fn is_up(&self, vip: VipSpec) -> BoxFuture<'static, Option<bool>> {
        let tk = self.tk.clone();
        Box::pin(async move {
            let addr = VipAddr::parse(&vip.address, &vip.interface).ok()?;
            within(NETLINK_WITHIN, "look up address", &addr, tk.present(&addr))
                .await
                .ok()
        })
    }

    fn check(&self, vip: VipSpec) -> BoxFuture<'static, Result<(), HoldError>> {
        let tk = self.tk.clone();
        Box::pin(async move {
            crate::takeover::check_capabilities()
                .map_err(|e| HoldError::Host(format!("this node cannot hold VIPs: {e}")))?;
            Ok(check_address(&tk, &vip.address, &vip.interface).await?)
        })
    }

    /// Guard started, address parsed, capabilities, then (unless the address is already up
    /// here) one ARP probe or DAD solicitation: another host answering for it is a refusal.
    fn prepare(&self, vip: VipSpec) -> BoxFuture<'static, Result<(), HoldError>> {
        let tk = self.tk.clone();
        let guard_ok = self.guard.get().map(|_| ());
        Box::pin(async move {
            guard_ok?;
            let addr = VipAddr::parse(&vip.address, &vip.interface)?;
            crate::takeover::check_capabilities()?;
            if within(NETLINK_WITHIN, "look up address", &addr, tk.present(&addr)).await? {
                return Ok(());
            }
            if let Some(mac) = tk.probe(&addr, PROBES, PROBE_INTERVAL, PROBE_WAIT).await? {
                // Which host that is, as far as this host's neighbour table knows it.
                let holders = within(
                    NETLINK_WITHIN,
                    "list neighbours",
                    &addr,
                    tk.neighbours_with_mac(&mac),
                )
                .await
                .unwrap_or_default();
                let mac = mac
                    .iter()
                    .map(|b| format!("{b:02x}"))
                    .collect::<Vec<_>>()
                    .join(":");
                return Err(HoldError::Conflict {
                    vip: vip.name.clone(),
                    address: vip.address.clone(),
                    interface: vip.interface.clone(),
                    mac,
                    holders,
                });
            }
            Ok(())
        })
    }

    /// Adds the address (if it is not up already) and announces it once.
    fn acquire(&self, vip: VipSpec) -> BoxFuture<'static, Result<(), HoldError>> {
        let tk = self.tk.clone();
        Box::pin(async move {
            let addr = VipAddr::parse(&vip.address, &vip.interface)?;
            within(NETLINK_WITHIN, "add address", &addr, tk.add(&addr)).await?;
            Ok(tk.announce(&addr)?)
        })
    }

    fn announce(&self, vip: VipSpec) -> BoxFuture<'static, Result<(), HoldError>> {
        let tk = self.tk.clone();
        Box::pin(async move {
            let addr = VipAddr::parse(&vip.address, &vip.interface)?;
            Ok(tk.announce(&addr)?)
        })
    }

    /// Removes the address first and only then lets the guard forget it: if the removal fails
    /// (or netlink does not answer), the guard still removes the address at the lease end,
    /// and the agent tries again on its next pass.
    fn release(&self, vip: VipSpec) -> BoxFuture<'static, Result<(), HoldError>> {
        let tk = self.tk.clone();
        let guard = self.guard.clone();
        Box::pin(async move {
            let addr = VipAddr::parse(&vip.address, &vip.interface)?;
            within(NETLINK_WITHIN, "remove address", &addr, tk.remove(&addr)).await?;
            if let Some(g) = guard.started() {
                let _ = g.drop_vip(&vip.name);
            }
            Ok(())
        })
    }
    fn announce_schedule(&self) -> Vec<Duration> {
        crate::takeover::announce_schedule()
            .iter()
            .copied()
            .filter(|d| !d.is_zero())
            .collect()
    }

    fn hold_until(&self, vip: &VipSpec, epoch: u64, until: Instant) {
        if let Err(e) = self.guard.send(|g| g.hold(vip, epoch, until)) {
            tracing::error!(vip = %vip.name, error = %e, "fence guard unreachable");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A netlink request that never answers (a wedged kernel socket, a stopped netlink task)
    /// must not hold the agent's fence up: it fails after its limit, naming the address, and
    /// the agent tries the fence again on its next pass.
    #[tokio::test]
    async fn a_netlink_call_that_never_answers_fails_after_its_limit() {
        let addr = VipAddr::parse("10.0.0.100/24", "eth0").unwrap();
        let never = std::future::pending::<Result<(), TakeoverError>>();
        // The outer limit only keeps a broken `within` from hanging the test run.
        let err = tokio::time::timeout(
            Duration::from_secs(30),
            within(Duration::from_millis(100), "remove address", &addr, never),
        )
        .await
        .expect("within never returned")
        .unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("remove address")
                && text.contains("10.0.0.100")
                && text.contains("no answer"),
            "{text}"
        );
    }
}
