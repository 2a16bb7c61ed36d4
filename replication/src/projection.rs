//! The site-neutral part of a fabric (what a standby mirrors), the difference between two of
//! them, and the `Mirror` commands that bring a standby's fabric to its peer's.
//!
//! Site-local data is never mirrored: nodes, VIPs, owners, epochs, device status.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use spaced_fabric::command::MAX_MIRROR_CHANGES;
use spaced_fabric::{
    Command, DeviceMode, Fabric, Millis, MirrorPosition, NewDevice, ServiceScope, ServiceSpec,
};

/// Devices one mirrored `AddDevices` or `RemoveDevices` carries.
pub const DEVICES_PER_CHANGE: usize = 500;
/// Devices and services one `Mirror` command carries in all (keeps log entries small).
pub const ITEMS_PER_MIRROR: usize = 2_000;

/// What a standby takes from its active peer.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Projection {
    /// Device id → address and mode.
    pub devices: BTreeMap<String, (String, DeviceMode)>,
    /// Service specs by name (a singleton's placement comes with its spec).
    pub services: BTreeMap<String, ServiceSpec>,
}

/// What changed from one projection to another.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Delta {
    /// Devices new or changed: id, address, mode.
    pub devices_put: Vec<(String, String, DeviceMode)>,
    /// Devices gone.
    pub devices_gone: Vec<String>,
    /// Services new or changed.
    pub services_put: Vec<(String, ServiceSpec)>,
    /// Services gone.
    pub services_gone: Vec<String>,
}

impl Projection {
    /// The site-neutral part of `fabric`.
    pub fn of(fabric: &Fabric) -> Self {
        Projection {
            devices: fabric
                .devices
                .iter()
                .map(|(id, d)| (id.clone(), (d.addr.clone(), d.mode)))
                .collect(),
            services: fabric.services.clone(),
        }
    }

    /// Applies `delta` (made against this projection).
    pub fn apply(&mut self, delta: &Delta) {
        for id in &delta.devices_gone {
            self.devices.remove(id);
        }
        for (id, addr, mode) in &delta.devices_put {
            self.devices.insert(id.clone(), (addr.clone(), *mode));
        }
        for name in &delta.services_gone {
            self.services.remove(name);
        }
        for (name, spec) in &delta.services_put {
            self.services.insert(name.clone(), spec.clone());
        }
    }
}

impl Delta {
    /// Whether nothing changed.
    pub fn is_empty(&self) -> bool {
        self.devices_put.is_empty()
            && self.devices_gone.is_empty()
            && self.services_put.is_empty()
            && self.services_gone.is_empty()
    }

    /// How many devices and services it touches.
    pub fn len(&self) -> usize {
        self.devices_put.len()
            + self.devices_gone.len()
            + self.services_put.len()
            + self.services_gone.len()
    }
}

/// The most bytes (by [`Projection::weight`]) one reply of a projection or difference
/// carries; a larger projection goes in pages (a link frame holds 16 MiB).
pub const PAGE_BYTES: usize = 4 << 20;

/// Roughly how many bytes a device takes in a reply.
fn device_weight(id: &str, addr: &str) -> usize {
    id.len() + addr.len() + 8
}

/// Roughly how many bytes a service takes in a reply.
fn service_weight(name: &str, spec: &ServiceSpec) -> usize {
    name.len() + spec.command.iter().map(|c| c.len() + 8).sum::<usize>() + 64
}

/// One page of a projection too large for one reply: its devices in order of id, from just
/// after the previous page's last; the first page carries every service too.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Page {
    /// Whether this is the first page (a new transfer).
    pub first: bool,
    /// The devices and, on the first page, the services.
    pub part: Projection,
    /// Whether more pages follow.
    pub more: bool,
}

impl Projection {
    /// Roughly how many bytes it takes in a reply.
    pub fn weight(&self) -> usize {
        let services: usize = self
            .services
            .iter()
            .map(|(name, spec)| service_weight(name, spec))
            .sum();
        services
            + self
                .devices
                .iter()
                .map(|(id, (addr, _))| device_weight(id, addr))
                .sum::<usize>()
    }

    /// The page after device `after` (`None`: the first page) of at most about `budget`
    /// bytes (at least one device, if any is left).
    pub fn page(&self, after: Option<&str>, budget: usize) -> Page {
        use std::ops::Bound;
        let first = after.is_none();
        let start = after.map_or(Bound::Unbounded, Bound::Excluded);
        let range = self.devices.range::<str, _>((start, Bound::Unbounded));
        let mut part = Projection::default();
        if first {
            part.services = self.services.clone();
        }
        let mut used = part.weight();
        let mut more = false;
        for (id, v) in range {
            let w = device_weight(id, &v.0);
            if !part.devices.is_empty() && used + w > budget {
                more = true;
                break;
            }
            used += w;
            part.devices.insert(id.clone(), v.clone());
        }
        Page { first, part, more }
    }

    /// Adds a page's devices and services (a transfer in progress).
    pub fn extend(&mut self, page: Page) {
        self.devices.extend(page.part.devices);
        self.services.extend(page.part.services);
    }
}

