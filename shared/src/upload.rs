//! What a finished trial hands back to the coordinator: its files, their names, and how they
//! are checked on the way (the `Upload` RPC).

use sha2::{Digest, Sha256};

/// The weights, as safetensors with the resolved config and data scaling in `__metadata__`.
pub const WEIGHTS: &str = "weights.safetensors";
/// The resolved trial config, as YAML.
pub const CONFIG: &str = "config.yaml";
/// The final metrics, as a JSON object.
pub const METRICS: &str = "metrics.json";
/// Every file of a trial, in the order they are sent; an upload must carry each exactly once.
pub const FILES: [&str; 3] = [WEIGHTS, CONFIG, METRICS];

/// Bytes per upload chunk: far below gRPC's 4 MB message limit.
pub const CHUNK_BYTES: usize = 1 << 20;

/// The lowercase hex SHA-256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

/// An incremental SHA-256, for files that arrive in chunks.
#[derive(Default, Clone)]
pub struct Sha256Hasher(Sha256);

impl Sha256Hasher {
    pub fn update(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }

    pub fn finish_hex(self) -> String {
        hex(&self.0.finalize())
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A trial's files in memory, as the worker produced them.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TrialFiles {
    pub weights: Vec<u8>,
    pub config_yaml: Vec<u8>,
    pub metrics_json: Vec<u8>,
}

impl TrialFiles {
    /// `(name, bytes)` of each file, in [`FILES`] order.
    pub fn files(&self) -> [(&'static str, &[u8]); 3] {
        [(WEIGHTS, &self.weights), (CONFIG, &self.config_yaml), (METRICS, &self.metrics_json)]
    }

    pub fn total_bytes(&self) -> u64 {
        self.files().iter().map(|(_, b)| b.len() as u64).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_match_the_standard_vectors_whole_and_in_pieces() {
        let abc = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
        assert_eq!(sha256_hex(b"abc"), abc);
        let mut h = Sha256Hasher::default();
        h.update(b"a");
        h.update(b"bc");
        assert_eq!(h.finish_hex(), abc);
        assert_eq!(
            sha256_hex(b""),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }
}
