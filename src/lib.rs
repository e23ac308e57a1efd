//! bootstrap: a node bootstrap agent for EC2 fleets.
//!
//! `main.rs` parses the command line and maps the result to an exit code; everything else
//! lives here so integration tests can use the library types.

pub mod agent;
pub mod asg;
pub mod aws;
pub mod cli;
pub mod clock;
pub mod config;
pub mod docker;
pub mod engine;
pub mod error;
pub mod facts;
pub mod fetch;
pub mod fsutil;
pub mod logging;
pub mod metrics;
pub mod reboot;
pub mod role;
pub mod rollout;
pub mod runlock;
pub mod runner;
pub mod secrets;
pub mod source;
pub mod state;
pub mod step;
pub mod systemd;
pub mod template;
