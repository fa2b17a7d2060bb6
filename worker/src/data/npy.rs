//! NumPy `.npy` reader, with the header parsed here rather than by a dependency.
//!
//! Format: the magic `\x93NUMPY`, a major/minor version (1.0: u16 header length; 2.0 and 3.0:
//! u32), then a Python dict literal such as `{'descr': '<f4', 'fortran_order': False,
//! 'shape': (60000, 28, 28), }` and the raw little-endian data. Samples may be `<f4`, `<f8`,
//! `<f2`, bfloat16 (ml_dtypes saves it as `<V2`) or `|u1` (images); labels `|u1`, `<i4` or `<i8`. Fortran-ordered and big-endian arrays are
//! refused with a message saying so, and the data length must match the shape exactly.

use super::{DataError, Matrix};
use std::path::Path;

/// The first six bytes of every `.npy` file.
pub const MAGIC: &[u8] = b"\x93NUMPY";

/// The element data of an array, by dtype.
#[derive(Debug, Clone, PartialEq)]
pub enum NpyData {
    F32(Vec<f32>),
    F64(Vec<f64>),
    U8(Vec<u8>),
    I32(Vec<i32>),
    I64(Vec<i64>),
}

/// A parsed `.npy` array in C (row-major) order.
#[derive(Debug, Clone, PartialEq)]
pub struct NpyArray {
    pub shape: Vec<usize>,
    /// The dtype string of the header, e.g. `<f4`.
    pub descr: String,
    pub data: NpyData,
}

/// Read and parse an `.npy` file (gzipped files are decompressed first).
pub fn read(path: &Path) -> Result<NpyArray, DataError> {
    parse(path, &super::read_bytes(path)?)
}

/// Read an `.npy` file of samples as a (N, prod(rest)) matrix: 2-D as is, N-D flattened.
pub fn load_matrix(path: &Path) -> Result<Matrix, DataError> {
    matrix_from_array(path, read(path)?)
}

/// Interpret an array as samples: at least 2-D, with a float or `|u1` dtype.
pub fn matrix_from_array(path: &Path, arr: NpyArray) -> Result<Matrix, DataError> {
    if arr.shape.len() < 2 {
        return Err(DataError::Shape {
            path: path.to_path_buf(),
            shape: arr.shape,
            reason: "samples need at least 2 dimensions (samples, features...)".into(),
        });
    }
    let rows = arr.shape[0];
    let cols: usize = arr.shape[1..].iter().product();
    if cols == 0 {
        return Err(DataError::Shape {
            path: path.to_path_buf(),
            shape: arr.shape,
            reason: "samples have zero features".into(),
        });
    }
    let data = match arr.data {
        NpyData::F32(v) => v,
        NpyData::F64(v) => v.into_iter().map(|x| x as f32).collect(),
        NpyData::U8(v) => v.into_iter().map(f32::from).collect(),
        NpyData::I32(_) | NpyData::I64(_) => {
            return Err(DataError::Dtype {
                path: path.to_path_buf(),
                found: arr.descr,
                expected: "<f4, <f8 or |u1 for samples (integer dtypes are for labels)".into(),
            });
        }
    };
    Ok(Matrix { data, rows, cols })
}

/// Interpret an array as labels: shape (n,) or (n, 1), integer dtype, values in u32.
pub fn labels_from_array(path: &Path, arr: NpyArray) -> Result<Vec<u32>, DataError> {
    let ok_shape = arr.shape.len() == 1 || (arr.shape.len() == 2 && arr.shape[1] == 1);
    if !ok_shape {
        return Err(DataError::Shape {
            path: path.to_path_buf(),
            shape: arr.shape,
            reason: "labels must be a vector (n,) or (n, 1)".into(),
        });
    }
    let wide: Vec<i64> = match arr.data {
        NpyData::U8(v) => return Ok(v.into_iter().map(u32::from).collect()),
        NpyData::I32(v) => v.into_iter().map(i64::from).collect(),
        NpyData::I64(v) => v,
        NpyData::F32(_) | NpyData::F64(_) => {
            return Err(DataError::Dtype {
                path: path.to_path_buf(),
                found: arr.descr,
                expected: "|u1, <i4 or <i8 for labels".into(),
            });
        }
    };
    wide.into_iter()
        .enumerate()
        .map(|(index, value)| {
            u32::try_from(value).map_err(|_| DataError::BadLabel {
                path: path.to_path_buf(),
                index,
                value,
            })
        })
        .collect()
}

