//! The one integration-test binary (one link of the dependencies); a module per area.

#[path = "it/support.rs"]
mod support;

#[path = "it/node.rs"]
mod node;

#[path = "it/moto.rs"]
mod moto;

#[path = "it/skeleton.rs"]
mod skeleton;

#[path = "it/node_e2e.rs"]
mod node_e2e;

#[path = "it/bundles.rs"]
mod bundles;

#[path = "it/imds_server.rs"]
mod imds_server;

#[path = "it/facts.rs"]
mod facts;

#[path = "it/init_e2e.rs"]
mod init_e2e;

#[path = "it/s3.rs"]
mod s3;

#[path = "it/http_bundle.rs"]
mod http_bundle;

#[path = "it/etcd.rs"]
mod etcd;

#[path = "it/reboot_e2e.rs"]
mod reboot_e2e;

#[path = "it/reboot_trust.rs"]
mod reboot_trust;

#[path = "it/fleetlock_server.rs"]
mod fleetlock_server;

#[path = "it/docker.rs"]
mod docker;

#[path = "it/kube.rs"]
mod kube;

#[path = "it/ship.rs"]
mod ship;

#[path = "it/root_paths.rs"]
mod root_paths;

#[path = "it/secrets.rs"]
mod secrets;

#[path = "it/runner.rs"]
mod runner;
