//! Reading a file the operator placed (a policy, an inventory, a secret, a key,
//! a token) without ever
//! blocking: opened with `O_NONBLOCK` (a FIFO or a device does not wait for a
//! writer), refused unless the opened file is a regular one, read up to a bound.
//! What was read is identified by a [`FileStamp`] taken from the open file.

use std::io::Read;
use std::path::Path;

use sha2::{Digest, Sha256};

/// What identifies the version of a file that was read: device, inode, size,
/// modification and change times (of the opened file, `fstat`) and the SHA-256
/// of the bytes read. Two equal stamps `settle_ms` apart mean nobody wrote in
/// between.
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
    /// `st_ctime` in nanoseconds: set by the kernel on every write, rename or
    /// `chmod`, never by a program (`touch -d` and `cp -p` keep an mtime).
    pub ctime_ns: i128,
    /// SHA-256 of the content read.
    pub sha256: [u8; 32],
}

/// How far a file's `st_ctime` must lie before the moment it was read for its
/// stamp to be trusted without reading it again
/// ([`FileStamp::settled_before`]'s margin): the coarsest timestamp a Linux file system
/// keeps (FAT: 2 s; ext4, XFS and tmpfs take the kernel's coarse clock, a few
/// milliseconds). A file changed in the same tick as it was read could keep
/// every field of its stat; one whose change time is older cannot.
pub const TIMESTAMP_GRANULARITY: std::time::Duration = std::time::Duration::from_secs(2);

impl FileStamp {
    /// Whether this stamp, taken by a read that started at `read_at`, may stand
    /// for the file as long as its stat stays the same: its change time is at
    /// least `margin` ([`TIMESTAMP_GRANULARITY`]) older than the read (git's
    /// "racily clean" rule). A change time in the future is never trusted.
    pub fn settled_before(
        &self,
        read_at: std::time::SystemTime,
        margin: std::time::Duration,
    ) -> bool {
        let Ok(at) = read_at.duration_since(std::time::UNIX_EPOCH) else {
            return false;
        };
        let at = i128::try_from(at.as_nanos()).unwrap_or(i128::MAX);
        let margin = i128::try_from(margin.as_nanos()).unwrap_or(i128::MAX);
        self.ctime_ns < at.saturating_sub(margin)
    }

    /// Whether `path` (links followed) is still this version of the file as far
    /// as `stat` can tell: the same device, inode, size and times. Only
    /// meaningful for a stamp that [`settled_before`](Self::settled_before) its
    /// read; no file is opened (a FIFO is not waited for, and nothing is read).
    pub fn still_at(&self, path: &Path) -> bool {
        match std::fs::metadata(path) {
            Ok(meta) if meta.is_file() => stamp_of(&meta, self.sha256) == *self,
            _ => false,
        }
    }

    /// [`still_at`](Self::still_at) for `rel` under the open directory `dir`
    /// (`fstatat`, links followed): the kernel walks only `rel`'s components,
    /// not the directory's whole path again for each of thousands of files.
    pub fn still_in(&self, dir: std::os::fd::BorrowedFd<'_>, rel: &str) -> bool {
        match rustix::fs::statat(dir, rel, rustix::fs::AtFlags::empty()) {
            Ok(st) if rustix::fs::FileType::from_raw_mode(st.st_mode).is_file() => {
                stamp_of_stat(&st, self.sha256) == *self
            }
            _ => false,
        }
    }
}

/// [`stamp_of`] from `fstatat`'s answer (the fields' integer types differ
/// between targets, hence the conversions some of which are no-ops here).
#[allow(clippy::useless_conversion)]
fn stamp_of_stat(st: &rustix::fs::Stat, sha256: [u8; 32]) -> FileStamp {
    FileStamp {
        dev: u64::from(st.st_dev),
        ino: u64::from(st.st_ino),
        size: u64::try_from(st.st_size).unwrap_or(u64::MAX),
        mtime_ns: i128::from(st.st_mtime) * 1_000_000_000 + i128::from(st.st_mtime_nsec),
        ctime_ns: i128::from(st.st_ctime) * 1_000_000_000 + i128::from(st.st_ctime_nsec),
        sha256,
    }
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
///
/// # Errors
/// A reason (never the content).
pub fn open_regular(path: &Path, max: u64) -> Result<(std::fs::File, std::fs::Metadata), String> {
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
        ctime_ns: i128::from(meta.ctime()) * 1_000_000_000 + i128::from(meta.ctime_nsec()),
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

/// Makes a FIFO at `path` (tests: a file that would block a plain `open`).
#[cfg(test)]
pub(crate) fn make_fifo(path: &Path) {
    rustix::fs::mknodat(
        rustix::fs::CWD,
        path,
        rustix::fs::FileType::Fifo,
        rustix::fs::Mode::RUSR | rustix::fs::Mode::WUSR,
        0,
    )
    .unwrap();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fifo_is_refused_without_waiting_for_a_writer() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("x.yaml");
        make_fifo(&fifo);
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

    /// A temporary directory with `a.yaml` holding `text`.
    fn written(text: &str) -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("a.yaml");
        std::fs::write(&f, text).unwrap();
        (dir, f)
    }

    #[test]
    fn size_bound_stamp_and_content() {
        let (_dir, f) = written("hello");
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

    #[test]
    fn a_stamp_stands_for_its_file_until_a_stat_field_changes() {
        use std::time::{Duration, SystemTime};
        let (dir, f) = written("hello");
        let (stamp, _) = read_regular_file(&f, 5).unwrap();
        assert!(stamp.still_at(&f));
        // Read in the tick it was written: not trusted; read later: trusted.
        let margin = TIMESTAMP_GRANULARITY;
        assert!(!stamp.settled_before(SystemTime::now(), margin));
        let later = SystemTime::now() + TIMESTAMP_GRANULARITY + Duration::from_millis(10);
        assert!(stamp.settled_before(later, margin));
        assert!(!stamp.settled_before(SystemTime::UNIX_EPOCH, margin));
        // The same bytes written again, the old mtime put back (`cp -p`,
        // `touch -d`): the change time still tells.
        let mtime = std::fs::metadata(&f).unwrap().modified().unwrap();
        std::fs::write(&f, "hello").unwrap();
        std::fs::File::options()
            .write(true)
            .open(&f)
            .unwrap()
            .set_modified(mtime)
            .unwrap();
        let again = read_regular_file(&f, 5).unwrap().0;
        assert_eq!(
            (again.mtime_ns, again.sha256),
            (stamp.mtime_ns, stamp.sha256)
        );
        assert!(again.still_at(&f));
        let older = FileStamp {
            ctime_ns: again.ctime_ns - 1,
            ..again
        };
        assert!(
            !older.still_at(&f),
            "another change time is another version"
        );
        // A mode change, a link to another file, a FIFO: not the same file.
        let other = dir.path().join("b.yaml");
        std::fs::write(&other, "hello").unwrap();
        let b = read_regular_file(&other, 5).unwrap().0;
        std::fs::remove_file(&f).unwrap();
        std::os::unix::fs::symlink(&other, &f).unwrap();
        assert!(!again.still_at(&f));
        assert!(b.still_at(&f), "links are followed, as a read does");
        std::fs::remove_file(&f).unwrap();
        make_fifo(&f);
        assert!(!b.still_at(&f));
        assert!(!b.still_at(&dir.path().join("gone.yaml")));
    }
}
