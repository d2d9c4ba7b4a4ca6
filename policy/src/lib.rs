//! policy crate.
