//! The real VIP backend: netlink address + gratuitous ARP / NA, an RFC 5227 probe before
//! claiming, and a fence guard process that takes the address down if `spaced` dies or stalls.

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use spaced_raft::network::BoxFuture;

use crate::placement::agent::{HoldError, VipBackend, VipSpec};
use crate::takeover::guard::{GuardError, GuardHandle};
use crate::takeover::{Takeover, TakeoverError, VipAddr};

/// Probe before claiming: one ARP probe, then 20 ms of listening (RFC 5227's seconds-long
/// timing is for address autoconfiguration, not for a failover path; a conflicting host on the
/// same LAN answers within a millisecond or two).
const PROBES: u32 = 1;
const PROBE_INTERVAL: Duration = Duration::from_millis(5);
const PROBE_WAIT: Duration = Duration::from_millis(20);

/// Netlink/raw-frame backend, shared by the agent's tasks.
pub struct NetlinkBackend {
    /// netlink + raw sockets in this process's namespace.
    tk: Arc<Takeover>,
    /// Started on the first VIP this node takes.
    guard: OnceLock<Result<GuardHandle, GuardError>>,
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
    /// Opens netlink.
    pub async fn new() -> Result<Self, TakeoverError> {
        let tk = Takeover::new().await?;
        Ok(NetlinkBackend {
            tk: Arc::new(tk),
            guard: OnceLock::new(),
        })
    }

    /// The VIP can live on this host: interface present, address inside one of its subnets.
    pub async fn check(&self, address: &str, interface: &str) -> Result<(), TakeoverError> {
        check_address(&self.tk, address, interface).await
    }

    fn guard(&self) -> Result<&GuardHandle, GuardError> {
        self.guard
            .get_or_init(GuardHandle::spawn)
            .as_ref()
            .map_err(|e| e.clone())
    }
}

/// Interface present in this namespace, address inside one of its subnets.
async fn check_address(tk: &Takeover, address: &str, interface: &str) -> Result<(), TakeoverError> {
    let vip = VipAddr::parse(address, interface)?;
    tk.check(&vip).await
}

impl VipBackend for NetlinkBackend {
    fn check(&self, vip: VipSpec) -> BoxFuture<'static, Result<(), HoldError>> {
        let tk = self.tk.clone();
        Box::pin(async move {
            crate::takeover::check_capabilities()
                .map_err(|e| HoldError::Host(format!("this node cannot hold VIPs: {e}")))?;
            Ok(check_address(&tk, &vip.address, &vip.interface).await?)
        })
    }

    fn acquire(&self, vip: VipSpec) -> BoxFuture<'static, Result<(), HoldError>> {
        let tk = self.tk.clone();
        let guard_ok = self.guard().map(|_| ());
        Box::pin(async move {
            guard_ok?;
            let addr = VipAddr::parse(&vip.address, &vip.interface)?;
            crate::takeover::check_capabilities()?;
            if !tk.present(&addr).await? {
                if let Some(mac) = tk.probe(&addr, PROBES, PROBE_INTERVAL, PROBE_WAIT).await? {
                    let mac = mac
                        .iter()
                        .map(|b| format!("{b:02x}"))
                        .collect::<Vec<_>>()
                        .join(":");
                    return Err(HoldError::Host(format!(
                        "refusing VIP {} ({}): host {mac} already answers for it on {}",
                        vip.name, vip.address, vip.interface
                    )));
                }
                tk.add(&addr).await?;
            }
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

    fn release(&self, vip: VipSpec) -> BoxFuture<'static, Result<(), HoldError>> {
        let tk = self.tk.clone();
        if let Some(Ok(g)) = self.guard.get() {
            let _ = g.drop_vip(&vip.name);
        }
        Box::pin(async move {
            let addr = VipAddr::parse(&vip.address, &vip.interface)?;
            Ok(tk.remove(&addr).await?)
        })
    }
    fn announce_schedule(&self) -> Vec<Duration> {
        crate::takeover::announce_schedule()
            .iter()
            .copied()
            .filter(|d| !d.is_zero())
            .collect()
    }

    fn hold_until(&self, vip: &VipSpec, until: Instant) {
        if let Ok(g) = self.guard()
            && let Err(e) = g.hold(vip, until)
        {
            tracing::error!(vip = %vip.name, error = %e, "fence guard unreachable");
        }
    }
}
