//! Reading audit files for `report access` (issue #23): the files rotation
//! leaves (plain or gzip-compressed, recognised by their first bytes), in any
//! order and overlapping, streamed in bounded memory.
//!
//! Each file is read line by line (a line longer than [`MAX_LINE_BYTES`] is
//! counted as unparseable and skipped). The files are merged by `time` (each
//! file is written in time order, give or take the length of a request), so a
//! line that appears in two files (a copy left by rotation, a file given twice)
//! is met again within [`DEDUP_WINDOW_SECS`] of its first reading: only the
//! request ids of that window are kept to drop it. Memory is the files'
//! buffers, that window and the aggregates (bounded by the repositories,
//! environments, audiences and error codes that occur).

use std::collections::{BTreeMap, BinaryHeap, HashMap};
use std::hash::{Hash, Hasher};
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Longest audit line read (a line is about 1 KiB).
pub const MAX_LINE_BYTES: usize = 64 * 1024;
/// How far apart in `time` a line and its copy may be met.
pub const DEDUP_WINDOW_SECS: u64 = 600;
/// Most audit files one report reads.
pub const MAX_FILES: usize = 10_000;

/// The fields of an audit line the report reads; others are ignored.
#[derive(Debug, Clone, Deserialize)]
pub struct Line {
    /// Seconds since the epoch.
    pub time: u64,
    /// Request id.
    pub request_id: String,
    /// `exchange` or `grants`.
    #[serde(default)]
    pub event: Option<String>,
    /// `allowed`, `denied`, `failed`.
    pub outcome: String,
    /// Error code, when not allowed.
    #[serde(default)]
    pub error_code: Option<String>,
    /// `repositoryUuid`.
    #[serde(rename = "repositoryUuid", default)]
    pub repository_uuid: Option<String>,
    /// `deploymentEnvironmentUuid`.
    #[serde(rename = "deploymentEnvironmentUuid", default)]
    pub deployment_environment_uuid: Option<String>,
    /// Requested audience.
    #[serde(default)]
    pub audience: Option<String>,
    /// Deciding policy.
    #[serde(default)]
    pub policy: Option<String>,
    /// `branchName`.
    #[serde(rename = "branchName", default)]
    pub branch_name: Option<String>,
    /// A hash of the whole line: a copy has the same; another line that
    /// only shares the `request_id` does not.
    #[serde(skip)]
    pub digest: u64,
}

/// Tokens issued for one (repository, environment, audience, policy).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Issued {
    /// How many.
    pub count: u64,
    /// When the last was issued (seconds since the epoch).
    pub last: u64,
}

/// What issued tokens are counted by.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct UsageKey {
    /// `repositoryUuid` as the line has it.
    pub repository_uuid: String,
    /// `deploymentEnvironmentUuid`, when a deployment step.
    pub environment_uuid: Option<String>,
    /// `branchName`, when a branch build.
    pub branch: Option<String>,
    /// The audience.
    pub audience: String,
    /// The granting policy.
    pub policy: String,
}

/// What the audit files show for the period.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Usage {
    /// Lines read (every line of every file).
    pub lines_read: u64,
    /// Lines outside the period, or not about an exchange.
    pub lines_skipped: u64,
    /// Lines that are not audit lines (not JSON, too long, fields missing).
    pub lines_unparseable: u64,
    /// Lines dropped as copies of a line already counted (same `request_id`
    /// and content).
    pub duplicates: u64,
    /// Lines that share a `request_id` with another but differ from it (a
    /// corrupted file?): each is counted.
    pub conflicts: u64,
    /// Tokens issued.
    #[serde(serialize_with = "as_list")]
    pub issued: BTreeMap<UsageKey, Issued>,
    /// Refused exchanges by error code.
    pub refusals: BTreeMap<String, u64>,
}

fn as_list<S: serde::Serializer>(m: &BTreeMap<UsageKey, Issued>, s: S) -> Result<S::Ok, S::Error> {
    #[derive(Serialize)]
    struct Entry<'a> {
        #[serde(flatten)]
        key: &'a UsageKey,
        #[serde(flatten)]
        issued: &'a Issued,
    }
    s.collect_seq(m.iter().map(|(key, issued)| Entry { key, issued }))
}

/// One file being read.
struct Source {
    lines: Box<dyn BufRead>,
    buf: Vec<u8>,
}

