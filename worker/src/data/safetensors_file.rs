//! Samples from a tensor of a safetensors file (the usual way activations are saved).
//!
//! The tensor is `data.tensor`, or the only tensor when that is unset. F32, F64, F16, BF16 and U8
//! are accepted; a 2-D tensor is (samples, features), an N-D one is flattened to
//! (shape[0], prod(rest)). Errors list the tensors present when the name is missing or ambiguous.

use super::{DataError, Matrix};
use safetensors::{Dtype, SafeTensors};
use std::path::Path;

/// Read the tensor `name` (or the only tensor) of a safetensors file as a matrix.
pub fn load_matrix(path: &Path, name: Option<&str>) -> Result<Matrix, DataError> {
    let bytes = super::read_bytes(path)?;
    parse_matrix(path, &bytes, name)
}

/// Parse safetensors bytes; `path` is for messages.
pub fn parse_matrix(path: &Path, bytes: &[u8], name: Option<&str>) -> Result<Matrix, DataError> {
    let p = || path.to_path_buf();
    let st = SafeTensors::deserialize(bytes).map_err(|e| DataError::Header {
        path: p(),
        reason: format!("not a valid safetensors file: {e}"),
    })?;
    let chosen = choose(path, &st, name)?;
    let view = st
        .tensor(&chosen)
        .map_err(|e| DataError::Header { path: p(), reason: format!("tensor {chosen:?}: {e}") })?;
    let shape = view.shape().to_vec();
    if shape.len() < 2 {
        return Err(DataError::Shape {
            path: p(),
            shape,
            reason: format!("tensor {chosen:?}: samples need at least 2 dimensions"),
        });
    }
    let rows = shape[0];
    let cols: usize = shape[1..].iter().product();
    if cols == 0 {
        return Err(DataError::Shape {
            path: p(),
            shape,
            reason: format!("tensor {chosen:?}: samples have zero features"),
        });
    }
    let raw = view.data();
    let data: Vec<f32> = match view.dtype() {
        Dtype::F32 => {
            raw.chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect()
        }
        Dtype::F64 => {
            raw.chunks_exact(8).map(|b| f64::from_le_bytes(b.try_into().unwrap()) as f32).collect()
        }
        Dtype::F16 => {
            raw.chunks_exact(2).map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32()).collect()
        }
        Dtype::BF16 => {
            raw.chunks_exact(2).map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32()).collect()
        }
        Dtype::U8 => raw.iter().map(|&b| f32::from(b)).collect(),
        other => {
            return Err(DataError::Dtype {
                path: p(),
                found: format!("{other:?} (tensor {chosen:?})"),
                expected: "F32, F64, F16, BF16, U8".into(),
            });
        }
    };
    // safetensors validates the byte length against the shape; keep a check for safety.
    if data.len() != rows * cols {
        return Err(DataError::Truncated { path: p(), expected: rows * cols, actual: data.len() });
    }
    Ok(Matrix { data, rows, cols })
}

/// The tensor to read: `name` when the file has it, else the only tensor; errors list the names.
pub fn choose(path: &Path, st: &SafeTensors, name: Option<&str>) -> Result<String, DataError> {
    let mut names: Vec<String> = st.names().into_iter().map(str::to_string).collect();
    names.sort();
    match name {
        Some(n) if names.iter().any(|x| x == n) => Ok(n.to_string()),
        Some(n) => Err(DataError::TensorNotFound {
            path: path.to_path_buf(),
            name: n.to_string(),
            available: names,
        }),
        None if names.len() == 1 => Ok(names[0].clone()),
        None => Err(DataError::AmbiguousTensor { path: path.to_path_buf(), available: names }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use safetensors::tensor::TensorView;

    fn file(
        dir: &tempfile::TempDir,
        tensors: &[(&str, Dtype, Vec<usize>, Vec<u8>)],
    ) -> std::path::PathBuf {
        let views: Vec<(String, TensorView)> = tensors
            .iter()
            .map(|(n, d, s, b)| (n.to_string(), TensorView::new(*d, s.clone(), b).unwrap()))
            .collect();
        let bytes = safetensors::serialize(views, None).unwrap();
        let p = dir.path().join("acts.safetensors");
        std::fs::write(&p, bytes).unwrap();
        p
    }

    fn f32s(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    #[test]
    fn named_tensor_among_several() {
        let dir = tempfile::tempdir().unwrap();
        let p = file(
            &dir,
            &[
                ("acts", Dtype::F32, vec![2, 3], f32s(&[1., 2., 3., 4., 5., 6.])),
                ("other", Dtype::F32, vec![1, 1], f32s(&[9.])),
                ("img", Dtype::U8, vec![2, 2, 2], (0..8).collect()),
            ],
        );
        let m = load_matrix(&p, Some("acts")).unwrap();
        assert_eq!((m.rows, m.cols, m.data[5]), (2, 3, 6.0));
        let m = load_matrix(&p, Some("img")).unwrap();
        assert_eq!((m.rows, m.cols, m.data[7]), (2, 4, 7.0));
        let e = load_matrix(&p, Some("act")).unwrap_err().to_string();
        assert!(e.contains("\"act\" not found") && e.contains("acts, img, other"), "{e}");
        let e = load_matrix(&p, None).unwrap_err().to_string();
        assert!(e.contains("holds 3 tensors") && e.contains("data.tensor"), "{e}");
    }

    #[test]
    fn only_tensor_by_default_and_half_precision() {
        let dir = tempfile::tempdir().unwrap();
        let h: Vec<u8> =
            [1.5f32, -2.0].iter().flat_map(|&x| half::f16::from_f32(x).to_le_bytes()).collect();
        let p = file(&dir, &[("x", Dtype::F16, vec![1, 2], h)]);
        assert_eq!(load_matrix(&p, None).unwrap().data, vec![1.5, -2.0]);
        let b: Vec<u8> =
            [0.5f32, 4.0].iter().flat_map(|&x| half::bf16::from_f32(x).to_le_bytes()).collect();
        let p = file(&dir, &[("x", Dtype::BF16, vec![2, 1], b)]);
        assert_eq!(load_matrix(&p, None).unwrap().data, vec![0.5, 4.0]);
        let d: Vec<u8> = [0.25f64, 8.0].iter().flat_map(|x| x.to_le_bytes()).collect();
        let p = file(&dir, &[("x", Dtype::F64, vec![1, 2], d)]);
        assert_eq!(load_matrix(&p, None).unwrap().data, vec![0.25, 8.0]);
    }

    #[test]
    fn wrong_dtype_shape_and_corrupt_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = file(&dir, &[("x", Dtype::I32, vec![1, 1], vec![0; 4])]);
        let e = load_matrix(&p, None).unwrap_err().to_string();
        assert!(e.contains("I32") && e.contains("acts.safetensors"), "{e}");
        let p = file(&dir, &[("x", Dtype::F32, vec![3], f32s(&[1., 2., 3.]))]);
        let e = load_matrix(&p, None).unwrap_err().to_string();
        assert!(e.contains("wrong shape [3]"), "{e}");
        let bytes = std::fs::read(&p).unwrap();
        std::fs::write(&p, &bytes[..bytes.len() - 4]).unwrap();
        let e = load_matrix(&p, None).unwrap_err().to_string();
        assert!(e.contains("not a valid safetensors file"), "{e}");
    }
}
