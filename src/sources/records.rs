//! Lists from the wire, decoded record by record: a record that does not decode (a port of
//! -1, a number where a label's text belongs) is dropped with its reason, and every other
//! record is used. Only the list itself (the envelope) failing fails the answer.
//!
//! ```text
//! [ {app}, {app with "containerPort": -1}, {app} ]
//!     │          │                           │
//!     │          └──> DroppedRecord { name: "/shop", reason: "container.portMappings[0]
//!     v               .containerPort: invalid value: integer `-1`, expected u32" }
//!  records ───────────────────────────────────────> the source's services
//! ```
//!
//! Nearly always every record decodes, so an answer is first decoded in one pass
//! ([`decode_answer`]), each record as it comes. Only when a record fails is the answer read
//! again, record by record: each record is read as raw JSON text borrowed from the answer (no
//! second tree, no copy), then decoded on its own. Both ways give the same outcome; the one pass
//! is only faster (the record-by-record way reads a list of lists three times, and tracks the
//! path of every field to name a failing one). What is kept of the failures is bounded: the first
//! [`MAX_NAMED_DROPS`] of a list are named, the rest counted, and every name and reason (they
//! come from the wire, and serde's messages quote the input) is cut to a bounded length.

use std::cell::Cell;
use std::collections::BTreeMap;
use std::fmt;
use std::marker::PhantomData;
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::Arc;

use serde::de::{DeserializeOwned, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer};
use serde_json::value::RawValue;

use crate::escape::clip;
use crate::model::Rejected;
use crate::sources::http::{Body, Sink};

/// The dropped records of one list that are named; the rest are counted.
pub const MAX_NAMED_DROPS: usize = 16;
/// The longest reason kept, in bytes (cut on a character boundary).
const MAX_REASON: usize = 200;
/// The longest name quoted (an app id, a Consul instance id), in bytes.
const MAX_NAME: usize = 128;
/// The longest name kept whole (two quoted names and some words), in bytes: the safety net
/// under every [`Record::name`].
const MAX_NAME_TEXT: usize = 3 * MAX_NAME;

/// A record of a list: what names one that did not decode.
pub trait Record: DeserializeOwned {
    /// The record's name, read from its raw JSON where the naming fields themselves can be
    /// read (already quoted: `"/shop"`, `"shop-1" on node "n1"`); `None` when they cannot.
    fn name(raw: &str) -> Option<String>;
}

/// A record that did not decode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DroppedRecord {
    /// Its place in the list, from 0.
    pub index: usize,
    /// From [`Record::name`], bounded.
    pub name: Option<String>,
    /// The field that failed and why, bounded.
    pub reason: String,
}

impl DroppedRecord {
    /// `app "/shop"`, or `app #3` when its name cannot be read.
    pub fn subject(&self, kind: &str) -> String {
        match &self.name {
            Some(name) => format!("{kind} {name}"),
            None => format!("{kind} #{}", self.index + 1),
        }
    }
}

/// A list decoded record by record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Records<T> {
    /// Every record that decoded, in order.
    pub records: Vec<T>,
    /// The first [`MAX_NAMED_DROPS`] records that did not.
    pub dropped: Vec<DroppedRecord>,
    /// How many more did not.
    pub more_dropped: usize,
}

impl<T> Default for Records<T> {
    fn default() -> Self {
        Records {
            records: Vec::new(),
            dropped: Vec::new(),
            more_dropped: 0,
        }
    }
}

/// Lists of at least this many records are mapped on rayon's pool ([`Records::map`]).
const MAP_ON_POOL_FROM: usize = 1000;