/// Opens `path`, gzip-decoded when it starts with gzip's magic bytes; the open
/// does not block on a FIFO or device (only regular files are read). `buffer`
/// bytes per reader.
fn open(path: &Path, buffer: usize) -> Result<Box<dyn BufRead>, String> {
    let (file, _) = crate::domain::regular_file::open_regular(path, u64::MAX)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let mut reader = BufReader::with_capacity(buffer, file);
    let gzip = reader
        .fill_buf()
        .map(|b| b.starts_with(&[0x1f, 0x8b]))
        .map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(if gzip {
        Box::new(BufReader::with_capacity(
            buffer,
            flate2::bufread::MultiGzDecoder::new(reader),
        ))
    } else {
        Box::new(reader)
    })
}

impl Source {
    /// The next line, bounded: `Ok(None)` at the end; `Ok(Some(None))` for a
    /// line over [`MAX_LINE_BYTES`] (skipped to its end).
    fn next_line(&mut self) -> Result<Option<Option<&[u8]>>, String> {
        self.buf.clear();
        let limit = u64::try_from(MAX_LINE_BYTES + 1).unwrap_or(u64::MAX);
        let n = (&mut self.lines)
            .take(limit)
            .read_until(b'\n', &mut self.buf)
            .map_err(|e| e.to_string())?;
        if n == 0 {
            return Ok(None);
        }
        if self.buf.len() > MAX_LINE_BYTES && self.buf.last() != Some(&b'\n') {
            // Skip the rest of the over-long line.
            let mut sink = Vec::new();
            loop {
                sink.clear();
                let m = (&mut self.lines)
                    .take(limit)
                    .read_until(b'\n', &mut sink)
                    .map_err(|e| e.to_string())?;
                if m == 0 || sink.last() == Some(&b'\n') {
                    break;
                }
            }
            return Ok(Some(None));
        }
        Ok(Some(Some(&self.buf)))
    }
}

/// Reads each of `files` in turn (gzip-decoded where compressed, lines bounded
/// by [`MAX_LINE_BYTES`], over-long lines skipped) and hands every line to
/// `each` until it returns `false`. For lookups (`token inspect --audit`); a
/// report uses [`read`].
///
/// # Errors
/// A file that cannot be opened or read (naming it), or more than [`MAX_FILES`].
pub fn scan(files: &[PathBuf], mut each: impl FnMut(&[u8]) -> bool) -> Result<(), String> {
    if files.len() > MAX_FILES {
        return Err(format!("more than {MAX_FILES} audit files"));
    }
    for path in files {
        let mut source = Source {
            lines: open(path, 64 * 1024)?,
            buf: Vec::new(),
        };
        while let Some(line) = source
            .next_line()
            .map_err(|e| format!("{}: {e}", path.display()))?
        {
            if let Some(line) = line {
                if !each(line) {
                    return Ok(());
                }
            }
        }
    }
    Ok(())
}

/// The period a report covers: `[from, to)` in seconds since the epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Period {
    /// First second.
    pub from: u64,
    /// First second after.
    pub to: u64,
}

