//! CSV samples: one sample a line, comma-separated numbers, optionally a header line and a
//! label column (the original project's `data.csv` is a label then 784 pixel values).
//!
//! Parsing is strict: every field of a sample column must be a finite decimal number and every
//! label a non-negative integer, all lines must have the same number of fields, and an error
//! gives the line and the column (both counted from 1) of the offending field. Blank lines are
//! skipped. Gzipped files are read like the other formats.

use super::DataError;
use std::path::Path;

/// A parsed CSV file.
#[derive(Debug, Clone, PartialEq)]
pub struct Table {
    /// Row-major samples (the label column left out).
    pub data: Vec<f32>,
    pub cols: usize,
    pub labels: Option<Vec<u32>>,
    /// Every sample value is an integer in 0..=255 (pixels).
    pub byte_valued: bool,
}

/// Read a CSV file. `header`: whether the first line is a header (None: it is when one of its
/// fields is not a number). `label_column`: the 0-based column of the labels.
pub fn load(
    path: &Path,
    header: Option<bool>,
    label_column: Option<usize>,
) -> Result<Table, DataError> {
    let bytes = super::read_bytes(path)?;
    let text = std::str::from_utf8(&bytes).map_err(|e| {
        let line = bytes[..e.valid_up_to()].iter().filter(|&&b| b == b'\n').count() + 1;
        DataError::Csv {
            path: path.to_path_buf(),
            line,
            column: 0,
            reason: "not UTF-8 text".into(),
        }
    })?;
    parse(path, text, header, label_column)
}

/// Parse CSV text; `path` is for messages.
pub fn parse(
    path: &Path,
    text: &str,
    header: Option<bool>,
    label_column: Option<usize>,
) -> Result<Table, DataError> {
    let err = |line: usize, column: usize, reason: String| DataError::Csv {
        path: path.to_path_buf(),
        line,
        column,
        reason,
    };
    let mut lines = text
        .split('\n')
        .enumerate()
        .map(|(i, l)| (i + 1, l.strip_suffix('\r').unwrap_or(l)))
        .filter(|(_, l)| !l.trim().is_empty())
        .peekable();
    let skip_first = match (header, lines.peek()) {
        (Some(h), _) => h,
        (None, Some((n, first))) => {
            let is_header = first.split(',').any(|f| f.trim().parse::<f64>().is_err());
            if is_header {
                tracing::info!(path = %path.display(), line = n, "CSV: first line taken for a header");
            }
            is_header
        }
        (None, None) => false,
    };
    if skip_first {
        lines.next();
    }
    let mut data = Vec::new();
    let mut labels = label_column.map(|_| Vec::new());
    let mut width: Option<(usize, usize)> = None;
    let mut byte_valued = true;
    for (n, line) in lines {
        let fields = line.split(',').count();
        match width {
            None => {
                if let Some(c) = label_column
                    && c >= fields
                {
                    return Err(err(
                        n,
                        c + 1,
                        format!(
                            "data.label_column {c} is past the last of the line's {fields} fields"
                        ),
                    ));
                }
                width = Some((fields, n));
            }
            Some((w, first)) if w != fields => {
                return Err(err(
                    n,
                    fields.min(w) + 1,
                    format!("{fields} fields where line {first} has {w}"),
                ));
            }
            Some(_) => {}
        }
        for (c, field) in line.split(',').enumerate() {
            let f = field.trim();
            if Some(c) == label_column {
                let l = f.parse::<u32>().map_err(|_| {
                    err(n, c + 1, format!("label {f:?} is not an integer in [0, 2^32)"))
                })?;
                labels.as_mut().unwrap().push(l);
                continue;
            }
            let v = match f.parse::<f32>() {
                Ok(v) if v.is_finite() => v,
                Ok(_) => return Err(err(n, c + 1, format!("{f:?} is not a finite number"))),
                Err(_) if f.is_empty() => return Err(err(n, c + 1, "empty field".into())),
                Err(_) => return Err(err(n, c + 1, format!("{f:?} is not a number"))),
            };
            byte_valued &= v.fract() == 0.0 && (0.0..=255.0).contains(&v);
            data.push(v);
        }
    }
    let cols = width.map_or(0, |(w, _)| w - usize::from(label_column.is_some()));
    if cols == 0 {
        let line = width.map_or(1, |(_, l)| l);
        return Err(err(line, 1, "no sample columns".into()));
    }
    Ok(Table { data, cols, labels, byte_valued: byte_valued && !text.is_empty() })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(text: &str, header: Option<bool>, label: Option<usize>) -> Result<Table, String> {
        parse(Path::new("d.csv"), text, header, label).map_err(|e| e.to_string())
    }

    #[test]
    fn the_original_format_label_first() {
        let t = p("label,p1,p2\n7,0,255\r\n\n3,12,4\n", None, Some(0)).unwrap();
        assert_eq!(
            (t.cols, t.data.clone(), t.labels.clone()),
            (2, vec![0., 255., 12., 4.], Some(vec![7, 3]))
        );
        assert!(t.byte_valued);
        let t = p("0.5,1\n2,-3e2\n", None, None).unwrap();
        assert_eq!((t.cols, t.data), (2, vec![0.5, 1., 2., -300.]));
        assert!(!t.byte_valued && t.labels.is_none());
        let t = p("1,2\n3,4\n", Some(true), None).unwrap();
        assert_eq!(t.data, vec![3., 4.], "a forced header drops the first line");
    }

    #[test]
    fn errors_carry_line_and_column() {
        let e = p("a,b,c\n1,2,3\n4,x5,6\n", None, None).unwrap_err();
        assert_eq!(e, "d.csv: line 3, column 2: \"x5\" is not a number");
        let e = p("1,2,3\n4,,6\n", None, None).unwrap_err();
        assert_eq!(e, "d.csv: line 2, column 2: empty field");
        let e = p("1,2,3\n\n4,5\n", None, None).unwrap_err();
        assert_eq!(e, "d.csv: line 3, column 3: 2 fields where line 1 has 3");
        let e = p("1,2\n-1,5\n", None, Some(0)).unwrap_err();
        assert!(e.starts_with("d.csv: line 2, column 1: label \"-1\""), "{e}");
        let e = p("1,2\n3,nan\n", None, None).unwrap_err();
        assert_eq!(e, "d.csv: line 2, column 2: \"nan\" is not a finite number");
        let e = p("1,2\n", None, Some(2)).unwrap_err();
        assert!(e.contains("line 1, column 3") && e.contains("label_column 2"), "{e}");
        let e = p("h\n1\n", Some(true), Some(0)).unwrap_err();
        assert!(e.contains("no sample columns"), "{e}");
    }
}
