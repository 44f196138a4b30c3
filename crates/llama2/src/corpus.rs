//! Training text as documents, read from the files llama2.c's tinystories.py
//! reads and from plain text: what `train-tokenizer` learns from and what
//! `pretokenize` encodes.
//!
//! - `.json` whose first character is `[`: an array of objects (TinyStories'
//!   shards), one document per object;
//! - `.json` / `.jsonl` otherwise: one object per line (JSON Lines);
//! - anything else: plain text, one document per paragraph: lines up to a
//!   blank line or a line `<|endoftext|>` (TinyStories' .txt separator).
//!
//! An object's document is its `"story"` field, else its `"text"` field.
//! Documents are trimmed; empty ones are skipped.

use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::error::{Error, Result};

/// TinyStories' separator between stories in its .txt files.
const END_OF_TEXT: &str = "<|endoftext|>";

/// How a file holds its documents.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Text,
    JsonLines,
    JsonArray,
}

/// The documents of one file, in order, each trimmed; `bytes_read` says
/// how far into the file the reader is (for progress bars).
pub struct Documents {
    path: PathBuf,
    source: Source,
    bytes_read: u64,
}

enum Source {
    Lines {
        reader: BufReader<File>,
        format: Format,
        line: usize,
    },
    /// A JSON array is parsed whole; `bytes_per_record` spreads the file's
    /// size over its records for progress.
    Array {
        records: std::vec::IntoIter<Value>,
        index: usize,
        bytes_per_record: u64,
    },
}

/// The size of the file at `path`, for sizing a progress bar.
pub fn file_size(path: &Path) -> Result<u64> {
    std::fs::metadata(path)
        .map(|m| m.len())
        .map_err(|source| Error::Io {
            path: path.to_owned(),
            source,
        })
}

impl Documents {
    /// Opens `path`, choosing its format by extension and first character.
    pub fn open(path: &Path) -> Result<Self> {
        let io = |source| Error::Io {
            path: path.to_owned(),
            source,
        };
        if path.is_dir() {
            return Err(Error::File {
                path: path.to_owned(),
                reason: "is a directory; give the text or JSON files in it".into(),
            });
        }
        let mut reader = BufReader::new(File::open(path).map_err(io)?);
        let format = detect_format(path, &mut reader).map_err(io)?;
        let source = match format {
            Format::JsonArray => array_source(path, reader)?,
            _ => Source::Lines {
                reader,
                format,
                line: 0,
            },
        };
        Ok(Documents {
            path: path.to_owned(),
            source,
            bytes_read: 0,
        })
    }

    pub fn format(&self) -> Format {
        match &self.source {
            Source::Lines { format, .. } => *format,
            Source::Array { .. } => Format::JsonArray,
        }
    }

    /// Bytes of the file consumed so far.
    pub fn bytes_read(&self) -> u64 {
        self.bytes_read
    }

    /// The next non-empty document, `None` at the end of the file.
    fn next_document(&mut self) -> Result<Option<String>> {
        loop {
            let doc = match &mut self.source {
                Source::Array {
                    records,
                    index,
                    bytes_per_record,
                } => {
                    let Some(record) = records.next() else {
                        return Ok(None);
                    };
                    let at = *index;
                    *index += 1;
                    self.bytes_read += *bytes_per_record;
                    record_text(&record).map_err(|r| self.bad(format!("record {at}: {r}")))?
                }
                Source::Lines { format, .. } if *format == Format::Text => {
                    match self.next_paragraph()? {
                        Some(p) => p,
                        None => return Ok(None),
                    }
                }
                Source::Lines { .. } => match self.next_json_line()? {
                    Some(d) => d,
                    None => return Ok(None),
                },
            };
            let doc = doc.trim();
            if !doc.is_empty() {
                return Ok(Some(doc.to_owned()));
            }
        }
    }

    /// One line of the file into `buf` (cleared first); false at the end.
    fn read_line(&mut self, buf: &mut String) -> Result<bool> {
        let Source::Lines { reader, line, .. } = &mut self.source else {
            unreachable!("only line sources read lines")
        };
        buf.clear();
        let n = reader.read_line(buf).map_err(|e| Error::File {
            path: self.path.clone(),
            reason: format!("line {}: {e}", *line + 1),
        })?;
        *line += 1;
        self.bytes_read += n as u64;
        Ok(n > 0)
    }