impl<T> Records<T> {
    /// Each record as `each` makes it, in order; the dropped ones as they were. A long list is
    /// mapped on rayon's pool, in parts of at least half [`MAP_ON_POOL_FROM`].
    pub fn map<U: Send>(self, each: impl Fn(T) -> U + Sync + Send) -> Records<U>
    where
        T: Send,
    {
        use rayon::iter::{IndexedParallelIterator, IntoParallelIterator, ParallelIterator};
        let records = if self.records.len() < MAP_ON_POOL_FROM {
            self.records.into_iter().map(each).collect()
        } else {
            self.records
                .into_par_iter()
                .with_min_len(MAP_ON_POOL_FROM / 2)
                .map(each)
                .collect()
        };
        Records {
            records,
            dropped: self.dropped,
            more_dropped: self.more_dropped,
        }
    }

    /// Keeps a decoded record, or the failure of one, named by `name` (called only then).
    pub fn push(&mut self, decoded: Result<T, String>, name: impl FnOnce() -> Option<String>) {
        let index = self.records.len() + self.dropped.len() + self.more_dropped;
        match decoded {
            Ok(record) => self.records.push(record),
            Err(_) if self.dropped.len() >= MAX_NAMED_DROPS => self.more_dropped += 1,
            Err(reason) => self.dropped.push(DroppedRecord {
                index,
                name: name().map(|n| clip(&n, MAX_NAME_TEXT).to_string()),
                reason: clip(&reason, MAX_REASON).to_string(),
            }),
        }
    }

    /// The dropped records as the model's rejected inputs: `subject` says what each is (see
    /// [`DroppedRecord::subject`]), and one more entry counts those not named.
    pub fn rejected(
        &self,
        kind: &str,
        subject: impl Fn(&DroppedRecord) -> String,
    ) -> Vec<Rejected> {
        let mut rejected: Vec<Rejected> = self
            .dropped
            .iter()
            .map(|record| Rejected {
                subject: subject(record),
                reason: format!("does not decode, dropped: {}", record.reason),
            })
            .collect();
        if self.more_dropped > 0 {
            rejected.push(Rejected {
                subject: format!("{} more of the {kind} records", self.more_dropped),
                reason: format!(
                    "do not decode either, dropped (only the first {MAX_NAMED_DROPS} are named)"
                ),
            });
        }
        rejected
    }
}

thread_local! {
    /// Set while an answer or a record is decoded in one pass: see [`decode_answer`].
    static IN_ONE_PASS: Cell<bool> = const { Cell::new(false) };
}

/// `decode` with every list of records inside read in one pass: the first record that does not
/// decode fails the whole.
fn in_one_pass<R>(decode: impl FnOnce() -> R) -> R {
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            IN_ONE_PASS.set(self.0);
        }
    }
    let _restore = Restore(IN_ONE_PASS.replace(true));
    decode()
}

/// Decodes an answer whose lists are [`Records`]: in one pass when every record decodes (the
/// common case), else again record by record, the records that do not decode dropped with
/// their reasons. The outcome is the same either way. An answer that is not UTF-8 is read
/// record by record at once: that way fails it whole, even where the bad bytes are in a field
/// weft ignores, which the one pass would not look at.
pub fn decode_answer<T: DeserializeOwned>(body: &[u8]) -> Result<T, String> {
    if let Ok(text) = std::str::from_utf8(body) {
        if let Ok(answer) = in_one_pass(|| serde_json::from_str(text)) {
            return Ok(answer);
        }
    }
    serde_json::from_slice(body).map_err(|e| e.to_string())
}

/// The size of the segments a large answer is decoded in as it comes ([`Streamed`]).
pub const SEGMENT: usize = 256 << 10;
/// Segments handed to rayon's pool and not yet checked in order (back or not), past which the
/// reader decodes one itself, or waits, before it reads on: the answer is held a few segments
/// at a time, never whole, also while one thread is slow.
pub const UNCHECKED: usize = 3;
/// Segments' buffers kept for the next ones.
const SPARE: usize = 4;
/// Text read past the last segment without a place to end one (a record this large), past
/// which the segments give way to the usual decode: a buffer grown by doubling would hold
/// twice the answer.
const MAX_UNCUT: usize = 4 * SEGMENT;

