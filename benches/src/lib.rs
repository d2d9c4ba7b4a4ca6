//! benches crate.
