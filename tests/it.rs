//! The one integration-test binary (one link of the dependencies); a module per area.

#[path = "it/support.rs"]
mod support;

#[path = "it/skeleton.rs"]
mod skeleton;
