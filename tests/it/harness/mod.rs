//! What the tests run against, apart from the tests: the agent binary and its files
//! (`support`), a booted node (`node`), real etcd, moto and dockerd (`etcd`, `moto`, `docker`),
//! and the test servers for IMDS and FleetLock (`imds`, `fleetlock`) on one small HTTP/1.1
//! server (`http`).

pub mod docker;
pub mod etcd;
pub mod fleetlock;
pub mod http;
pub mod imds;
pub mod moto;
pub mod node;
pub mod support;
