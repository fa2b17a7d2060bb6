//! MNIST IDX reader: images (magic 0x00000803) and labels (magic 0x00000801), plain or gzipped.
//!
//! An IDX file is a big-endian header — two zero bytes, an element-type byte (0x08 = unsigned
//! byte), the number of dimensions, then one u32 per dimension — followed by the data. Images
//! (n, rows, cols) become a (n, rows * cols) matrix of raw 0..255 values (use `scaling: max_abs`
//! for [0, 1]). Gzip is detected by its magic bytes, so `train-images-idx3-ubyte.gz` works as is.

use super::{DataError, Matrix};
use std::path::Path;

/// Magic of an IDX file of unsigned bytes with three dimensions (images).
pub const IMAGES_MAGIC: u32 = 0x0000_0803;
/// Magic of an IDX file of unsigned bytes with one dimension (labels).
pub const LABELS_MAGIC: u32 = 0x0000_0801;

/// Read an IDX images file as (n, rows * cols).
pub fn load_images(path: &Path) -> Result<Matrix, DataError> {
    parse_images(path, &super::read_bytes(path)?)
}

/// Read an IDX labels file.
pub fn load_labels(path: &Path) -> Result<Vec<u32>, DataError> {
    parse_labels(path, &super::read_bytes(path)?)
}

/// Parse (already decompressed) IDX image bytes; `path` is for messages.
pub fn parse_images(path: &Path, bytes: &[u8]) -> Result<Matrix, DataError> {
    let (dims, data) = parse(path, bytes, IMAGES_MAGIC, "an IDX images file")?;
    let rows = dims[0];
    let cols = dims[1] * dims[2];
    if cols == 0 {
        return Err(DataError::Shape {
            path: path.to_path_buf(),
            shape: dims,
            reason: "images have zero pixels".into(),
        });
    }
    Ok(Matrix { data: data.iter().map(|&b| f32::from(b)).collect(), rows, cols })
}

/// Parse (already decompressed) IDX label bytes; `path` is for messages.
pub fn parse_labels(path: &Path, bytes: &[u8]) -> Result<Vec<u32>, DataError> {
    let (_, data) = parse(path, bytes, LABELS_MAGIC, "an IDX labels file (or a .npy of labels)")?;
    Ok(data.iter().map(|&b| u32::from(b)).collect())
}

/// Check the magic, read the dimensions and return them with the exact-length data.
fn parse<'a>(
    path: &Path,
    bytes: &'a [u8],
    magic: u32,
    format: &'static str,
) -> Result<(Vec<usize>, &'a [u8]), DataError> {
    let p = || path.to_path_buf();
    if bytes.len() < 4 {
        return Err(DataError::Truncated { path: p(), expected: 4, actual: bytes.len() });
    }
    let found = u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
    if found != magic {
        let hint = match found {
            IMAGES_MAGIC => " (this is an IDX images file)",
            LABELS_MAGIC => " (this is an IDX labels file)",
            _ if bytes[0] == 0 && bytes[1] == 0 && bytes[2] != 0x08 => {
                " (an IDX file whose elements are not unsigned bytes)"
            }
            _ => "",
        };
        return Err(DataError::BadMagic {
            path: p(),
            format,
            found: format!("0x{found:08x}{hint}"),
            expected: format!("0x{magic:08x}"),
        });
    }
    let ndim = (magic & 0xff) as usize;
    let header = 4 + 4 * ndim;
    if bytes.len() < header {
        return Err(DataError::Truncated { path: p(), expected: header, actual: bytes.len() });
    }
    let dims: Vec<usize> = (0..ndim)
        .map(|i| {
            let o = 4 + 4 * i;
            u32::from_be_bytes([bytes[o], bytes[o + 1], bytes[o + 2], bytes[o + 3]]) as usize
        })
        .collect();
    let count = dims.iter().product::<usize>();
    let payload = &bytes[header..];
    if payload.len() < count {
        return Err(DataError::Truncated { path: p(), expected: count, actual: payload.len() });
    }
    if payload.len() > count {
        return Err(DataError::TrailingData { path: p(), expected: count, actual: payload.len() });
    }
    Ok((dims, payload))
}

/// Encode u8 data as an IDX file with the given dimensions (test fixtures and exports).
pub fn encode(dims: &[usize], data: &[u8]) -> Vec<u8> {
    let mut out = vec![0, 0, 0x08, dims.len() as u8];
    for &d in dims {
        out.extend_from_slice(&(d as u32).to_be_bytes());
    }
    out.extend_from_slice(data);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn gzip(bytes: &[u8]) -> Vec<u8> {
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        enc.write_all(bytes).unwrap();
        enc.finish().unwrap()
    }

    fn images() -> Vec<u8> {
        encode(&[3, 2, 2], &(0..12).map(|i| i as u8 * 20).collect::<Vec<_>>())
    }

    #[test]
    fn plain_images_and_labels() {
        let dir = tempfile::tempdir().unwrap();
        let ip = dir.path().join("imgs-idx3-ubyte");
        let lp = dir.path().join("labels-idx1-ubyte");
        std::fs::write(&ip, images()).unwrap();
        std::fs::write(&lp, encode(&[3], &[7, 1, 4])).unwrap();
        let m = load_images(&ip).unwrap();
        assert_eq!((m.rows, m.cols), (3, 4));
        assert_eq!(m.data[4..8], [80.0, 100.0, 120.0, 140.0]);
        assert_eq!(load_labels(&lp).unwrap(), vec![7, 1, 4]);
    }

    #[test]
    fn gzipped_images_and_labels() {
        let dir = tempfile::tempdir().unwrap();
        let ip = dir.path().join("imgs.gz");
        let lp = dir.path().join("labels.gz");
        std::fs::write(&ip, gzip(&images())).unwrap();
        std::fs::write(&lp, gzip(&encode(&[3], &[7, 1, 4]))).unwrap();
        let m = load_images(&ip).unwrap();
        assert_eq!((m.rows, m.cols), (3, 4));
        assert_eq!(m.data[11], 220.0);
        assert_eq!(load_labels(&lp).unwrap(), vec![7, 1, 4]);
    }

    #[test]
    fn corrupt_magic_and_swapped_files() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("bad");
        let mut b = images();
        b[2] = 0x0d;
        std::fs::write(&p, &b).unwrap();
        let e = load_images(&p).unwrap_err().to_string();
        assert!(e.contains("bad magic 0x00000d03") && e.contains("not unsigned bytes"), "{e}");
        // A labels file given as images says what it is.
        std::fs::write(&p, encode(&[3], &[1, 2, 3])).unwrap();
        let e = load_images(&p).unwrap_err().to_string();
        assert!(e.contains("IDX labels file") && e.contains("0x00000803"), "{e}");
    }

    #[test]
    fn truncated_images_and_gzip() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("short");
        let b = images();
        std::fs::write(&p, &b[..b.len() - 3]).unwrap();
        let e = load_images(&p).unwrap_err();
        assert!(matches!(e, DataError::Truncated { expected: 12, actual: 9, .. }), "{e}");
        std::fs::write(&p, &b[..6]).unwrap();
        assert!(matches!(load_images(&p).unwrap_err(), DataError::Truncated { expected: 16, .. }));
        let gz = gzip(&b);
        std::fs::write(&p, &gz[..gz.len() / 2]).unwrap();
        let e = load_images(&p).unwrap_err().to_string();
        assert!(e.contains("short") && e.contains("cannot read"), "{e}");
    }
}