/// An answer of the shape `{"<key>":[record,record,...]}` (as Marathon writes it: no
/// whitespace), decoded as it comes, in segments of about [`SEGMENT`] bytes, on rayon's pool
/// (a thread per core) while the next ones are read: the answer is never held whole, and the
/// decode is done about when the last byte is read. Each record is handed to `each` as soon as
/// it is decoded, on the thread that decoded it, and what `each` makes of it is kept, in the
/// list's order: a caller that needs less than the whole record (`weft render` needs only the
/// services) never holds the decoded list. `each` runs inside the one-pass decode: it must
/// neither decode records itself nor wait on rayon's pool. The outcome is the one
/// [`decode_answer`] gives on the whole answer, records, drops and error alike.
///
/// A segment ends at the last `,` before `record_start` (for Marathon's apps, `{"id":"/`) in the
/// text read: a guess, which the decode checks. `record_start` begins with a `"` that no string
/// can hold unescaped, so the `,` lies outside strings; but it may lie deeper inside a record.
/// Each segment is decoded as a whole list (`[` and `]` put around it), which text cannot do
/// unless both its ends lie between records of that very list, provided it begins between
/// two: the first segment begins at the list's `[`, and a segment that decodes, begun between
/// records, ends between records too (else its brackets would not close). So once the
/// segments up to one have all decoded, every one of their ends is a true one, and their text
/// is let go. (A segment of no records does not count as decoded: only the first can be one,
/// cut just after the list's `[`, and `[,` is no list.) The first that does not decode (a record
/// that does not, a false end, text that is not JSON) begins at a true end: from it on, the answer is decoded the usual way, as the
/// answer `{"<key>":[` + the rest ([`decode_answer`]'s outcome on the rest, its drops' places
/// and its error's position counted from the whole answer's start). An answer of another shape
/// (whitespace after the key, another key first) is read whole and decoded the usual way.
pub struct Streamed<T, U> {
    open: Vec<u8>,
    /// `,` and the record start: where a segment may end.
    cut: Vec<u8>,
    each: Arc<dyn Fn(T) -> U + Send + Sync>,
    /// Decodes an answer the usual way, to its list.
    usual: fn(&[u8]) -> Result<Records<T>, String>,
    mode: Mode,
    /// [`Mode::Head`]: the answer so far; [`Mode::Segments`]: `[` and the text read since the
    /// last segment's end.
    current: Vec<u8>,
    /// How much of `current` has no place to end a segment.
    searched: usize,
    /// [`Mode::Usual`]: the answer to decode the usual way (the segments' start taken out).
    usual_text: Body,
    /// A segment checked in order did not decode.
    failed: bool,
    /// The answer's length, when it is known ahead.
    known: Option<usize>,
    /// The text of the segments sent and not yet checked, and the most of it and `current`
    /// held at once.
    held: usize,
    most_held: usize,
    /// Segments handed to the pool, and those not back yet.
    sent: usize,
    in_flight: usize,
    done: (Sender<Done<U>>, Receiver<Done<U>>),
    /// Segments back, not yet checked in order.
    back: BTreeMap<usize, Done<U>>,
    /// What `each` made of the records of the segments checked in order, and how many those are.
    made: Vec<U>,
    checked: usize,
    /// Where the text of the segments checked lies in the answer: replaced by nothing in the
    /// usual decode's answer, for the position of its error.
    skipped: Skipped,
    spare: Vec<Vec<u8>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Head,
    Segments,
    Usual,
}

/// A segment decoded: its text (`[`, records, `]`) and what `each` made of its records, or
/// `None` when it does not decode as a whole list.
struct Done<U> {
    index: usize,
    text: Vec<u8>,
    made: std::thread::Result<Option<Vec<U>>>,
}

