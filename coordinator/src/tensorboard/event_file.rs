//! Event files: `events.out.tfevents.{unix_secs}.{hostname}.{pid}.{counter}`, a sequence of
//! [TFRecord records](super::record) each holding one serialized [`Event`]; the first carries
//! `file_version = "brain.Event:2"`. [`EventWriter`] writes one, [`read_events`] reads one back.

use super::messages::{Event, Summary, SummaryValue};
use super::record::{decode_records, encode_record};
use super::{Result, TensorBoardError, sanitize, unix_secs_f64};
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Distinguishes files a process creates in the same second (TensorBoard's own writers end the
/// name with a counter too).
static FILE_COUNTER: AtomicU64 = AtomicU64::new(0);

fn hostname() -> String {
    let raw = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .or_else(|| std::env::var("COMPUTERNAME").ok())
        .unwrap_or_else(|| "localhost".to_string());
    let name = sanitize(raw.trim());
    if name.is_empty() { "localhost".to_string() } else { name }
}

/// One TensorBoard event file: `events.out.tfevents.{unix_secs}.{hostname}.{pid}.{counter}`.
/// Records are buffered; call [`EventWriter::flush`] to make them visible to TensorBoard.
pub struct EventWriter {
    path: PathBuf,
    out: BufWriter<File>,
}

impl EventWriter {
    /// Creates `dir` (and parents) and a new event file in it, starting with the
    /// `brain.Event:2` file-version record.
    pub fn create(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir)
            .map_err(|error| TensorBoardError::CreateDir { path: dir.to_path_buf(), error })?;
        let secs = unix_secs_f64() as u64;
        let counter = FILE_COUNTER.fetch_add(1, Ordering::Relaxed);
        let name =
            format!("events.out.tfevents.{secs}.{}.{}.{counter}", hostname(), std::process::id());
        let path = dir.join(name);
        let file = File::create(&path)
            .map_err(|error| TensorBoardError::Write { path: path.clone(), error })?;
        let mut writer = EventWriter { path, out: BufWriter::new(file) };
        writer.write_event(&Event {
            wall_time: unix_secs_f64(),
            step: 0,
            file_version: Some("brain.Event:2".to_string()),
            summary: None,
        })?;
        Ok(writer)
    }

    /// The file being written.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends one event record (buffered).
    pub fn write_event(&mut self, event: &Event) -> Result<()> {
        let record = encode_record(&prost::Message::encode_to_vec(event));
        self.out
            .write_all(&record)
            .map_err(|error| TensorBoardError::Write { path: self.path.clone(), error })
    }

    /// Appends a summary at `step`, stamped with the current time.
    pub fn add_summary(&mut self, summary: Summary, step: u64) -> Result<()> {
        self.write_event(&Event {
            wall_time: unix_secs_f64(),
            step: step.min(i64::MAX as u64) as i64,
            file_version: None,
            summary: Some(summary),
        })
    }

    /// Appends a scalar (stored as a 32-bit float, as TensorBoard's `simple_value` is).
    pub fn add_scalar(&mut self, tag: &str, value: f64, step: u64) -> Result<()> {
        self.add_scalars(std::iter::once((tag, value)), step)
    }

    /// Appends several scalars at the same step as one event.
    pub fn add_scalars<'a>(
        &mut self,
        scalars: impl IntoIterator<Item = (&'a str, f64)>,
        step: u64,
    ) -> Result<()> {
        let value = scalars
            .into_iter()
            .map(|(tag, v)| SummaryValue {
                tag: tag.to_string(),
                simple_value: Some(v as f32),
                tensor: None,
                metadata: None,
            })
            .collect::<Vec<_>>();
        if value.is_empty() {
            return Ok(());
        }
        self.add_summary(Summary { value }, step)
    }

    /// Writes buffered records to the file.
    pub fn flush(&mut self) -> Result<()> {
        self.out.flush().map_err(|error| TensorBoardError::Write { path: self.path.clone(), error })
    }
}

impl Drop for EventWriter {
    fn drop(&mut self) {
        if let Err(e) = self.out.flush() {
            tracing::warn!(path = %self.path.display(), error = %e, "tensorboard: flush on close failed");
        }
    }
}

/// Reads and decodes every event of an event file (tests and tools; TensorBoard does this
/// itself).
pub fn read_events(path: &Path) -> Result<Vec<Event>> {
    let bytes = std::fs::read(path)
        .map_err(|error| TensorBoardError::Read { path: path.to_path_buf(), error })?;
    let mut events = Vec::new();
    for record in decode_records(&bytes)? {
        let event = <Event as prost::Message>::decode(record.as_slice()).map_err(|e| {
            TensorBoardError::Corrupt { offset: 0, reason: format!("{}: {e}", path.display()) }
        })?;
        events.push(event);
    }
    Ok(events)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_writer_file_is_readable() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = EventWriter::create(dir.path()).unwrap();
        w.add_scalar("fvu", 0.25, 10).unwrap();
        w.add_scalar("mse", 1.5, 20).unwrap();
        w.flush().unwrap();
        let path = w.path().to_path_buf();
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        let parts: Vec<&str> = name.split('.').collect();
        assert_eq!(&parts[..3], &["events", "out", "tfevents"]);
        assert!(parts[3].parse::<u64>().unwrap() > 1_600_000_000);
        assert_eq!(parts[parts.len() - 2], std::process::id().to_string());
        drop(w);

        let events = read_events(&path).unwrap();
        assert_eq!(events.len(), 3);
        assert_eq!(events[0].file_version.as_deref(), Some("brain.Event:2"));
        assert!(events[0].summary.is_none());
        let v = &events[1].summary.as_ref().unwrap().value[0];
        assert_eq!((v.tag.as_str(), v.simple_value, events[1].step), ("fvu", Some(0.25), 10));
        let v = &events[2].summary.as_ref().unwrap().value[0];
        assert_eq!((v.tag.as_str(), v.simple_value, events[2].step), ("mse", Some(1.5), 20));
        assert!(events[2].wall_time > 1.6e9);
    }

    #[test]
    fn create_in_unwritable_place_is_an_error() {
        let file = tempfile::NamedTempFile::new().unwrap();
        // A directory below a regular file cannot be created.
        let err = EventWriter::create(&file.path().join("sub")).err().unwrap();
        assert!(err.to_string().contains("cannot create directory"), "{err}");
    }
}
