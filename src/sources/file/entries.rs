//! The services file read entry by entry: a change parses again only the `[[service]]` entries
//! whose text changed.
//!
//! At 10,000 services a read of the whole 1.2 MB file was 40 % of a change's CPU, most of it
//! spent on entries that had not changed. The text is cut before every line that is exactly
//! `[[service]]` (spaces around it allowed); each piece is a TOML document of its own, parsed
//! once and remembered by its text until a read no longer has it.
//!
//! The pieces read as the whole file would, or not at all:
//! - the first piece (before any such line) must hold no entry: `service = [...]` there and a
//!   `[[service]]` later is an error in the whole file, but not in the pieces;
//! - any piece that fails (a syntax error, a cut inside a multi-line string or array, which
//!   leaves a piece unterminated, a top-level key other than `service`) makes the read parse
//!   the whole file as one document, so that its error reads as before, with its line and
//!   column;
//! - after a `[[service]]` line every key, and every `[service.x]` or `[[service.x]]` table,
//!   belongs to that entry, in the whole file and in its piece alike.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use super::{number, parse_entries, Entry, FileContent, FileError};

/// What the last read's pieces gave, by their text.
#[derive(Default)]
pub struct Entries {
    pieces: HashMap<Box<str>, Arc<[Entry]>>,
}

impl Entries {
    /// Parses `text` as [`super::parse`] would, reusing every piece the last read had.
    pub fn parse(&mut self, text: &str, path: &Path) -> Result<FileContent, FileError> {
        let mut pieces = HashMap::with_capacity(self.pieces.len());
        let mut read: Vec<Arc<[Entry]>> = Vec::new();
        for (index, piece) in cut(text).into_iter().enumerate() {
            let entries = match self.pieces.remove_entry(piece) {
                Some((key, entries)) => {
                    pieces.insert(key, Arc::clone(&entries));
                    entries
                }
                None => match parse_entries(piece) {
                    Ok(entries) => {
                        let entries: Arc<[Entry]> = entries.into();
                        pieces.insert(piece.into(), Arc::clone(&entries));
                        entries
                    }
                    Err(_) => return self.whole(text, path),
                },
            };
            if index == 0 && !entries.is_empty() {
                return self.whole(text, path);
            }
            read.push(entries);
        }
        self.pieces = pieces;
        let count = read.iter().map(|entries| entries.len()).sum();
        let entries = read.iter().flat_map(|entries| entries.iter().cloned());
        Ok(number(entries, count))
    }

    /// The whole file as one document; nothing is remembered from it.
    fn whole(&mut self, text: &str, path: &Path) -> Result<FileContent, FileError> {
        self.pieces.clear();
        super::parse(text, path)
    }
}

/// `text` cut before each line that is `[[service]]`; the first piece is what comes before the
/// first such line (empty when the file starts with one).
fn cut(text: &str) -> Vec<&str> {
    let mut starts = vec![0];
    let mut at = 0;
    for line in text.split_inclusive('\n') {
        if line.trim() == "[[service]]" {
            starts.push(at);
        }
        at += line.len();
    }
    starts.push(text.len());
    starts.windows(2).map(|w| &text[w[0]..w[1]]).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(name: &str, extra: &str) -> String {
        format!("[[service]]\nname = \"{name}\"\nhosts = [\"{name}.test\"]\nservers = [\"10.2.1.5:80\"]\n{extra}\n")
    }

    /// What the pieces give, beside what the whole file gives.
    fn both(entries: &mut Entries, text: &str) -> (String, String) {
        let path = Path::new("s.toml");
        let show = |r: Result<FileContent, FileError>| match r {
            Ok(c) => format!("{:?} {:?}", c.services, c.rejected),
            Err(e) => format!("error: {e}"),
        };
        (
            show(entries.parse(text, path)),
            show(super::super::parse(text, path)),
        )
    }

    #[test]
    fn the_cut_is_before_each_header_line() {
        assert_eq!(cut(""), vec![""]);
        assert_eq!(
            cut("[[service]]\na = 1\n"),
            vec!["", "[[service]]\na = 1\n"]
        );
        assert_eq!(
            cut("# c\n[[service]]\na = 1\n  [[service]]  \nb = 2"),
            vec!["# c\n", "[[service]]\na = 1\n", "  [[service]]  \nb = 2"]
        );
        // Not a header line of its own: no cut.
        assert_eq!(cut("x = \"[[service]]\"\n").len(), 1);
    }

    #[test]
    fn pieces_read_as_the_whole_file_through_edits() {
        let mut entries = Entries::default();
        let a = entry("a", "");
        let b = entry("b", "check = \"/health\"");
        let broken = entry("c", "hostz = 1");
        let sub =
            "[[service]]\nname = \"d\"\nhosts = [\"d.test\"]\nservers = []\n[[service.x]]\ny = 1\n";
        let texts = [
            format!("# services\n{a}{b}"),
            format!("{a}{broken}{b}"),
            format!("{b}{a}{broken}"),
            // An unterminated multi-line string that holds a header line: the whole file's
            // error, with its line.
            format!("{a}[[service]]\nname = \"\"\"\n[[service]]\n{b}"),
            // Entries given before the first header, then headers: an error in the whole file.
            format!("service = [{{ name = \"z\" }}]\n{a}"),
            // A header with a comment is no cut: two entries in one piece.
            format!("{a}[[service]] # b\nname = \"b\"\nhosts = [\"b.test\"]\nservers = []\n{broken}"),
            // A sub-table stays with its entry.
            format!("{a}{sub}{b}"),
            // A multi-line string holding a header line, closed: read as one value.
            format!("{a}[[service]]\nname = \"e\"\nhosts = [\"e.test\"]\nservers = []\ncheck = \"\"\"\n[[service]]\n\"\"\"\n{b}"),
            format!("[other]\n{a}"),
            format!("{a}[other]\nx = 1\n"),
            String::new(),
            format!("{a}{b}"),
        ];
        for text in &texts {
            let (pieces, whole) = both(&mut entries, text);
            assert_eq!(pieces, whole, "{text}");
            // Again, from what the first read remembered.
            let (pieces, whole) = both(&mut entries, text);
            assert_eq!(pieces, whole, "{text}");
        }
    }

    #[test]
    fn only_the_last_reads_pieces_are_kept() {
        let mut entries = Entries::default();
        let path = Path::new("s.toml");
        let (a, b, c) = (entry("a", ""), entry("b", ""), entry("c", ""));
        entries.parse(&format!("{a}{b}"), path).unwrap();
        assert_eq!(entries.pieces.len(), 3);
        entries.parse(&format!("{a}{c}"), path).unwrap();
        assert_eq!(entries.pieces.len(), 3);
        assert!(entries.pieces.contains_key(c.as_str()));
        assert!(!entries.pieces.contains_key(b.as_str()));
    }
}
