//! Reading a file the operator placed (a policy, an inventory, a secret, a key,
//! a token) without ever
//! blocking: opened with `O_NONBLOCK` (a FIFO or a device does not wait for a
//! writer), refused unless the opened file is a regular one, read up to a bound.
//! What was read is identified by a [`FileStamp`] taken from the open file.

use std::io::Read;
use std::path::Path;

use sha2::{Digest, Sha256};

/// What identifies the version of a file that was read: device, inode, size,
/// modification time (of the opened file, `fstat`) and the SHA-256 of the bytes
/// read. Two equal stamps `settle_ms` apart mean nobody wrote in between.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileStamp {
    /// `st_dev`.
    pub dev: u64,
    /// `st_ino`.
    pub ino: u64,
    /// `st_size`.
    pub size: u64,
    /// `st_mtime` in nanoseconds.
    pub mtime_ns: i128,
    /// SHA-256 of the content read.
    pub sha256: [u8; 32],
}

/// Reads the regular file at `path` (links followed), at most `max` bytes, as
/// UTF-8, with its [`FileStamp`].
///
/// # Errors
/// A reason for messages (never the content): cannot be opened, not a regular
/// file (FIFO, socket, device, directory), larger than `max`, not UTF-8.
pub fn read_regular_file(path: &Path, max: u64) -> Result<(FileStamp, String), String> {
    let (file, meta) = open_regular(path, max)?;
    let mut bytes = Vec::new();
    file.take(max.saturating_add(1))
        .read_to_end(&mut bytes)
        .map_err(|e| e.to_string())?;
    if bytes.len() as u64 > max {
        return Err(format!("file is larger than {max} bytes"));
    }
    let stamp = stamp_of(&meta, Sha256::digest(&bytes).into());
    let text = String::from_utf8(bytes).map_err(|_| "not UTF-8 text".to_string())?;
    Ok((stamp, text))
}

/// The [`FileStamp`] of the regular file at `path` as [`read_regular_file`]
/// would give it, hashing the content in chunks without keeping it (a settle
/// check or a poll need not hold a second copy of every file).
///
/// # Errors
/// As [`read_regular_file`], except that the content is not checked for UTF-8.
pub fn stamp_regular_file(path: &Path, max: u64) -> Result<FileStamp, String> {
    let (file, meta) = open_regular(path, max)?;
    let mut reader = file.take(max.saturating_add(1));
    let mut hasher = Sha256::new();
    let mut buf = [0u8; 64 * 1024];
    let mut total: u64 = 0;
    loop {
        let n = reader.read(&mut buf).map_err(|e| e.to_string())?;
        if n == 0 {
            break;
        }
        total += n as u64;
        hasher.update(buf.get(..n).unwrap_or_default());
    }
    if total > max {
        return Err(format!("file is larger than {max} bytes"));
    }
    Ok(stamp_of(&meta, hasher.finalize().into()))
}

/// Opens `path` without blocking and checks that it is a regular file of at
/// most `max` bytes.
fn open_regular(path: &Path, max: u64) -> Result<(std::fs::File, std::fs::Metadata), String> {
    use rustix::fs::{Mode, OFlags};
    let fd = rustix::fs::open(
        path,
        OFlags::RDONLY | OFlags::NONBLOCK | OFlags::CLOEXEC | OFlags::NOCTTY,
        Mode::empty(),
    )
    .map_err(|e| std::io::Error::from(e).to_string())?;
    let file = std::fs::File::from(fd);
    let meta = file.metadata().map_err(|e| e.to_string())?;
    if !meta.is_file() {
        return Err("not a regular file".into());
    }
    if meta.len() > max {
        return Err(format!("file is larger than {max} bytes"));
    }
    Ok((file, meta))
}

fn stamp_of(meta: &std::fs::Metadata, sha256: [u8; 32]) -> FileStamp {
    use std::os::unix::fs::MetadataExt;
    FileStamp {
        dev: meta.dev(),
        ino: meta.ino(),
        size: meta.len(),
        mtime_ns: i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec()),
        sha256,
    }
}

/// [`read_regular_file`] for a file whose content is all that matters (a
/// secret, a key, a URL, a token): at most `max` bytes of UTF-8 text.
///
/// # Errors
/// As [`read_regular_file`]: a reason, never the content.
pub fn read_small_file(path: &Path, max: u64) -> Result<String, String> {
    read_regular_file(path, max).map(|(_, text)| text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fifo_is_refused_without_waiting_for_a_writer() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("x.yaml");
        rustix::fs::mknodat(
            rustix::fs::CWD,
            &fifo,
            rustix::fs::FileType::Fifo,
            rustix::fs::Mode::RUSR | rustix::fs::Mode::WUSR,
            0,
        )
        .unwrap();
        assert_eq!(
            read_regular_file(&fifo, 10).unwrap_err(),
            "not a regular file"
        );
        assert_eq!(
            read_regular_file(dir.path(), 10).unwrap_err(),
            "not a regular file"
        );
    }

    #[test]
    fn a_stamp_without_the_content_is_the_stamp_of_a_read() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("a.yaml");
        let text = "x".repeat(200_000);
        std::fs::write(&f, &text).unwrap();
        let (stamp, _) = read_regular_file(&f, 300_000).unwrap();
        assert_eq!(stamp_regular_file(&f, 300_000).unwrap(), stamp);
        assert!(stamp_regular_file(&f, 100_000).is_err());
        std::fs::write(&f, "y".repeat(200_000)).unwrap();
        assert_ne!(
            stamp_regular_file(&f, 300_000).unwrap().sha256,
            stamp.sha256
        );
    }

    #[test]
    fn size_bound_stamp_and_content() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("a.yaml");
        std::fs::write(&f, "hello").unwrap();
        let (a, text) = read_regular_file(&f, 5).unwrap();
        assert_eq!(text, "hello");
        assert_eq!(a.size, 5);
        assert_eq!(read_regular_file(&f, 5).unwrap().0, a);
        assert!(read_regular_file(&f, 4).unwrap_err().contains("larger"));
        std::fs::write(&f, "hellp").unwrap();
        assert_ne!(read_regular_file(&f, 5).unwrap().0.sha256, a.sha256);
        std::fs::write(&f, [0xff, 0xfe]).unwrap();
        assert_eq!(read_regular_file(&f, 5).unwrap_err(), "not UTF-8 text");
    }
}