impl Delta {
    /// Roughly how many bytes it takes in a reply.
    pub fn weight(&self) -> usize {
        self.devices_put
            .iter()
            .map(|(id, addr, _)| device_weight(id, addr))
            .chain(self.devices_gone.iter().map(|id| id.len() + 8))
            .sum::<usize>()
            + self
                .services_gone
                .iter()
                .map(|n| n.len() + 8)
                .sum::<usize>()
            + self
                .services_put
                .iter()
                .map(|(name, spec)| service_weight(name, spec))
                .sum::<usize>()
    }
}

/// What turns `from` into `to`.
pub fn diff(from: &Projection, to: &Projection) -> Delta {
    let mut d = Delta::default();
    for (id, v) in &to.devices {
        if from.devices.get(id) != Some(v) {
            d.devices_put.push((id.clone(), v.0.clone(), v.1));
        }
    }
    d.devices_gone = from
        .devices
        .keys()
        .filter(|id| !to.devices.contains_key(*id))
        .cloned()
        .collect();
    for (name, spec) in &to.services {
        if from.services.get(name) != Some(spec) {
            d.services_put.push((name.clone(), spec.clone()));
        }
    }
    d.services_gone = from
        .services
        .keys()
        .filter(|n| !to.services.contains_key(*n))
        .cloned()
        .collect();
    d
}