/// Where an array's elements lie within the bytes of an `.npy` file, checked against its header.
#[derive(Debug, Clone, PartialEq)]
pub struct Layout {
    pub shape: Vec<usize>,
    /// The dtype string of the header, e.g. `<f4`.
    pub descr: String,
    /// The element type: `f4`, `f8`, `f2`, `bf16`, `u1`, `i4` or `i8`.
    pub kind: &'static str,
    /// Offset of the first element.
    pub data_start: usize,
}

/// Parse the bytes of an `.npy` file; `path` is only used in error messages.
pub fn parse(path: &Path, bytes: &[u8]) -> Result<NpyArray, DataError> {
    let Layout { shape, descr, kind, data_start } = layout(path, bytes)?;
    let payload = &bytes[data_start..];
    let data = match kind {
        "f4" => NpyData::F32(
            payload.chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect(),
        ),
        "f8" => NpyData::F64(
            payload.chunks_exact(8).map(|b| f64::from_le_bytes(b.try_into().unwrap())).collect(),
        ),
        // Half precision widens to f32 exactly, so it needs no variant of its own.
        "f2" => NpyData::F32(
            payload
                .chunks_exact(2)
                .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
        ),
        "bf16" => NpyData::F32(
            payload
                .chunks_exact(2)
                .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
        ),
        "u1" => NpyData::U8(payload.to_vec()),
        "i4" => NpyData::I32(
            payload.chunks_exact(4).map(|b| i32::from_le_bytes(b.try_into().unwrap())).collect(),
        ),
        _ => NpyData::I64(
            payload.chunks_exact(8).map(|b| i64::from_le_bytes(b.try_into().unwrap())).collect(),
        ),
    };
    Ok(NpyArray { shape, descr, data })
}

/// Read the header of a whole `.npy` file's bytes (a memory map or a buffer) and check that the
/// data after it is exactly what the header describes.
pub fn layout(path: &Path, bytes: &[u8]) -> Result<Layout, DataError> {
    let p = || path.to_path_buf();
    if bytes.len() < 8 || !bytes.starts_with(MAGIC) {
        return Err(DataError::BadMagic {
            path: p(),
            format: "a NumPy .npy file",
            found: hex_prefix(bytes, 6),
            expected: "93 4e 55 4d 50 59 (\\x93NUMPY)".into(),
        });
    }
    let major = bytes[6];
    let (len_size, header_start) = match major {
        1 => (2usize, 10usize),
        2 | 3 => (4, 12),
        v => {
            return Err(DataError::Header {
                path: p(),
                reason: format!(
                    "unsupported .npy format version {v}.{} (known: 1, 2, 3)",
                    bytes[7]
                ),
            });
        }
    };
    if bytes.len() < header_start {
        return Err(DataError::Truncated {
            path: p(),
            expected: header_start,
            actual: bytes.len(),
        });
    }
    let header_len = if len_size == 2 {
        u16::from_le_bytes([bytes[8], bytes[9]]) as usize
    } else {
        u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize
    };
    let data_start = header_start + header_len;
    if bytes.len() < data_start {
        return Err(DataError::Header {
            path: p(),
            reason: format!(
                "the header claims {header_len} bytes but the file ends after {}",
                bytes.len() - header_start
            ),
        });
    }
    // Version 1/2 headers are latin-1 and 3 is UTF-8; the keys and values we need are ASCII.
    let text = String::from_utf8_lossy(&bytes[header_start..data_start]);
    let header = parse_header(&text).map_err(|reason| DataError::Header { path: p(), reason })?;
    if header.fortran_order {
        return Err(DataError::Header {
            path: p(),
            reason: "fortran_order is True: only C-ordered arrays are supported \
                     (save with np.ascontiguousarray)"
                .into(),
        });
    }
    let (kind, size) = match header.descr.as_str() {
        "<f4" | "=f4" => ("f4", 4),
        "<f8" | "=f8" => ("f8", 8),
        "<f2" | "=f2" => ("f2", 2),
        // NumPy has no bfloat16 of its own; ml_dtypes' bfloat16 arrays are saved as 2-byte voids.
        "<V2" | "|V2" | "bfloat16" => ("bf16", 2),
        "|u1" | "<u1" | "=u1" => ("u1", 1),
        "<i4" | "=i4" => ("i4", 4),
        "<i8" | "=i8" => ("i8", 8),
        d => {
            let why = if d.starts_with('>') { " (big-endian is not supported)" } else { "" };
            return Err(DataError::Dtype {
                path: p(),
                found: format!("{d}{why}"),
                expected: "<f4, <f8, <f2, bfloat16 (<V2), |u1 (samples); |u1, <i4, <i8 (labels)"
                    .into(),
            });
        }
    };
    let count = header
        .shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .and_then(|c| c.checked_mul(size))
        .ok_or_else(|| DataError::Header {
            path: p(),
            reason: format!("shape {:?} is too large", header.shape),
        })?;
    let payload = &bytes[data_start..];
    if payload.len() < count {
        return Err(DataError::Truncated { path: p(), expected: count, actual: payload.len() });
    }
    if payload.len() > count {
        return Err(DataError::TrailingData { path: p(), expected: count, actual: payload.len() });
    }
    Ok(Layout { shape: header.shape, descr: header.descr, kind, data_start })
}

