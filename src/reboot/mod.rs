//! Fleet reboot coordination. This version has the etcd semaphore client (the lock itself);
//! reboot detection, windows, hooks, the logind reboot and the `reboot`/`lock` commands are
//! not built yet.

pub mod etcd;
