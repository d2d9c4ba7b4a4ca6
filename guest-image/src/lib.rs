//! guest-image crate.