    /// Lines up to a blank line, `<|endoftext|>` or the end of the file.
    fn next_paragraph(&mut self) -> Result<Option<String>> {
        let mut paragraph = String::new();
        let mut line = String::new();
        while self.read_line(&mut line)? {
            let t = line.trim();
            if t.is_empty() || t == END_OF_TEXT {
                if !paragraph.trim().is_empty() {
                    return Ok(Some(paragraph));
                }
                continue;
            }
            paragraph.push_str(&line);
        }
        Ok((!paragraph.is_empty()).then_some(paragraph))
    }

    /// The document of the next non-blank JSON line.
    fn next_json_line(&mut self) -> Result<Option<String>> {
        let mut line = String::new();
        while self.read_line(&mut line)? {
            if line.trim().is_empty() {
                continue;
            }
            let Source::Lines { line: number, .. } = &self.source else {
                unreachable!()
            };
            let number = *number;
            let value: Value = serde_json::from_str(&line)
                .map_err(|e| self.bad(format!("line {number}: not JSON: {e}")))?;
            return record_text(&value)
                .map(Some)
                .map_err(|r| self.bad(format!("line {number}: {r}")));
        }
        Ok(None)
    }

    fn bad(&self, reason: String) -> Error {
        Error::File {
            path: self.path.clone(),
            reason,
        }
    }
}

impl Iterator for Documents {
    type Item = Result<String>;

    fn next(&mut self) -> Option<Self::Item> {
        self.next_document().transpose()
    }
}

/// JSON arrays by their first character; JSON Lines for other `.json` and
/// `.jsonl` files; plain text otherwise.
fn detect_format(path: &Path, reader: &mut BufReader<File>) -> std::io::Result<Format> {
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
    if !matches!(ext, "json" | "jsonl") {
        return Ok(Format::Text);
    }
    let starts_array = reader.fill_buf()?.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'[');
    Ok(if starts_array {
        Format::JsonArray
    } else {
        Format::JsonLines
    })
}

/// Parses a whole JSON array file.
fn array_source(path: &Path, mut reader: BufReader<File>) -> Result<Source> {
    let mut bytes = Vec::new();
    reader.read_to_end(&mut bytes).map_err(|source| Error::Io {
        path: path.to_owned(),
        source,
    })?;
    let bad = |reason: String| Error::File {
        path: path.to_owned(),
        reason,
    };
    let value: Value =
        serde_json::from_slice(&bytes).map_err(|e| bad(format!("not valid JSON: {e}")))?;
    let Value::Array(records) = value else {
        return Err(bad("expected a JSON array of objects".into()));
    };
    let bytes_per_record = bytes.len() as u64 / records.len().max(1) as u64;
    Ok(Source::Array {
        records: records.into_iter(),
        index: 0,
        bytes_per_record,
    })
}

/// The `"story"` or else `"text"` string of a record.
fn record_text(record: &Value) -> std::result::Result<String, String> {
    ["story", "text"]
        .iter()
        .find_map(|k| record.get(k).and_then(Value::as_str))
        .map(str::to_owned)
        .ok_or_else(|| "expected an object with a \"story\" or \"text\" string field".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn docs_of(name: &str, content: &str) -> Vec<String> {
        let dir = std::env::temp_dir().join(format!("llama2-corpus-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(name);
        std::fs::write(&path, content).unwrap();
        let docs = Documents::open(&path).unwrap().collect::<Result<Vec<_>>>();
        std::fs::remove_file(&path).unwrap();
        docs.unwrap()
    }

    #[test]
    fn every_format_yields_trimmed_documents() {
        let text = "  One.\nTwo.\n\n\nThree.\n<|endoftext|>\nFour.";
        assert_eq!(docs_of("a.txt", text), ["One.\nTwo.", "Three.", "Four."]);
        let lines = "{\"story\": \" A \"}\n\n{\"text\": \"B\", \"n\": 1}\n";
        assert_eq!(docs_of("a.jsonl", lines), ["A", "B"]);
        let array = " [{\"story\": \"A\"}, {\"story\": \"\"}, {\"story\": \"C\"}]";
        assert_eq!(docs_of("a.json", array), ["A", "C"]);
    }
}
