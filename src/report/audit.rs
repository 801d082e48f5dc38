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

use std::collections::{BTreeMap, BinaryHeap, HashSet, VecDeque};
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
    /// Lines dropped as copies of a line already counted (same `request_id`).
    pub duplicates: u64,
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
/// does not block on a FIFO or device (only regular files are read).
fn open(path: &Path) -> Result<Box<dyn BufRead>, String> {
    let (file, _) = crate::domain::regular_file::open_regular(path, u64::MAX)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let mut reader = BufReader::with_capacity(64 * 1024, file);
    let gzip = reader
        .fill_buf()
        .map(|b| b.starts_with(&[0x1f, 0x8b]))
        .map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(if gzip {
        Box::new(BufReader::with_capacity(
            64 * 1024,
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
    let mut sources = Vec::with_capacity(files.len());
    for f in files {
        sources.push((
            f.clone(),
            Source {
                lines: open(f)?,
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
    let mut seen: HashSet<String> = HashSet::new();
    let mut window: VecDeque<(u64, String)> = VecDeque::new();
    while let Some(std::cmp::Reverse((time, i))) = heap.pop() {
        let next = next_parsed(&mut sources, i, &mut usage)?;
        if let Some(l) = &next {
            heap.push(std::cmp::Reverse((l.time, i)));
        }
        let Some(line) = pending.get_mut(i).and_then(|p| std::mem::replace(p, next)) else {
            continue;
        };
        while window
            .front()
            .is_some_and(|(t, _)| t.saturating_add(DEDUP_WINDOW_SECS) < time)
        {
            if let Some((_, id)) = window.pop_front() {
                seen.remove(&id);
            }
        }
        if !seen.insert(line.request_id.clone()) {
            usage.duplicates += 1;
            continue;
        }
        window.push_back((time, line.request_id.clone()));
        count(&mut usage, line, period);
    }
    Ok(usage)
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
        let parsed = line.and_then(|l| serde_json::from_slice::<Line>(l).ok());
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