/// Text taken out of the answer: its length, its line ends, and its length after the last one.
#[derive(Debug, Default, Clone, Copy)]
struct Skipped {
    bytes: usize,
    lines: usize,
    after_last_line: usize,
}

impl Skipped {
    fn add(&mut self, text: &[u8]) {
        self.bytes += text.len();
        match memchr::memrchr(b'\n', text) {
            Some(last) => {
                self.lines += memchr::memchr_iter(b'\n', text).count();
                self.after_last_line = text.len() - last - 1;
            }
            None => self.after_last_line += text.len(),
        }
    }

    /// serde_json's `... at line L column C` for an answer of which `self` was taken out after
    /// its first `open` bytes, as the whole answer's.
    fn place(&self, message: String, open: usize) -> String {
        let Some((what, at)) = message.rsplit_once(" at line ") else {
            return message;
        };
        let Some((line, column)) = at.split_once(" column ") else {
            return message;
        };
        let (Ok(line), Ok(column)) = (line.parse::<usize>(), column.parse::<usize>()) else {
            return message;
        };
        // Every error lies after `open`: on its line, the text taken out lies before it.
        let column = match line {
            1 if self.lines == 0 => column + self.bytes,
            1 => column.saturating_sub(open) + self.after_last_line,
            _ => column,
        };
        format!("{what} at line {} column {column}", line + self.lines)
    }
}

impl<T: Record + Send + 'static, U: Send + 'static> Streamed<T, U> {
    /// `usual` decodes a whole answer to its list (the answer's type is the caller's).
    pub fn new(
        key: &str,
        record_start: &[u8],
        each: Arc<dyn Fn(T) -> U + Send + Sync>,
        usual: fn(&[u8]) -> Result<Records<T>, String>,
    ) -> Streamed<T, U> {
        Streamed {
            open: format!("{{\"{key}\":[").into_bytes(),
            cut: [b",", record_start].concat(),
            each,
            usual,
            mode: Mode::Head,
            current: Vec::new(),
            searched: 0,
            usual_text: Body::default(),
            failed: false,
            known: None,
            held: 0,
            most_held: 0,
            sent: 0,
            in_flight: 0,
            done: mpsc::channel(),
            back: BTreeMap::new(),
            made: Vec::new(),
            checked: 0,
            skipped: Skipped::default(),
            spare: Vec::new(),
        }
    }

