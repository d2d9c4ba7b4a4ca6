//! sandbox crate.
