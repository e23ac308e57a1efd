//! The reboot semaphore value read from etcd (`{"total_slots":N,"holders":[...]}`), decoded as
//! `EtcdLock::get`/`decode` do; what decodes must encode back to the same value.
#![no_main]

use bootstrap::reboot::etcd::Semaphore;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(sem) = serde_json::from_slice::<Semaphore>(data) {
        let again = serde_json::to_vec(&sem).expect("a decoded semaphore encodes");
        assert_eq!(serde_json::from_slice::<Semaphore>(&again).expect("round trip"), sem);
    }
});