/// Reads `files` (in any order) and aggregates the exchanges of `period`.
///
/// # Errors
/// A file that cannot be opened or read (naming it), or more than [`MAX_FILES`].
pub fn read(files: &[PathBuf], period: Period) -> Result<Usage, String> {
    if files.len() > MAX_FILES {
        return Err(format!("more than {MAX_FILES} audit files"));
    }
    let mut usage = Usage::default();
    // Every file is open at once (merged by time): the soft limit on open
    // files is raised to the hard one, and the buffers shrink with the count.
    let allowed = raise_open_files_limit();
    if files.len().saturating_add(64) > allowed {
        return Err(format!(
            "{} audit files, but this process may open {allowed} files (ulimit -n)",
            files.len()
        ));
    }
    let buffer = (64 * 1024 * 1024 / files.len().max(1)).clamp(4 * 1024, 64 * 1024);
    let mut sources = Vec::with_capacity(files.len());
    for f in files {
        sources.push((
            f.clone(),
            Source {
                lines: open(f, buffer)?,
                buf: Vec::new(),
            },
        ));
    }
    // The next parsed line of each file (`pending`), merged by (time, file).
    let mut pending: Vec<Option<Line>> = Vec::with_capacity(sources.len());
    let mut heap: BinaryHeap<std::cmp::Reverse<(u64, usize)>> = BinaryHeap::new();
    for i in 0..sources.len() {
        let l = next_parsed(&mut sources, i, &mut usage)?;
        if let Some(l) = &l {
            heap.push(std::cmp::Reverse((l.time, i)));
        }
        pending.push(l);
    }
    // The request ids of the last DEDUP_WINDOW_SECS (by line time, ordered:
    // a line dated wrongly far ahead leaves one entry, never stops eviction).
    let mut seen: HashMap<String, u64> = HashMap::new();
    let mut window: BTreeMap<(u64, u64), String> = BTreeMap::new();
    let mut seq: u64 = 0;
    while let Some(std::cmp::Reverse((time, i))) = heap.pop() {
        let next = next_parsed(&mut sources, i, &mut usage)?;
        if let Some(l) = &next {
            heap.push(std::cmp::Reverse((l.time, i)));
        }
        let Some(line) = pending.get_mut(i).and_then(|p| std::mem::replace(p, next)) else {
            continue;
        };
        // Evict behind the merge frontier (the oldest line still waiting):
        // a file whose clock stepped back still finds its copies.
        let frontier = heap
            .peek()
            .map_or(time, |std::cmp::Reverse((t, _))| time.min(*t));
        while let Some(entry) = window.first_entry() {
            if entry.key().0.saturating_add(DEDUP_WINDOW_SECS) >= frontier {
                break;
            }
            let id = entry.remove();
            seen.remove(&id);
        }
        match seen.get(&line.request_id) {
            Some(d) if *d == line.digest => {
                usage.duplicates += 1;
                continue;
            }
            Some(_) => usage.conflicts += 1,
            None => {
                seen.insert(line.request_id.clone(), line.digest);
                seq += 1;
                window.insert((time, seq), line.request_id.clone());
            }
        }
        count(&mut usage, line, period);
    }
    Ok(usage)
}

/// Raises the soft limit on open files to the hard one; the soft limit
/// after that (a large number when it cannot be read).
fn raise_open_files_limit() -> usize {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let limit = getrlimit(Resource::Nofile);
    if limit.current < limit.maximum {
        let raised = rustix::process::Rlimit {
            current: limit.maximum,
            maximum: limit.maximum,
        };
        if setrlimit(Resource::Nofile, raised).is_ok() {
            return limit
                .maximum
                .map_or(usize::MAX, |m| usize::try_from(m).unwrap_or(usize::MAX));
        }
    }
    limit
        .current
        .map_or(usize::MAX, |m| usize::try_from(m).unwrap_or(usize::MAX))
}

/// The next line of source `i` that parses (counting those that do not).
fn next_parsed(
    sources: &mut [(PathBuf, Source)],
    i: usize,
    usage: &mut Usage,
) -> Result<Option<Line>, String> {
    let Some((path, source)) = sources.get_mut(i) else {
        return Ok(None);
    };
    loop {
        let line = source
            .next_line()
            .map_err(|e| format!("{}: {e}", path.display()))?;
        let Some(line) = line else { return Ok(None) };
        usage.lines_read += 1;
        let parsed = line.and_then(|l| {
            let mut parsed = serde_json::from_slice::<Line>(l).ok()?;
            let mut h = std::collections::hash_map::DefaultHasher::new();
            l.trim_ascii_end().hash(&mut h);
            parsed.digest = h.finish();
            Some(parsed)
        });
        match parsed {
            Some(l) if !l.request_id.is_empty() && l.request_id.len() <= 128 => return Ok(Some(l)),
            _ => usage.lines_unparseable += 1,
        }
    }
}