fn hex_prefix(bytes: &[u8], n: usize) -> String {
    if bytes.is_empty() {
        return "(empty file)".into();
    }
    bytes.iter().take(n).map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(" ")
}

/// The three header fields.
#[derive(Debug, PartialEq)]
struct Header {
    descr: String,
    fortran_order: bool,
    shape: Vec<usize>,
}

/// A value of the header's Python literal subset.
#[derive(Debug, PartialEq)]
enum PyValue {
    Str(String),
    Bool(bool),
    Int(usize),
    Tuple(Vec<PyValue>),
}

/// Parse the header dict; errors say which key is missing or what token was unexpected.
fn parse_header(text: &str) -> Result<Header, String> {
    let mut p = Parser { s: text.as_bytes(), i: 0 };
    p.ws();
    p.expect(b'{')?;
    let (mut descr, mut fortran, mut shape) = (None, None, None);
    loop {
        p.ws();
        if p.peek() == Some(b'}') {
            break;
        }
        let key = match p.value()? {
            PyValue::Str(k) => k,
            other => return Err(format!("expected a string key, found {other:?}")),
        };
        p.ws();
        p.expect(b':')?;
        p.ws();
        if key == "descr" && p.peek() == Some(b'[') {
            return Err("structured dtypes (a list descr) are not supported".into());
        }
        let value = p.value()?;
        match (key.as_str(), value) {
            ("descr", PyValue::Str(d)) => descr = Some(d),
            ("fortran_order", PyValue::Bool(b)) => fortran = Some(b),
            ("shape", PyValue::Tuple(items)) => {
                let dims = items
                    .into_iter()
                    .map(|v| match v {
                        PyValue::Int(d) => Ok(d),
                        other => Err(format!("shape holds a non-integer {other:?}")),
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                shape = Some(dims);
            }
            (k @ ("descr" | "fortran_order" | "shape"), v) => {
                return Err(format!("unexpected value {v:?} for '{k}'"));
            }
            _ => {} // Unknown keys are ignored, as NumPy's reader would refuse them anyway.
        }
        p.ws();
        match p.peek() {
            Some(b',') => p.i += 1,
            Some(b'}') => {}
            other => {
                return Err(format!(
                    "expected ',' or '}}' at byte {}, found {:?}",
                    p.i,
                    other.map(char::from)
                ));
            }
        }
    }
    Ok(Header {
        descr: descr.ok_or("missing 'descr'")?,
        fortran_order: fortran.ok_or("missing 'fortran_order'")?,
        shape: shape.ok_or("missing 'shape'")?,
    })
}

struct Parser<'a> {
    s: &'a [u8],
    i: usize,
}

impl Parser<'_> {
    fn peek(&self) -> Option<u8> {
        self.s.get(self.i).copied()
    }
    fn ws(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            self.i += 1;
        }
    }
    fn expect(&mut self, c: u8) -> Result<(), String> {
        if self.peek() == Some(c) {
            self.i += 1;
            Ok(())
        } else {
            Err(format!(
                "expected '{}' at byte {}, found {:?}",
                c as char,
                self.i,
                self.peek().map(char::from)
            ))
        }
    }
    fn value(&mut self) -> Result<PyValue, String> {
        match self.peek() {
            Some(q @ (b'\'' | b'"')) => {
                self.i += 1;
                let start = self.i;
                while self.peek().is_some_and(|c| c != q) {
                    self.i += 1;
                }
                let s = String::from_utf8_lossy(&self.s[start..self.i]).into_owned();
                self.expect(q)?;
                Ok(PyValue::Str(s))
            }
            Some(b'(') => {
                self.i += 1;
                let mut items = Vec::new();
                loop {
                    self.ws();
                    if self.peek() == Some(b')') {
                        self.i += 1;
                        return Ok(PyValue::Tuple(items));
                    }
                    items.push(self.value()?);
                    self.ws();
                    match self.peek() {
                        Some(b',') => self.i += 1,
                        Some(b')') => {}
                        other => {
                            return Err(format!(
                                "expected ',' or ')' in a tuple, found {:?}",
                                other.map(char::from)
                            ));
                        }
                    }
                }
            }
            Some(c) if c.is_ascii_digit() => {
                let start = self.i;
                while self.peek().is_some_and(|c| c.is_ascii_digit()) {
                    self.i += 1;
                }
                // Python 2 era headers may write `3L`.
                if self.peek() == Some(b'L') {
                    self.i += 1;
                }
                let digits =
                    std::str::from_utf8(&self.s[start..self.i]).unwrap_or("").trim_end_matches('L');
                digits
                    .parse()
                    .map(PyValue::Int)
                    .map_err(|_| format!("integer {digits} is out of range"))
            }
            _ if self.s[self.i..].starts_with(b"True") => {
                self.i += 4;
                Ok(PyValue::Bool(true))
            }
            _ if self.s[self.i..].starts_with(b"False") => {
                self.i += 5;
                Ok(PyValue::Bool(false))
            }
            other => Err(format!("unexpected {:?} at byte {}", other.map(char::from), self.i)),
        }
    }
}

