//! Cross-site replication, the DR watchdog and arbitration (DESIGN §9).
//!
//! Not built yet: a later issue fills this crate. It exists so the workspace
//! has its final shape.