fn count(usage: &mut Usage, l: Line, period: Period) {
    let exchange = l.event.as_deref().is_none_or(|e| e == "exchange");
    if !exchange || l.time < period.from || l.time >= period.to {
        usage.lines_skipped += 1;
        return;
    }
    match (l.outcome.as_str(), l.repository_uuid, l.audience, l.policy) {
        ("allowed", Some(repository_uuid), Some(audience), Some(policy)) => {
            let key = UsageKey {
                repository_uuid,
                environment_uuid: l.deployment_environment_uuid,
                branch: l.branch_name,
                audience,
                policy,
            };
            let e = usage.issued.entry(key).or_default();
            e.count += 1;
            e.last = e.last.max(l.time);
        }
        ("allowed", ..) => usage.lines_skipped += 1,
        _ => {
            let code = l.error_code.unwrap_or_else(|| "unknown".to_string());
            // Codes are a fixed set; a forged line cannot grow the map much.
            if code.len() <= 64
                && (usage.refusals.len() < 256 || usage.refusals.contains_key(&code))
            {
                *usage.refusals.entry(code).or_default() += 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn line(time: u64, id: &str, outcome: &str, extra: &str) -> String {
        format!(
            "{{\"time\":{time},\"request_id\":\"{id}\",\"event\":\"exchange\",\"outcome\":\"{outcome}\",\"repositoryUuid\":\"{{r}}\",\"audience\":\"deploy-api\",\"policy\":\"p\"{extra}}}\n"
        )
    }

    #[test]
    fn rotated_gzip_and_overlapping_files_are_merged_and_deduplicated() {
        let d = tempfile::tempdir().unwrap();
        let a: String = (0..5)
            .map(|i| line(100 + i, &format!("a{i}"), "allowed", ""))
            .collect();
        // The rotated, compressed file holds the older lines and one copy of a's first.
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        for i in 0..3 {
            gz.write_all(
                line(
                    90 + i,
                    &format!("b{i}"),
                    "denied",
                    ",\"error_code\":\"policy.denied\"",
                )
                .as_bytes(),
            )
            .unwrap();
        }
        gz.write_all(line(100, "a0", "allowed", "").as_bytes())
            .unwrap();
        std::fs::write(d.path().join("audit.jsonl.1.gz"), gz.finish().unwrap()).unwrap();
        std::fs::write(d.path().join("audit.jsonl"), format!("{a}not json\n")).unwrap();
        let files = vec![
            d.path().join("audit.jsonl"),
            d.path().join("audit.jsonl.1.gz"),
        ];
        let u = read(&files, Period { from: 0, to: 104 }).unwrap();
        assert_eq!(u.lines_read, 10);
        assert_eq!(u.lines_unparseable, 1);
        assert_eq!(u.duplicates, 1);
        assert_eq!(u.lines_skipped, 1, "time 104 is outside the period");
        let issued: Vec<_> = u.issued.values().copied().collect();
        assert_eq!(
            issued,
            vec![Issued {
                count: 4,
                last: 103
            }]
        );
        assert_eq!(u.refusals.get("policy.denied"), Some(&3));
    }

    #[test]
    fn a_copy_across_a_clock_step_and_a_line_far_ahead_stay_counted_once() {
        let d = tempfile::tempdir().unwrap();
        // The clock stepped back between b and c; c was copied by rotation.
        let f1 = [
            line(1000, "a", "allowed", ""),
            line(2000, "b", "allowed", ""),
            line(1100, "c", "allowed", ""),
        ]
        .concat();
        std::fs::write(d.path().join("f1"), f1).unwrap();
        std::fs::write(d.path().join("f2"), line(1100, "c", "allowed", "")).unwrap();
        let files = [d.path().join("f1"), d.path().join("f2")];
        let u = read(
            &files,
            Period {
                from: 0,
                to: 10_000,
            },
        )
        .unwrap();
        assert_eq!(
            (
                u.duplicates,
                u.issued.values().map(|i| i.count).sum::<u64>()
            ),
            (1, 3)
        );
    }

    #[test]
    fn a_line_sharing_only_the_request_id_is_counted_not_dropped() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(
            d.path().join("a"),
            line(100, "x", "denied", ",\"error_code\":\"policy.denied\""),
        )
        .unwrap();
        std::fs::write(d.path().join("b"), line(100, "x", "allowed", "")).unwrap();
        let u = read(
            &[d.path().join("a"), d.path().join("b")],
            Period { from: 0, to: 1000 },
        )
        .unwrap();
        assert_eq!((u.duplicates, u.conflicts), (0, 1));
        assert_eq!(u.issued.values().map(|i| i.count).sum::<u64>(), 1);
        assert_eq!(u.refusals.get("policy.denied"), Some(&1));
    }

    #[test]
    fn an_over_long_line_is_skipped_to_its_end() {
        let d = tempfile::tempdir().unwrap();
        let long = format!("{{\"x\":\"{}\"}}\n", "y".repeat(MAX_LINE_BYTES * 3));
        std::fs::write(
            d.path().join("a"),
            format!("{long}{}", line(1, "z", "allowed", "")),
        )
        .unwrap();
        let u = read(&[d.path().join("a")], Period { from: 0, to: 10 }).unwrap();
        assert_eq!(
            (u.lines_read, u.lines_unparseable, u.issued.len()),
            (2, 1, 1)
        );
    }
}
