//! Commands on service specs: put (a singleton's placement comes with it) and remove.

use std::collections::{BTreeMap, BTreeSet};

use crate::command::{CommandError, Outcome};
use crate::model::{Fabric, Placement, PlacementKind, ServiceScope, ServiceSpec};
use crate::validate::{check_name, exists, invalid, not_found};

impl Fabric {
    pub(super) fn put_service(
        &mut self,
        name: &String,
        spec: &ServiceSpec,
        index: u64,
    ) -> Result<Outcome, CommandError> {
        check_name("service name", name)?;
        if spec.command.first().is_none_or(|p| p.is_empty()) {
            return Err(invalid("service command", name, "must name a program"));
        }
        if let Some(hc) = &spec.health_check
            && hc.first().is_none_or(|p| p.is_empty())
        {
            return Err(invalid("health check", name, "must name a program"));
        }
        if let ServiceScope::Vip(vip) = &spec.scope {
            match self.placements.get(vip) {
                Some(Placement {
                    kind: PlacementKind::Vip { .. },
                    ..
                }) => {}
                _ => return Err(not_found("VIP", vip)),
            }
        }
        spec.roles.iter().try_for_each(|r| check_name("role", r))?;
        let singleton = spec.scope == ServiceScope::Singleton;
        if let Some(old) = self.services.get(name)
            && (old.scope == ServiceScope::Singleton) != singleton
        {
            return Err(invalid(
                "service scope",
                name,
                "cannot change to or from singleton; remove the service first",
            ));
        }
        if singleton {
            if spec.roles.is_empty() {
                return Err(invalid(
                    "service roles",
                    name,
                    "a singleton needs at least one eligible role",
                ));
            }
            match self.placements.get(name) {
                None => {}
                Some(Placement {
                    kind: PlacementKind::Singleton { service },
                    ..
                }) if service == name => {}
                Some(_) => return Err(exists("placement", name)),
            }
            // The singleton's placement has the service's name; a changed role set
            // applies to the next grant (the current owner keeps it: no failback).
            let placement = self.placements.entry(name.clone()).or_insert(Placement {
                kind: PlacementKind::Singleton {
                    service: name.clone(),
                },
                eligible_roles: BTreeSet::new(),
                owner: None,
                // Unique for the cluster's life: see `Fabric::apply_at`.
                epoch: index,
                refused: BTreeMap::new(),
            });
            placement.eligible_roles = spec.roles.clone();
            // A changed spec may well run where the old one could not.
            placement.refused.clear();
        }
        self.services.insert(name.clone(), spec.clone());
        Ok(Outcome::Done)
    }

    pub(super) fn remove_service(&mut self, name: &String) -> Result<Outcome, CommandError> {
        if !self.services.contains_key(name) {
            return Err(not_found("service", name));
        }
        // Its own singleton placement goes with it; another placement running it blocks.
        let user = self.placements.iter().find(|(pname, p)| {
            *pname != name
                && matches!(&p.kind, PlacementKind::Singleton { service } if service == name)
        });
        if let Some((pname, _)) = user {
            return Err(CommandError::InUse {
                what: "service".into(),
                key: name.clone(),
                why: format!("singleton placement {pname:?} runs it"),
            });
        }
        if let Some(Placement {
            kind: PlacementKind::Singleton { service },
            owner,
            ..
        }) = self.placements.get(name)
            && service == name
        {
            // Gone from the fabric, a held singleton would be granted afresh at once if the
            // service came back, while its old owner may still run it until its lease ends.
            if let Some(owner) = owner {
                return Err(CommandError::InUse {
                    what: "service".into(),
                    key: name.clone(),
                    why: format!("its singleton runs on node {owner}; release it first"),
                });
            }
            self.placements.remove(name);
        }
        self.services.remove(name);
        Ok(Outcome::Done)
    }
}
