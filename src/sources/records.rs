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
use std::fmt;
use std::marker::PhantomData;

use serde::de::{DeserializeOwned, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer};
use serde_json::value::RawValue;

use crate::escape::clip;
use crate::model::Rejected;

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

/// Answers at least this large are decoded in two halves at once ([`decode_in_halves`]).
pub const HALVES_FROM: usize = 1 << 20;

/// A large answer of the shape `{"<key>":[record,record,...]}` (as Marathon writes it: no
/// whitespace), decoded in two halves at once on rayon's pool (a thread per core): on a
/// machine with two cores, about half the time. Each record is handed to `each` as soon as it
/// is decoded, on the thread that decoded it, and what `each` makes of it is kept, in the
/// list's order: a caller that needs less than the whole record (`weft render` needs only the
/// services) never holds the decoded list. `each` runs inside the one-pass decode: it must
/// neither decode records itself nor wait on rayon's pool (it would read lists in one pass).
/// `record_start` is how a record of the list begins (for Marathon's apps, `{"id":"/`), to
/// find the `,`s between records near the middle.
///
/// The split is only a guess, and the decode checks it. It takes the first two such `,`s after
/// the middle: the first half runs from the list's `[` to the first `,` (a `]` written there),
/// the one record between the two `,`s is decoded on its own, and the second half runs from
/// the second `,` (a `[` written there) to the list's `]`, followed by the answer's closing
/// `}`. Each part must decode whole, with nothing left over, which text cannot do unless both
/// `,`s separate records of that very list: inside a string, or deeper inside a record, the
/// brackets would not close. Anything else (an answer too small or of another shape, no such
/// `,`s, a record that does not decode) returns `None`, and the caller decodes the answer the
/// usual way ([`decode_answer`]): the halves are only faster, never different. The two bytes
/// are restored afterwards; nothing is copied.
pub fn decode_in_halves<T: Record, U: Send>(
    body: &mut [u8],
    key: &str,
    record_start: &[u8],
    each: &(impl Fn(T) -> U + Sync),
) -> Option<Vec<U>> {
    let open = format!("{{\"{key}\":[");
    // JSON's own whitespace only (`trim_ascii_end` would take a form feed too).
    let len = body.len()
        - body
            .iter()
            .rev()
            .take_while(|b| matches!(b, b' ' | b'\t' | b'\n' | b'\r'))
            .count();
    if len < HALVES_FROM || !body.starts_with(open.as_bytes()) || !body[..len].ends_with(b"]}") {
        return None;
    }
    let middle = len / 2;
    let (close, reopen) = {
        let mut commas = memchr::memmem::find_iter(&body[middle..len], record_start)
            .map(|found| middle + found - 1)
            .filter(|&comma| body[comma] == b',');
        (commas.next()?, commas.next()?)
    };
    body[close] = b']';
    body[reopen] = b'[';
    let (first, between, second) = {
        let body = &*body;
        let (first, between) = (&body[open.len() - 1..=close], &body[close + 1..reopen]);
        // Without the answer's `}`.
        let second = &body[reopen..len - 1];
        let ((first, between), second) = rayon::join(
            || (whole_list(first, each), whole::<T>(between).map(each)),
            || whole_list(second, each),
        );
        (first, between, second)
    };
    body[close] = b',';
    body[reopen] = b',';
    let (mut records, between, second) = (first?, between?, second?);
    records.push(between);
    records.extend(second);
    Some(records)
}

/// `text` as one JSON value, every record in it decoded, nothing after it.
fn whole<T: DeserializeOwned>(text: &[u8]) -> Option<T> {
    let text = std::str::from_utf8(text).ok()?;
    in_one_pass(|| serde_json::from_str(text)).ok()
}

/// `text` as one JSON list of records, each decoded (every list inside it too) and handed to
/// `each` as it comes, nothing after the list: [`whole`] for a `Records<T>`, with `each`.
fn whole_list<T: Record, U>(text: &[u8], each: &impl Fn(T) -> U) -> Option<Vec<U>> {
    let text = std::str::from_utf8(text).ok()?;
    in_one_pass(|| {
        let mut deserializer = serde_json::Deserializer::from_str(text);
        let list = deserializer.deserialize_seq(Each(each, PhantomData)).ok()?;
        deserializer.end().ok()?;
        Some(list)
    })
}

/// A list in one pass (as [`RecordsVisitor`] reads one then), each record handed to `.0`.
struct Each<'f, T, F>(&'f F, PhantomData<T>);

impl<'de, T: Record, U, F: Fn(T) -> U> Visitor<'de> for Each<'_, T, F> {
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
