//! The one integration-test binary (one link of the dependencies): the harness, then a module
//! per area, named by what it tests.

#[path = "it/harness/mod.rs"]
mod harness;

#[path = "it/apply_in_a_root.rs"]
mod apply_in_a_root;

#[path = "it/steps_on_a_node.rs"]
mod steps_on_a_node;

#[path = "it/bundles.rs"]
mod bundles;

#[path = "it/facts.rs"]
mod facts;

#[path = "it/init_on_a_node.rs"]
mod init_on_a_node;

#[path = "it/s3.rs"]
mod s3;

#[path = "it/http_bundle.rs"]
mod http_bundle;

#[path = "it/etcd_lock.rs"]
mod etcd_lock;

#[path = "it/reboot_rollouts.rs"]
mod reboot_rollouts;

#[path = "it/reboot_safety.rs"]
mod reboot_safety;

#[path = "it/docker.rs"]
mod docker;

#[path = "it/kubeadm_join.rs"]
mod kubeadm_join;

#[path = "it/packaging.rs"]
mod packaging;

#[path = "it/root_paths.rs"]
mod root_paths;

#[path = "it/secrets.rs"]
mod secrets;

#[path = "it/runner.rs"]
mod runner;

#[path = "it/architecture.rs"]
mod architecture;

#[path = "it/catalogue.rs"]
mod catalogue;

#[path = "it/for_each.rs"]
mod for_each;

#[path = "it/filesystem_mount.rs"]
mod filesystem_mount;

#[path = "it/dnf_node.rs"]
mod dnf_node;

#[path = "it/repository_archive.rs"]
mod repository_archive;

#[path = "it/rollouts.rs"]
mod rollouts;

#[path = "it/fleet_view.rs"]
mod fleet_view;

#[path = "it/kube_worker.rs"]
mod kube_worker;

#[path = "it/asg_lifecycle.rs"]
mod asg_lifecycle;

#[path = "it/daemon_reload.rs"]
mod daemon_reload;
