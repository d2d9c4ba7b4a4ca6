//! tests crate.
