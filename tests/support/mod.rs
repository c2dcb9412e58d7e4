//! Shared helpers for the integration tests.

pub mod cluster;
pub mod load;
