//! The zero-copy TCP load balancer that follows the cluster VIP (DESIGN §7).
//!
//! Not built yet: issue 4 fills this crate. It exists so the workspace has
//! its final shape and later changes do not move files around.
