//! The log files of a VM's processes: creating them, and quoting their tails in errors.

use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use super::VmError;

/// How much of a log an error quotes.
const LOG_TAIL_BYTES: u64 = 3000;
const LOG_TAIL_LINES: usize = 25;

/// How much new log one [`LogWatch::find`] reads at most (a flood is skipped, not buffered).
const LOG_WATCH_BYTES: u64 = 64 * 1024;

/// Follows a log file from where it was last read (from its start at first), looking for a line
/// with a given text.
#[derive(Default)]
pub(super) struct LogWatch {
    offset: u64,
}

impl LogWatch {
    /// The first new line of `path` that contains `needle`, if any arrived since the last call.
    pub(super) fn find(&mut self, path: &Path, needle: &str) -> Option<String> {
        let mut file = std::fs::File::open(path).ok()?;
        let len = file.metadata().ok()?.len();
        if len < self.offset {
            self.offset = 0;
        }
        let start = self.offset.max(len.saturating_sub(LOG_WATCH_BYTES));
        file.seek(SeekFrom::Start(start)).ok()?;
        let mut bytes = Vec::new();
        file.take(LOG_WATCH_BYTES).read_to_end(&mut bytes).ok()?;
        self.offset = start + bytes.len() as u64;
        let text = String::from_utf8_lossy(&bytes);
        text.lines()
            .find(|line| line.contains(needle))
            .map(|line| line.trim().to_string())
    }
}

/// Stdout and stderr of a child: a log file in the state directory.
pub(super) fn log_file(path: &Path) -> Result<std::fs::File, VmError> {
    std::fs::File::create(path).map_err(|e| VmError::io(format!("creating {}", path.display()), e))
}

/// The last lines of a log file (empty when there is none).
pub(super) fn log_tail(path: &Path) -> String {
    let Ok(mut file) = std::fs::File::open(path) else {
        return format!("({} is missing)", path.display());
    };
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let start = len.saturating_sub(LOG_TAIL_BYTES);
    if file.seek(SeekFrom::Start(start)).is_err() {
        return String::new();
    }
    let mut bytes = Vec::new();
    let _ = file.take(LOG_TAIL_BYTES).read_to_end(&mut bytes);
    let text = String::from_utf8_lossy(&bytes);
    let lines: Vec<&str> = text.lines().collect();
    let skip = lines.len().saturating_sub(LOG_TAIL_LINES);
    let tail = lines[skip..].join("\n");
    if tail.trim().is_empty() {
        "(empty)".to_string()
    } else {
        tail
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_log_watch_reads_each_line_once() {
        use std::io::Write;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("daemon.log");
        std::fs::write(&path, "thread 'old' panicked at before\n").unwrap();
        let mut watch = LogWatch::default();
        assert_eq!(
            watch.find(&path, "panicked").as_deref(),
            Some("thread 'old' panicked at before")
        );
        assert_eq!(watch.find(&path, "panicked"), None);
        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        writeln!(
            file,
            "info: fine\nthread '<unnamed>' panicked at src/vsock_conn.rs:238:70:"
        )
        .unwrap();
        assert_eq!(
            watch.find(&path, "panicked").as_deref(),
            Some("thread '<unnamed>' panicked at src/vsock_conn.rs:238:70:")
        );
        assert_eq!(watch.find(&path, "panicked"), None, "read once");
    }

    #[test]
    fn log_tail_keeps_the_end() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        let text: String = (0..100).map(|i| format!("line {i}\n")).collect();
        std::fs::write(&path, text).unwrap();
        let tail = log_tail(&path);
        assert!(tail.ends_with("line 99"));
        assert!(!tail.contains("line 70\n"));
        assert!(log_tail(&dir.path().join("none")).contains("missing"));
    }
}
