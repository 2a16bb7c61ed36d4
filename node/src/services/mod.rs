//! Supervised services (the model's jmp-watchdog): the [`supervisor`] that starts, checks,
//! restarts and stops processes, and the [`desired`] set this node should run — every-node
//! services, those bound to a VIP it holds, and the singletons it holds, fenced by the guard.
//! Uses the cluster handle and the placement agent.

pub mod desired;
pub mod logfile;
pub mod supervisor;