    /// Hands the text read up to its last possible record boundary to the pool, and waits for
    /// (or decodes) earlier segments while too many are out.
    fn send_segment(&mut self) {
        // Only what was not searched yet, and the start of a `cut` it may end.
        let from = self.searched.saturating_sub(self.cut.len()).max(1);
        let Some(end) = memchr::memmem::rfind(&self.current[from..], &self.cut).map(|at| at + from)
        else {
            self.searched = self.current.len();
            return;
        };
        self.searched = 0;
        let mut next = self.spare.pop().unwrap_or_default();
        next.clear();
        next.reserve(2 * SEGMENT);
        next.push(b'[');
        next.extend_from_slice(&self.current[end + 1..]);
        let mut text = std::mem::replace(&mut self.current, next);
        text.truncate(end);
        text.push(b']');
        self.held += text.len();
        let (index, each, sender) = (self.sent, Arc::clone(&self.each), self.done.0.clone());
        self.sent += 1;
        self.in_flight += 1;
        rayon::spawn(move || {
            // A panic goes to the reader, as it would from a decode on its own thread (rayon
            // would abort the process).
            let made = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                whole_list::<T, U, _>(&text, &*each)
            }));
            // The receiver lives until every segment is back.
            let _ = sender.send(Done { index, text, made });
        });
        while let Ok(done) = self.done.1.try_recv() {
            self.back(done);
        }
        // With none in flight, the first unchecked one is back and did not decode.
        while self.sent - self.checked > UNCHECKED && self.in_flight > 0 && !self.failed {
            self.help_or_wait();
        }
    }

    /// Decodes a segment waiting on the pool on this thread, if it is one of the pool's and one
    /// waits; else waits for one to come back.
    fn help_or_wait(&mut self) {
        if rayon::yield_now() != Some(rayon::Yield::Executed) {
            // Sent while in flight: a segment comes back.
            if let Ok(done) = self.done.1.recv() {
                self.back(done);
            }
        }
        while let Ok(done) = self.done.1.try_recv() {
            self.back(done);
        }
    }

    /// A segment is back: those checked in order are let go, their records kept.
    fn back(&mut self, done: Done<U>) {
        self.in_flight -= 1;
        self.back.insert(done.index, done);
        if self.mode != Mode::Segments {
            return;
        }
        while let Some(done) = self.back.remove(&self.checked) {
            // A panic is the reader's once its segment counts (one after a segment that does
            // not decode may hold no records at all).
            let made = match done.made {
                Ok(made) => made,
                Err(panic) => std::panic::resume_unwind(panic),
            };
            // A list of none: only the first segment can be one, cut just after the list's `[`
            // (`[,{...`), which the answer's text would not let pass.
            let Some(made) = made.filter(|made| !made.is_empty()) else {
                self.back.insert(
                    done.index,
                    Done {
                        made: Ok(None),
                        ..done
                    },
                );
                self.failed = true;
                return;
            };
            self.made.extend(made);
            self.checked += 1;
            self.held -= done.text.len();
            // Its records and the `,` after them.
            self.skipped.add(&done.text[1..done.text.len() - 1]);
            self.skipped.add(b",");
            // Only buffers of the usual room: one grown for a large app is let go.
            if self.spare.len() < SPARE && done.text.capacity() <= 2 * SEGMENT {
                self.spare.push(done.text);
            }
        }
    }

    /// The most of the answer's text held at once while the segments were read (those not yet
    /// checked, and the text after them): what the tests hold to its bound.
    pub fn most_held(&self) -> usize {
        self.most_held
    }

    /// The segments give way: the rest of the answer, from the first segment not checked, is
    /// decoded the usual way, as the answer `{"<key>":[` + the rest.
    fn give_way(&mut self) {
        while self.in_flight > 0 {
            self.help_or_wait();
        }
        // Of the length it will have, when that is known: never pages joined, the text twice.
        let skipped = match self.mode {
            Mode::Head => 0,
            _ => self.skipped.bytes,
        };
        let length = self.known.map(|known| known.saturating_sub(skipped));
        if self.mode != Mode::Usual {
            self.usual_text.expect(length);
        }
        match self.mode {
            Mode::Head => self.usual_text.take(&self.current),
            Mode::Segments => {
                self.usual_text.take(&self.open);
                for (_, done) in std::mem::take(&mut self.back) {
                    self.usual_text.take(&done.text[1..done.text.len() - 1]);
                    self.usual_text.take(b",");
                }
                self.usual_text.take(&self.current[1..]);
            }
            Mode::Usual => {}
        }
        self.current = Vec::new();
        self.spare = Vec::new();
        self.mode = Mode::Usual;
    }

    /// The answer's records, as [`decode_answer`] would give them from the whole answer.
    pub fn finish(mut self) -> Result<Records<U>, String> {
        if self.mode == Mode::Segments {
            // The text after the last segment, without the answer's `}`.
            let end = self.current.len()
                - self
                    .current
                    .iter()
                    .rev()
                    .take_while(|b| matches!(b, b' ' | b'\t' | b'\n' | b'\r'))
                    .count();
            let last = match self.current[..end].ends_with(b"]}") {
                true => std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    whole_list::<T, U, _>(&self.current[..end - 1], &*self.each)
                })),
                false => Ok(None),
            };
            while self.in_flight > 0 {
                self.help_or_wait();
            }
            if self.checked == self.sent {
                let last = last.unwrap_or_else(|panic| std::panic::resume_unwind(panic));
                if let Some(last) = last {
                    self.made.extend(last);
                    return Ok(Records {
                        records: self.made,
                        ..Records::default()
                    });
                }
            }
        }
        self.give_way();
        let open = self.open.len();
        let text = std::mem::take(&mut self.usual_text).into_vec();
        let rest = (self.usual)(&text).map_err(|e| self.skipped.place(e, open))?;
        drop(text);
        let before = self.made.len();
        let mut rest = rest.map(&*self.each);
        for dropped in &mut rest.dropped {
            dropped.index += before;
        }
        self.made.append(&mut rest.records);
        rest.records = self.made;
        Ok(rest)
    }
}

