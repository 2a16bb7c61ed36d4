//! Commands on placements (VIPs and singletons): add, remove, grant, release, refuse. Every
//! owner change increments the placement's epoch, the fencing token.

use std::collections::{BTreeMap, BTreeSet};

use crate::NodeId;
use crate::command::{CommandError, Outcome, holder};
use crate::model::{
    AdminState, Fabric, MAX_REFUSAL_REASON, Millis, Placement, PlacementKind, Refusal,
};
use crate::validate::{check_name, check_vip_address, exists, invalid, not_found, vip_ip};

impl Fabric {
    pub(super) fn add_placement(
        &mut self,
        name: &String,
        kind: &PlacementKind,
        eligible_roles: &BTreeSet<String>,
        index: u64,
    ) -> Result<Outcome, CommandError> {
        check_name("placement name", name)?;
        if self.placements.contains_key(name) {
            return Err(exists("placement", name));
        }
        self.check_placement_spec(name, kind, eligible_roles)?;
        self.placements.insert(
            name.clone(),
            Placement {
                kind: kind.clone(),
                eligible_roles: eligible_roles.clone(),
                owner: None,
                // Unique for the cluster's life: see `Fabric::apply_at`.
                epoch: index,
                refused: BTreeMap::new(),
            },
        );
        Ok(Outcome::Done)
    }

    /// `vip set`: a new spec for a VIP, checked as `add_placement` checks one; only its roles
    /// change while it is held (and only if its owner keeps one).
    pub(super) fn set_placement(
        &mut self,
        name: &String,
        kind: &PlacementKind,
        eligible_roles: &BTreeSet<String>,
    ) -> Result<Outcome, CommandError> {
        let p = self
            .placements
            .get(name)
            .ok_or_else(|| not_found("placement", name))?;
        if !matches!(p.kind, PlacementKind::Vip { .. })
            || !matches!(kind, PlacementKind::Vip { .. })
        {
            return Err(invalid(
                "placement",
                name,
                "only a VIP's spec is set this way (a singleton follows its service)",
            ));
        }
        // A held VIP keeps its address and interface; its roles may change while its owner
        // keeps one of them. Anything else needs the owner to fence and release it first.
        if let Some(owner) = p.owner {
            let why = if p.kind != *kind {
                Some(format!("held by node {owner}; release it first"))
            } else if self
                .nodes
                .get(&owner)
                .is_none_or(|n| n.roles.is_disjoint(eligible_roles))
            {
                Some(format!(
                    "held by node {owner}, which has none of the roles {eligible_roles:?}; \
                     release it first"
                ))
            } else {
                None
            };
            if let Some(why) = why {
                return Err(CommandError::InUse {
                    what: "placement".into(),
                    key: name.clone(),
                    why,
                });
            }
        }
        self.check_placement_spec(name, kind, eligible_roles)?;
        if let Some(p) = self.placements.get_mut(name) {
            p.kind = kind.clone();
            p.eligible_roles = eligible_roles.clone();
            p.refused.clear();
        }
        Ok(Outcome::Done)
    }

    /// The checks a placement's spec passes: roles, and a VIP's address (unique among the
    /// other placements) and interface.
    fn check_placement_spec(
        &self,
        name: &str,
        kind: &PlacementKind,
        eligible_roles: &BTreeSet<String>,
    ) -> Result<(), CommandError> {
        if eligible_roles.is_empty() {
            return Err(invalid(
                "eligible roles",
                "",
                "at least one role is required",
            ));
        }
        eligible_roles
            .iter()
            .try_for_each(|r| check_name("role", r))?;
        match kind {
            PlacementKind::Vip { address, interface } => {
                check_vip_address(address)?;
                if interface.is_empty() || interface.len() > 15 || interface.contains(['/', ' ']) {
                    return Err(invalid(
                        "interface",
                        interface,
                        "not a Linux interface name",
                    ));
                }
                let ip = vip_ip(address);
                let taken = self.placements.iter().find(|(other, p)| match &p.kind {
                    PlacementKind::Vip { address: a, .. } => {
                        other.as_str() != name && vip_ip(a) == ip
                    }
                    _ => false,
                });
                if let Some((other, _)) = taken {
                    return Err(CommandError::InUse {
                        what: "VIP address".into(),
                        key: address.clone(),
                        why: format!("placement {other:?} has it"),
                    });
                }
            }
            PlacementKind::Singleton { service } => check_name("service name", service)?,
        }
        Ok(())
    }

