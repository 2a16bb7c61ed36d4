//! Sending a mutation to the leader, or with `--dry-run` only describing it.

use super::common::*;

/// Sends a leader-only request (following redirects) and returns the reply; `Failed` becomes an error.
pub(super) async fn mutate(cli: &Target, req: AdminRequest) -> Result<AdminReply, CtlError> {
    if cli.dry_run {
        dry_run(cli, req.clone()).await?;
    }
    let mut c = connect(cli).await?;
    let reply = c.call_leader(&req).await;
    c.close().await;
    match reply? {
        AdminReply::Failed(e) => Err(failed(e)),
        other => Ok(other),
    }
}

/// With `--dry-run`, a mutation ends here: the plan is the "error" with exit code 0, which
/// `spacectl` prints on stdout. A request that changes nothing goes on (`Ok`).
pub(super) async fn dry_run(cli: &Target, req: AdminRequest) -> Result<(), CtlError> {
    match super::dryrun::plan(cli, &req).await? {
        Some(plan) => Err(CtlError {
            message: plan,
            code: 0,
        }),
        None => Ok(()),
    }
}