impl<T: Record + Send + 'static, U: Send + 'static> Sink for Streamed<T, U> {
    fn expect(&mut self, length: Option<usize>) {
        self.known = length;
    }

    /// Takes the answer's next bytes.
    fn take(&mut self, chunk: &[u8]) {
        if self.mode == Mode::Usual {
            self.usual_text.take(chunk);
            return;
        }
        if self.current.capacity() == 0 {
            self.current.reserve(2 * SEGMENT);
        }
        self.current.extend_from_slice(chunk);
        self.most_held = self.most_held.max(self.held + self.current.len());
        if self.mode == Mode::Head && self.current.len() >= self.open.len() {
            if self.current.starts_with(&self.open) {
                self.mode = Mode::Segments;
                // From the list's `[`.
                self.current.drain(..self.open.len() - 1);
            } else {
                self.give_way();
                return;
            }
        }
        if self.mode == Mode::Segments && self.current.len() >= SEGMENT {
            self.send_segment();
            if self.failed || self.current.len() > MAX_UNCUT {
                self.give_way();
            }
        }
    }
}

/// `text` as one JSON list of records, each decoded in one pass (every list inside it too) and
/// handed to `each` as it comes, nothing after the list.
fn whole_list<T: Record, U, F: Fn(T) -> U + ?Sized>(text: &[u8], each: &F) -> Option<Vec<U>> {
    let text = std::str::from_utf8(text).ok()?;
    in_one_pass(|| {
        let mut deserializer = serde_json::Deserializer::from_str(text);
        let list = deserializer.deserialize_seq(Each(each, PhantomData)).ok()?;
        deserializer.end().ok()?;
        Some(list)
    })
}

/// A list in one pass (as [`RecordsVisitor`] reads one then), each record handed to `.0`.
struct Each<'f, T, F: ?Sized>(&'f F, PhantomData<T>);

impl<'de, T: Record, U, F: Fn(T) -> U + ?Sized> Visitor<'de> for Each<'_, T, F> {
    type Value = Vec<U>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an array")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<U>, A::Error> {
        let mut made = Vec::new();
        while let Some(record) = seq.next_element::<T>()? {
            made.push((self.0)(record));
        }
        Ok(made)
    }
}

/// Decodes one record from its raw JSON: the failing field's path leads the reason
/// (`container.portMappings[0].containerPort: invalid value: ...`).
pub fn decode_record<T: DeserializeOwned>(raw: &str) -> Result<T, String> {
    // Only a record that fails pays for tracking the path to its bad field, and for reading
    // its own lists record by record.
    if let Ok(record) = in_one_pass(|| serde_json::from_str(raw)) {
        return Ok(record);
    }
    let mut deserializer = serde_json::Deserializer::from_str(raw);
    serde_path_to_error::deserialize(&mut deserializer).map_err(|err| {
        let path = err.path().to_string();
        let inner = err.into_inner();
        // The line and column are the record's, not the answer's: they would mislead.
        let message = inner.to_string();
        let message = match message.rsplit_once(" at line ") {
            Some((message, _)) if inner.line() > 0 => message.to_string(),
            _ => message,
        };
        if path == "." || path.is_empty() {
            message
        } else {
            format!("{path}: {message}")
        }
    })
}

