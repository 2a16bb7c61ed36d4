//! Disaster recovery: a site's role and epoch, what a standby refuses, and the changes it
//! mirrors from its active peer.

use crate::command::{Command, CommandError, MAX_MIRROR_CHANGES, Outcome};
use crate::model::{Fabric, Millis, MirrorPosition, SiteRole};
use crate::validate::check_name;

impl Fabric {
    /// A standby site runs no workload and takes its site-neutral data only from its peer:
    /// it refuses grants, device assignments to a node, and devices or services written
    /// anywhere but in a `Mirror`.
    pub(super) fn site_allows(&self, cmd: &Command) -> Result<(), CommandError> {
        if self.site.role != SiteRole::Standby {
            return Ok(());
        }
        let refused = match cmd {
            Command::GrantPlacement { name, .. } => Some(format!(
                "this site is a standby: it grants nothing (placement {name:?})"
            )),
            Command::AssignDevices { assignments, .. }
                if assignments.iter().any(|a| a.to.is_some()) =>
            {
                Some("this site is a standby: it assigns devices to no node".to_string())
            }
            c if c.is_mirrorable()
                || matches!(c, Command::RemoveDevice { .. } | Command::SetDevice { .. }) =>
            {
                Some(format!(
                    "this site is a standby: devices and services are written on the active site \
                 and mirrored here ({c})"
                ))
            }
            _ => None,
        };
        match refused {
            Some(why) => Err(CommandError::SiteRole(why)),
            None => Ok(()),
        }
    }

    pub(super) fn set_site_role(
        &mut self,
        role: SiteRole,
        epoch: u64,
        at: Millis,
    ) -> Result<Outcome, CommandError> {
        let site = self.site.clone();
        if epoch < site.epoch {
            return Err(CommandError::SiteRole(format!(
                "site epoch {epoch} is below this site's {}: epochs never go down",
                site.epoch
            )));
        }
        if role == SiteRole::Active && site.role == SiteRole::Standby && epoch == site.epoch {
            return Err(CommandError::SiteRole(format!(
                "a standby becomes active only with a site epoch above its {}",
                site.epoch
            )));
        }
        if role == SiteRole::Standby && site.role != SiteRole::Standby {
            // A standby follows its peer afresh: what it mirrored before, if anything, is
            // from another time.
            self.site.mirror = None;
        }
        if role != site.role {
            self.site.since = at;
        }
        self.site.role = role;
        self.site.epoch = epoch;
        Ok(Outcome::Done)
    }

    pub(super) fn mirror(
        &mut self,
        index: u64,
        changes: &[Command],
        position: &Option<MirrorPosition>,
    ) -> Result<Outcome, CommandError> {
        if self.site.role != SiteRole::Standby {
            return Err(CommandError::SiteRole(format!(
                "this site is {}: only a standby mirrors its peer",
                self.site.role
            )));
        }
        if changes.len() > MAX_MIRROR_CHANGES {
            return Err(CommandError::Invalid {
                what: "mirror".into(),
                value: format!("{} changes", changes.len()),
                why: format!("at most {MAX_MIRROR_CHANGES} per command"),
            });
        }
        if let Some(c) = changes.iter().find(|c| !c.is_mirrorable()) {
            return Err(CommandError::Invalid {
                what: "mirrored change".into(),
                value: c.to_string(),
                why: "only devices and services are mirrored".into(),
            });
        }
        if let Some(p) = position {
            check_name("peer site name", &p.site)?;
            if let Some(old) = &self.site.mirror
                && old.site == p.site
                && p.index < old.index
            {
                return Err(CommandError::SiteRole(format!(
                    "mirror position {} of site {:?} is behind the {} already mirrored",
                    p.index, p.site, old.index
                )));
            }
        }
        let mut applied = 0;
        let mut refused = Vec::new();
        for c in changes {
            match self.apply_allowed(index, c) {
                Ok(_) => applied += 1,
                Err(e) => refused.push(format!("{c}: {e}")),
            }
        }
        if let Some(p) = position {
            self.site.mirror = Some(p.clone());
        }
        Ok(Outcome::Mirrored { applied, refused })
    }
}
