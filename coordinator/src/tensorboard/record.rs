//! TFRecord framing of event files:
//!
//! ```text
//! u64 len (little endian) | u32 masked_crc32c(len bytes) | data[len] | u32 masked_crc32c(data)
//! ```
//!
//! where `masked(crc) = ((crc >> 15) | (crc << 17)) + 0xa282ead8` (wrapping). CRC32C
//! (Castagnoli) is implemented here, table-driven, and pinned by the published test vectors.

use super::{Result, TensorBoardError};

/// CRC32C lookup table (reflected Castagnoli polynomial 0x82F63B78), built at compile time.
const CRC32C_TABLE: [u32; 256] = {
    let mut table = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut crc = i as u32;
        let mut bit = 0;
        while bit < 8 {
            crc = if crc & 1 != 0 { (crc >> 1) ^ 0x82F6_3B78 } else { crc >> 1 };
            bit += 1;
        }
        table[i] = crc;
        i += 1;
    }
    table
};

/// CRC32C (Castagnoli) of `data`, as used by TFRecord framing.
pub fn crc32c(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &byte in data {
        crc = CRC32C_TABLE[((crc ^ byte as u32) & 0xff) as usize] ^ (crc >> 8);
    }
    !crc
}

/// The masked CRC TFRecord stores: `((crc >> 15) | (crc << 17)) + 0xa282ead8`, a rotation
/// plus a constant (masking keeps the CRC of data that itself holds CRCs well mixed).
pub fn masked_crc32c(data: &[u8]) -> u32 {
    let crc = crc32c(data);
    crc.rotate_right(15).wrapping_add(0xa282_ead8)
}

/// Frames `data` as one TFRecord record.
pub fn encode_record(data: &[u8]) -> Vec<u8> {
    let len = (data.len() as u64).to_le_bytes();
    let mut out = Vec::with_capacity(data.len() + 16);
    out.extend_from_slice(&len);
    out.extend_from_slice(&masked_crc32c(&len).to_le_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(&masked_crc32c(data).to_le_bytes());
    out
}

/// Splits a TFRecord byte stream into record payloads, checking both CRCs of each record.
pub fn decode_records(bytes: &[u8]) -> Result<Vec<Vec<u8>>> {
    let corrupt = |offset: usize, reason: &str| TensorBoardError::Corrupt {
        offset,
        reason: reason.to_string(),
    };
    let mut records = Vec::new();
    let mut pos = 0;
    while pos < bytes.len() {
        let header = bytes.get(pos..pos + 12).ok_or_else(|| corrupt(pos, "truncated header"))?;
        let len_bytes = &header[..8];
        let len_crc = u32::from_le_bytes(header[8..12].try_into().expect("4 bytes"));
        if masked_crc32c(len_bytes) != len_crc {
            return Err(corrupt(pos, "length CRC mismatch"));
        }
        let len = u64::from_le_bytes(len_bytes.try_into().expect("8 bytes")) as usize;
        let start = pos + 12;
        let end = start.checked_add(len).ok_or_else(|| corrupt(pos, "length overflows"))?;
        let data = bytes.get(start..end).ok_or_else(|| corrupt(pos, "truncated data"))?;
        let crc_bytes =
            bytes.get(end..end + 4).ok_or_else(|| corrupt(pos, "truncated data CRC"))?;
        if masked_crc32c(data) != u32::from_le_bytes(crc_bytes.try_into().expect("4 bytes")) {
            return Err(corrupt(pos, "data CRC mismatch"));
        }
        records.push(data.to_vec());
        pos = end + 4;
    }
    Ok(records)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_matches_published_vectors() {
        // RFC 3720 (iSCSI) appendix B.4 and the common "123456789" check value.
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(crc32c(&[0u8; 32]), 0x8A91_36AA);
        assert_eq!(crc32c(&[0xFFu8; 32]), 0x62A8_AB43);
        let ascending: Vec<u8> = (0u8..32).collect();
        assert_eq!(crc32c(&ascending), 0x46DD_794E);
        let descending: Vec<u8> = (0u8..32).rev().collect();
        assert_eq!(crc32c(&descending), 0x113F_DB5C);
        assert_eq!(crc32c(b""), 0);
    }

    #[test]
    fn masked_crc_matches_tensorboard() {
        // Values from tensorboard's own `masked_crc32c` (tensorflow_stub).
        assert_eq!(masked_crc32c(b"123456789"), 0xC78A_B0E5);
        assert_eq!(masked_crc32c(b""), 0xA282_EAD8);
        assert_eq!(masked_crc32c(&0u64.to_le_bytes()), 0x0798_0329);
    }

    #[test]
    fn record_framing_round_trips_and_detects_corruption() {
        let mut bytes = encode_record(b"hello");
        bytes.extend(encode_record(b""));
        assert_eq!(&bytes[..8], &5u64.to_le_bytes());
        assert_eq!(decode_records(&bytes).unwrap(), vec![b"hello".to_vec(), Vec::new()]);
        let mut flipped = bytes.clone();
        flipped[13] ^= 1; // inside "hello"
        assert!(matches!(
            decode_records(&flipped),
            Err(TensorBoardError::Corrupt { offset: 0, .. })
        ));
        assert!(decode_records(&bytes[..bytes.len() - 1]).is_err());
    }
}