    pub(super) fn remove_placement(&mut self, name: &String) -> Result<Outcome, CommandError> {
        let p = self
            .placements
            .get(name)
            .ok_or_else(|| not_found("placement", name))?;
        if let Some(owner) = p.owner {
            return Err(CommandError::InUse {
                what: "placement".into(),
                key: name.clone(),
                why: format!("held by node {owner}; release it first"),
            });
        }
        self.placements.remove(name);
        Ok(Outcome::Done)
    }

    pub(super) fn grant_placement(
        &mut self,
        name: &String,
        to: &NodeId,
        expected_epoch: &u64,
    ) -> Result<Outcome, CommandError> {
        let node = self.nodes.get(to).ok_or_else(|| not_found("node", to))?;
        let p = placement_at(&mut self.placements, name, *expected_epoch)?;
        if node.admin_state != AdminState::Active {
            return Err(CommandError::NotEligible {
                name: name.clone(),
                node: *to,
                why: "node is draining".into(),
            });
        }
        if p.eligible_roles.is_disjoint(&node.roles) {
            return Err(CommandError::NotEligible {
                name: name.clone(),
                node: *to,
                why: format!("needs one of the roles {:?}", p.eligible_roles),
            });
        }
        if p.owner == Some(*to) {
            return Err(exists("owner of placement", format!("{name} on {to}")));
        }
        p.owner = Some(*to);
        p.epoch += 1;
        // A new try: the node refuses again if it still cannot hold it.
        p.refused.remove(to);
        Ok(Outcome::Epoch(p.epoch))
    }

    pub(super) fn release_placement(
        &mut self,
        name: &String,
        epoch: &u64,
    ) -> Result<Outcome, CommandError> {
        let p = placement_at(&mut self.placements, name, *epoch)?;
        if p.owner.is_none() {
            return Err(not_found("owner of placement", name));
        }
        p.owner = None;
        p.epoch += 1;
        Ok(Outcome::Epoch(p.epoch))
    }

    pub(super) fn refuse_placement(
        &mut self,
        name: &String,
        node: &NodeId,
        epoch: &u64,
        reason: &str,
        at: &Millis,
    ) -> Result<Outcome, CommandError> {
        let p = placement_at(&mut self.placements, name, *epoch)?;
        if p.owner != Some(*node) {
            return Err(CommandError::NotEligible {
                name: name.clone(),
                node: *node,
                why: format!("cannot refuse it: it is held by {}", holder(&p.owner)),
            });
        }
        let reason = match reason.trim() {
            "" => "no reason given".to_string(),
            r => cut_at_char(r, MAX_REFUSAL_REASON).to_string(),
        };
        p.owner = None;
        p.epoch += 1;
        p.refused.insert(*node, Refusal { reason, at: *at });
        Ok(Outcome::Epoch(p.epoch))
    }
}

/// Placement `name`, if its epoch is still `epoch` (the compare of a compare-and-set).
fn placement_at<'a>(
    placements: &'a mut BTreeMap<String, Placement>,
    name: &str,
    epoch: u64,
) -> Result<&'a mut Placement, CommandError> {
    let p = placements
        .get_mut(name)
        .ok_or_else(|| not_found("placement", name))?;
    if p.epoch != epoch {
        return Err(CommandError::StaleEpoch {
            name: name.to_string(),
            expected: epoch,
            current: p.epoch,
        });
    }
    Ok(p)
}

/// The longest prefix of `s` of at most `max` bytes that ends on a character boundary.
fn cut_at_char(s: &str, max: usize) -> &str {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}
