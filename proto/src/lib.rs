//! proto crate.