/// `text` quoted, cut to the bound of a name: for [`Record::name`].
pub fn quoted(text: &str) -> String {
    format!("{:?}", clip(text, MAX_NAME))
}

impl<'de, T: Record> Deserialize<'de> for Records<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_seq(RecordsVisitor(PhantomData))
    }
}

struct RecordsVisitor<T>(PhantomData<T>);

impl<'de, T: Record> Visitor<'de> for RecordsVisitor<T> {
    type Value = Records<T>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an array")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Records<T>, A::Error> {
        let mut records = Records::default();
        if IN_ONE_PASS.get() {
            records.records = Each(&|record| record, PhantomData).visit_seq(seq)?;
            return Ok(records);
        }
        // Borrowed from the answer: the answers are decoded from slices, never readers.
        while let Some(raw) = seq.next_element::<&'de RawValue>()? {
            records.push(decode_record(raw.get()), || T::name(raw.get()));
        }
        Ok(records)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Deserialize, PartialEq)]
    struct Item {
        id: String,
        port: u32,
    }

    impl Record for Item {
        fn name(raw: &str) -> Option<String> {
            #[derive(Deserialize)]
            struct Id {
                id: String,
            }
            serde_json::from_str::<Id>(raw).ok().map(|i| quoted(&i.id))
        }
    }

    fn decode(json: &str) -> Result<Records<Item>, serde_json::Error> {
        serde_json::from_str(json)
    }

    #[test]
    fn a_bad_record_is_dropped_with_its_field_and_the_rest_kept() {
        let items = decode(
            r#"[{"id":"a","port":1},{"id":"b","port":-1},{"id":7,"port":2},{"id":"c","port":3}]"#,
        )
        .unwrap();
        let ids: Vec<&str> = items.records.iter().map(|i| i.id.as_str()).collect();
        assert_eq!(ids, ["a", "c"]);
        assert_eq!(
            items.dropped,
            [
                DroppedRecord {
                    index: 1,
                    name: Some("\"b\"".into()),
                    reason: "port: invalid value: integer `-1`, expected u32".into(),
                },
                DroppedRecord {
                    index: 2,
                    name: None,
                    reason: "id: invalid type: integer `7`, expected a string".into(),
                },
            ]
        );
        assert_eq!(items.dropped[1].subject("item"), "item #3");
        let rejected = items.rejected("item", |r| r.subject("item"));
        assert_eq!(rejected[0].subject, "item \"b\"");
        assert!(rejected[0]
            .reason
            .starts_with("does not decode, dropped: port:"));
    }

    #[test]
    fn not_an_array_fails_the_whole_list() {
        assert!(decode(r#"{"id":"a","port":1}"#).is_err());
        assert!(decode(r#"[{"id":"a","port":1}"#).is_err());
        assert!(decode("[1,").is_err());
    }

    #[test]
    fn what_is_kept_of_the_failures_is_bounded() {
        let long = "x".repeat(100_000);
        let mut json = String::from("[");
        for i in 0..100 {
            json.push_str(&format!(r#"{{"id":"{long}{i}","port":"{long}"}},"#));
        }
        json.push_str(r#"{"id":"ok","port":80}]"#);
        let items = decode(&json).unwrap();
        assert_eq!(items.records.len(), 1);
        assert_eq!(items.dropped.len(), MAX_NAMED_DROPS);
        assert_eq!(items.more_dropped, 100 - MAX_NAMED_DROPS);
        for dropped in &items.dropped {
            assert!(dropped.reason.len() <= MAX_REASON + '…'.len_utf8());
            assert!(dropped.name.as_ref().unwrap().len() <= MAX_NAME + 5);
        }
        let rejected = items.rejected("item", |r| r.subject("item"));
        assert_eq!(rejected.len(), MAX_NAMED_DROPS + 1);
        assert_eq!(
            rejected[MAX_NAMED_DROPS].subject,
            "84 more of the item records"
        );
    }
}
