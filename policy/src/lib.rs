//! The one sandbox policy model every backend consumes.

pub mod model;

pub use model::*;
