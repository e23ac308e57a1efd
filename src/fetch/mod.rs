//! Getting bytes from where a role or the agent config says (`s3://`, `https://`, `http://`),
//! and the safe unpack of tarballs: shared by bundle sources and `archive` steps.

pub mod http;
pub mod s3;
pub mod unpack;

use sha2::{Digest, Sha256};

pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}