/// The `Mirror` commands that bring a standby whose projection is `own` to `remote`, in
/// order: services and devices that go (and changed devices, and services whose scope
/// changes between singleton and not, which the fabric does not change in place), then those
/// that come. The last command carries `position`; with nothing to change, one command
/// carries only the position.
pub fn mirror_commands(
    own: &Projection,
    remote: &Projection,
    position: MirrorPosition,
    at: Millis,
) -> Vec<Command> {
    let d = diff(own, remote);
    let singleton = |s: &ServiceSpec| s.scope == ServiceScope::Singleton;
    let mut changes: Vec<(usize, Command)> = Vec::new();
    let mut gone_services = d.services_gone.clone();
    for (name, spec) in &d.services_put {
        if own
            .services
            .get(name)
            .is_some_and(|o| singleton(o) != singleton(spec))
        {
            gone_services.push(name.clone());
        }
    }
    for name in gone_services {
        changes.push((1, Command::RemoveService { name }));
    }
    let mut gone_devices = d.devices_gone.clone();
    gone_devices.extend(
        d.devices_put
            .iter()
            .filter(|(id, ..)| own.devices.contains_key(id))
            .map(|(id, ..)| id.clone()),
    );
    for ids in gone_devices.chunks(DEVICES_PER_CHANGE) {
        changes.push((ids.len(), Command::RemoveDevices { ids: ids.to_vec() }));
    }
    let new: Vec<NewDevice> = d
        .devices_put
        .iter()
        .map(|(id, addr, mode)| NewDevice {
            id: id.clone(),
            addr: addr.clone(),
            mode: *mode,
        })
        .collect();
    for devices in new.chunks(DEVICES_PER_CHANGE) {
        changes.push((
            devices.len(),
            Command::AddDevices {
                devices: devices.to_vec(),
                at,
            },
        ));
    }
    for (name, spec) in d.services_put {
        changes.push((1, Command::PutService { name, spec }));
    }
    let mut out = Vec::new();
    let mut batch = Vec::new();
    let mut items = 0;
    for (weight, c) in changes {
        if !batch.is_empty()
            && (items + weight > ITEMS_PER_MIRROR || batch.len() == MAX_MIRROR_CHANGES)
        {
            out.push(Command::Mirror {
                changes: std::mem::take(&mut batch),
                position: None,
            });
            items = 0;
        }
        items += weight;
        batch.push(c);
    }
    out.push(Command::Mirror {
        changes: batch,
        position: Some(position),
    });
    out
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use spaced_fabric::{Outcome, SiteRole};

    use super::*;

    fn spec(cmd: &str, scope: ServiceScope) -> ServiceSpec {
        ServiceSpec {
            command: vec![cmd.into()],
            scope,
            health_check: None,
            roles: BTreeSet::from(["app".to_string()]),
        }
    }

    fn active(devices: usize) -> Fabric {
        let mut f = Fabric::default();
        let new: Vec<NewDevice> = (0..devices)
            .map(|i| NewDevice {
                id: format!("d{i}"),
                addr: format!("10.9.{}.{}", i / 250, i % 250 + 1),
                mode: DeviceMode::SpaceInitiated,
            })
            .collect();
        f.apply(&Command::AddDevices {
            devices: new,
            at: 1,
        })
        .unwrap();
        for (name, scope) in [
            ("poller", ServiceScope::Singleton),
            ("web", ServiceScope::EveryNode),
        ] {
            f.apply(&Command::PutService {
                name: name.into(),
                spec: spec(&format!("/bin/{name}"), scope),
            })
            .unwrap();
        }
        f
    }

    fn standby() -> Fabric {
        let mut f = Fabric::default();
        f.apply(&Command::SetSiteRole {
            role: SiteRole::Standby,
            epoch: 0,
            at: 1,
        })
        .unwrap();
        f
    }

    fn position(index: u64) -> MirrorPosition {
        MirrorPosition {
            site: "east".into(),
            index,
            sent_at: 7,
        }
    }

    /// Applies every command and checks none of their changes was refused.
    fn mirror(f: &mut Fabric, cmds: &[Command]) {
        for c in cmds {
            match f.apply(c).unwrap() {
                Outcome::Mirrored { refused, .. } => assert!(refused.is_empty(), "{refused:?}"),
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn a_standby_converges_on_its_peer_in_bounded_commands() {
        let mut a = active(4_500);
        let mut b = standby();
        let cmds = mirror_commands(&Projection::of(&b), &Projection::of(&a), position(10), 5);
        assert_eq!(cmds.len(), 3, "4,502 items in commands of at most 2,000");
        for c in &cmds[..2] {
            assert!(matches!(c, Command::Mirror { position: None, .. }));
        }
        mirror(&mut b, &cmds);
        assert_eq!(Projection::of(&b), Projection::of(&a));
        assert_eq!(b.site.mirror, Some(position(10)));
        assert!(b.placements.contains_key("poller"));

        // The peer moves on: a device removed, one readdressed, one added, a service
        // changed in place, one changed from every-node to singleton, one removed.
        a.apply(&Command::RemoveDevices {
            ids: vec!["d1".into(), "d2".into()],
        })
        .unwrap();
        a.apply(&Command::AddDevices {
            devices: vec![
                NewDevice {
                    id: "d2".into(),
                    addr: "10.200.0.2".into(),
                    mode: DeviceMode::DeviceInitiated,
                },
                NewDevice {
                    id: "new".into(),
                    addr: "10.200.0.3".into(),
                    mode: DeviceMode::SpaceInitiated,
                },
            ],
            at: 2,
        })
        .unwrap();
        a.apply(&Command::RemoveService { name: "web".into() })
            .unwrap();
        a.apply(&Command::PutService {
            name: "web".into(),
            spec: spec("/bin/web2", ServiceScope::Singleton),
        })
        .unwrap();
        a.apply(&Command::PutService {
            name: "poller".into(),
            spec: spec("/bin/poller --fast", ServiceScope::Singleton),
        })
        .unwrap();
        let d = diff(&Projection::of(&b), &Projection::of(&a));
        assert_eq!(d.devices_gone, vec!["d1".to_string()]);
        assert_eq!(d.devices_put.len(), 2);
        assert_eq!(d.services_put.len(), 2);
        let cmds = mirror_commands(&Projection::of(&b), &Projection::of(&a), position(20), 6);
        assert_eq!(cmds.len(), 1);
        mirror(&mut b, &cmds);
        assert_eq!(Projection::of(&b), Projection::of(&a));
        assert_eq!(b.devices["d2"].mode, DeviceMode::DeviceInitiated);

        // Nothing new: one command carries the position only.
        let cmds = mirror_commands(&Projection::of(&b), &Projection::of(&a), position(21), 7);
        assert_eq!(
            cmds,
            vec![Command::Mirror {
                changes: vec![],
                position: Some(position(21))
            }]
        );
    }

    #[test]
    fn pages_in_order_make_up_the_projection_each_within_its_budget() {
        let whole = Projection::of(&active(3_000));
        let budget = 10_000;
        assert!(whole.weight() > 5 * budget);
        let first = whole.page(None, budget);
        assert!(first.first && first.more);
        assert_eq!(first.part.services, whole.services);
        let mut got = Projection::default();
        let mut page = first;
        let mut pages = 1;
        loop {
            assert!(page.part.weight() <= budget, "page {pages} over its budget");
            assert!(!page.part.devices.is_empty());
            let last = page.part.devices.keys().next_back().cloned();
            let more = page.more;
            got.extend(page);
            if !more {
                break;
            }
            page = whole.page(last.as_deref(), budget);
            assert!(!page.first && page.part.services.is_empty());
            pages += 1;
        }
        assert_eq!(got, whole);
        assert!(pages > 5);
        // A projection within the budget is one page; a device larger than the budget still
        // goes (alone).
        let small = Projection::of(&active(3));
        let one = small.page(None, budget);
        assert!(!one.more);
        assert_eq!(one.part, small);
        let big = small.page(None, 1);
        assert_eq!(big.part.devices.len(), 1);
        assert!(big.more);
    }

    #[test]
    fn a_delta_applied_to_the_old_projection_gives_the_new_one() {
        let a = active(300);
        let mut b = a.clone();
        b.apply(&Command::RemoveDevices {
            ids: vec!["d7".into()],
        })
        .unwrap();
        b.apply(&Command::RemoveService { name: "web".into() })
            .unwrap();
        let (old, new) = (Projection::of(&a), Projection::of(&b));
        let d = diff(&old, &new);
        assert_eq!(d.len(), 2);
        let mut p = old.clone();
        p.apply(&d);
        assert_eq!(p, new);
        assert!(diff(&new, &new).is_empty());
    }
}