/// Encode an array as `.npy` bytes (format `version` 1, 2 or 3) — test fixtures and exports.
/// `data` is the raw little-endian payload for `descr`.
pub fn encode(
    descr: &str,
    fortran_order: bool,
    shape: &[usize],
    data: &[u8],
    version: u8,
) -> Vec<u8> {
    let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    let shape_txt =
        if dims.len() == 1 { format!("({},)", dims[0]) } else { format!("({})", dims.join(", ")) };
    let order = if fortran_order { "True" } else { "False" };
    let mut header =
        format!("{{'descr': '{descr}', 'fortran_order': {order}, 'shape': {shape_txt}, }}");
    let prefix = if version == 1 { 10 } else { 12 };
    // NumPy pads the header with spaces and a newline so the data starts 64-byte aligned.
    while (prefix + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut out = MAGIC.to_vec();
    out.extend_from_slice(&[version, 0]);
    if version == 1 {
        out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    } else {
        out.extend_from_slice(&(header.len() as u32).to_le_bytes());
    }
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(data);
    out
}

/// Raw little-endian bytes of f32 values (for [`encode`]).
pub fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &tempfile::TempDir, name: &str, bytes: &[u8]) -> std::path::PathBuf {
        let p = dir.path().join(name);
        std::fs::write(&p, bytes).unwrap();
        p
    }

    #[test]
    fn reads_f32_matrix() {
        let dir = tempfile::tempdir().unwrap();
        let v: Vec<f32> = (0..6).map(|i| i as f32 * 0.5).collect();
        let p = write(&dir, "a.npy", &encode("<f4", false, &[2, 3], &f32_bytes(&v), 1));
        let m = load_matrix(&p).unwrap();
        assert_eq!((m.rows, m.cols), (2, 3));
        assert_eq!(m.data, v);
    }

    #[test]
    fn reads_f64_and_u8() {
        let dir = tempfile::tempdir().unwrap();
        let v = [1.5f64, -2.25, 3.0, 4.0];
        let raw: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        let p = write(&dir, "d.npy", &encode("<f8", false, &[2, 2], &raw, 1));
        assert_eq!(load_matrix(&p).unwrap().data, vec![1.5, -2.25, 3.0, 4.0]);
        let p = write(&dir, "u.npy", &encode("|u1", false, &[1, 3], &[0, 128, 255], 1));
        let m = load_matrix(&p).unwrap();
        assert_eq!(m.data, vec![0.0, 128.0, 255.0]);
    }

    #[test]
    fn three_d_is_flattened_and_version_2_and_3_headers_parse() {
        let dir = tempfile::tempdir().unwrap();
        let v: Vec<f32> = (0..24).map(|i| i as f32).collect();
        for version in [2u8, 3] {
            let p =
                write(&dir, "i.npy", &encode("<f4", false, &[2, 3, 4], &f32_bytes(&v), version));
            let m = load_matrix(&p).unwrap();
            assert_eq!((m.rows, m.cols), (2, 12), "version {version}");
            assert_eq!(m.data, v);
        }
    }

    #[test]
    fn header_written_by_numpy_parses() {
        // A header exactly as numpy 1.x writes it (with the trailing comma in a 1-tuple).
        let h = parse_header("{'descr': '<i8', 'fortran_order': False, 'shape': (5,), }    \n");
        assert_eq!(
            h.unwrap(),
            Header { descr: "<i8".into(), fortran_order: false, shape: vec![5] }
        );
        let h =
            parse_header("{\"shape\": (), \"fortran_order\": False, \"descr\": \"<f4\"}").unwrap();
        assert_eq!(h.shape, Vec::<usize>::new());
        assert!(
            parse_header("{'descr': '<f4', 'shape': (2, 3)}")
                .unwrap_err()
                .contains("fortran_order")
        );
    }

    #[test]
    fn fortran_order_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(&dir, "f.npy", &encode("<f4", true, &[2, 2], &f32_bytes(&[1.0; 4]), 1));
        let e = load_matrix(&p).unwrap_err().to_string();
        assert!(e.contains("f.npy") && e.contains("fortran_order"), "{e}");
    }

    #[test]
    fn truncated_file_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let mut bytes = encode("<f4", false, &[4, 3], &f32_bytes(&[1.0; 12]), 1);
        bytes.truncate(bytes.len() - 5);
        let p = write(&dir, "t.npy", &bytes);
        let e = load_matrix(&p).unwrap_err();
        assert!(matches!(e, DataError::Truncated { expected: 48, actual: 43, .. }), "{e}");
        assert!(e.to_string().contains("t.npy") && e.to_string().contains("truncated"), "{e}");
        // Cut inside the header.
        let p = write(&dir, "h.npy", &bytes[..30]);
        let e = load_matrix(&p).unwrap_err().to_string();
        assert!(e.contains("h.npy") && e.contains("header"), "{e}");
    }

    #[test]
    fn trailing_bytes_are_reported() {
        let dir = tempfile::tempdir().unwrap();
        let mut bytes = encode("<f4", false, &[1, 2], &f32_bytes(&[1.0; 2]), 1);
        bytes.extend_from_slice(&[0; 4]);
        let p = write(&dir, "x.npy", &bytes);
        assert!(matches!(load_matrix(&p).unwrap_err(), DataError::TrailingData { .. }));
    }

    #[test]
    fn wrong_dtype_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(&dir, "c.npy", &encode("<c8", false, &[1, 1], &[0; 8], 1));
        let e = load_matrix(&p).unwrap_err().to_string();
        assert!(e.contains("c.npy") && e.contains("<c8"), "{e}");
        let p = write(&dir, "b.npy", &encode(">f4", false, &[1, 1], &[0; 4], 1));
        assert!(load_matrix(&p).unwrap_err().to_string().contains("big-endian"));
        // Integers are labels, not samples.
        let p = write(&dir, "i.npy", &encode("<i8", false, &[1, 1], &[0; 8], 1));
        let e = load_matrix(&p).unwrap_err().to_string();
        assert!(e.contains("<i8") && e.contains("labels"), "{e}");
    }

    #[test]
    fn one_d_samples_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(&dir, "v.npy", &encode("<f4", false, &[3], &f32_bytes(&[1.0; 3]), 1));
        let e = load_matrix(&p).unwrap_err().to_string();
        assert!(e.contains("wrong shape [3]"), "{e}");
    }

    #[test]
    fn missing_file_names_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("nope.npy");
        let e = load_matrix(&p).unwrap_err();
        assert!(matches!(e, DataError::NotFound { .. }));
        assert!(e.to_string().contains(&p.display().to_string()), "{e}");
    }

    #[test]
    fn bad_magic() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(&dir, "m.npy", b"PK\x03\x04 not numpy at all");
        let e = load_matrix(&p).unwrap_err().to_string();
        assert!(e.contains("m.npy") && e.contains("bad magic"), "{e}");
    }

    #[test]
    fn labels_from_integers() {
        let dir = tempfile::tempdir().unwrap();
        let raw: Vec<u8> = [3i64, 0, 9].iter().flat_map(|x| x.to_le_bytes()).collect();
        let p = write(&dir, "l.npy", &encode("<i8", false, &[3], &raw, 1));
        assert_eq!(labels_from_array(&p, read(&p).unwrap()).unwrap(), vec![3, 0, 9]);
        let raw: Vec<u8> = [1i32, -2].iter().flat_map(|x| x.to_le_bytes()).collect();
        let p = write(&dir, "n.npy", &encode("<i4", false, &[2, 1], &raw, 1));
        let e = labels_from_array(&p, read(&p).unwrap()).unwrap_err();
        assert!(matches!(e, DataError::BadLabel { index: 1, value: -2, .. }), "{e}");
        let p = write(&dir, "f.npy", &encode("<f4", false, &[2], &f32_bytes(&[1.0, 2.0]), 1));
        assert!(matches!(labels_from_array(&p, read(&p).unwrap()), Err(DataError::Dtype { .. })));
    }
}
