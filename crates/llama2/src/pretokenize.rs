//! Pretokenizing a corpus as llama2.c's tinystories.py `pretokenize` does:
//! every document encoded with BOS and no EOS, all tokens of a file
//! concatenated as little-endian uint16 into shard files `data00.bin`,
//! `data01.bin`, ... that llama2.c's training loader memory-maps.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use rayon::prelude::*;

use crate::corpus::Documents;
use crate::error::{Error, Result};
use crate::tokenizer::Tokenizer;

/// Documents encoded together in parallel; large enough to keep every core
/// busy, small enough that the progress bar moves.
const BATCH: usize = 256;

/// What pretokenizing wrote.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Written {
    pub documents: u64,
    pub tokens: u64,
    pub shards: Vec<PathBuf>,
}

/// The path of shard `index` in `dir`.
pub fn shard_path(dir: &Path, index: usize) -> PathBuf {
    dir.join(format!("data{index:02}.bin"))
}

/// Refuses a tokenizer whose ids do not fit the shards' uint16.
pub fn check_tokenizer(tokenizer: &Tokenizer) -> Result<()> {
    let n = tokenizer.vocab_size();
    if n > 1 << 16 {
        return Err(Error::Invalid(format!(
            "the tokenizer has {n} tokens; shards hold ids as uint16, so at most 65536"
        )));
    }
    Ok(())
}

/// Shards being written: one file at a time, a new one started after the
/// document that brings the current one to `shard_tokens` (documents are
/// never split, so a shard can be trained on alone).
pub struct Shards<'a> {
    dir: &'a Path,
    shard_tokens: Option<u64>,
    next_index: usize,
    /// The open shard and the tokens in it.
    current: Option<(BufWriter<File>, u64)>,
    written: Written,
}

impl<'a> Shards<'a> {
    /// Shards in `dir` numbered from `first`.
    pub fn new(dir: &'a Path, shard_tokens: Option<u64>, first: usize) -> Self {
        Shards {
            dir,
            shard_tokens,
            next_index: first,
            current: None,
            written: Written::default(),
        }
    }

    /// Appends one document's tokens.
    pub fn push(&mut self, ids: &[u32]) -> Result<()> {
        let path = shard_path(self.dir, self.next_index);
        if self.current.is_none() {
            let file = File::create(&path).map_err(|source| Error::Io {
                path: path.clone(),
                source,
            })?;
            self.current = Some((BufWriter::new(file), 0));
            self.written.shards.push(path);
            self.next_index += 1;
        }
        let (out, count) = self.current.as_mut().expect("opened above");
        let bytes: Vec<u8> = ids
            .iter()
            .flat_map(|&id| (id as u16).to_le_bytes())
            .collect();
        out.write_all(&bytes).map_err(Error::Output)?;
        *count += ids.len() as u64;
        let full = self.shard_tokens.is_some_and(|n| *count >= n);
        self.written.documents += 1;
        self.written.tokens += ids.len() as u64;
        if full {
            self.close()?;
        }
        Ok(())
    }

    /// Flushes the open shard, if any.
    fn close(&mut self) -> Result<()> {
        if let Some((mut out, _)) = self.current.take() {
            out.flush().map_err(Error::Output)?;
        }
        Ok(())
    }

    /// Closes the last shard; what was written, and the next shard index.
    pub fn finish(mut self) -> Result<(Written, usize)> {
        self.close()?;
        Ok((self.written, self.next_index))
    }
}

/// Encodes every document of `path` into shards of `dir` numbered from
/// `first`, calling `progress` with the bytes of the file read so far.
/// Returns what was written and the next free shard index.
pub fn pretokenize_file(
    tokenizer: &Tokenizer,
    path: &Path,
    dir: &Path,
    shard_tokens: Option<u64>,
    first: usize,
    progress: &dyn Fn(u64),
) -> Result<(Written, usize)> {
    check_tokenizer(tokenizer)?;
    let mut documents = Documents::open(path)?;
    let mut shards = Shards::new(dir, shard_tokens, first);
    loop {
        let batch: Vec<String> = documents.by_ref().take(BATCH).collect::<Result<_>>()?;
        if batch.is_empty() {
            break;
        }
        let encoded: Vec<Vec<u32>> = batch
            .par_iter()
            .map(|doc| tokenizer.encode_text(doc, true, false))
            .collect::<Result<_>>()?;
        for ids in &encoded {
            shards.push(ids)?;
        }
        progress(documents.bytes_read());
    }
    shards.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_split_after_the_document_that_fills_them() {
        let dir = std::env::temp_dir().join(format!("llama2-shards-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut shards = Shards::new(&dir, Some(3), 4);
        for doc in [&[1, 5][..], &[1, 6, 7], &[1, 65535]] {
            shards.push(doc).unwrap();
        }
        let (written, next) = shards.finish().unwrap();
        assert_eq!((written.documents, written.tokens, next), (3, 7, 6));
        let read = |i| std::fs::read(shard_path(&dir, i)).unwrap();
        assert_eq!(read(4), [1, 0, 5, 0, 1, 0, 6, 0, 7, 0]);
        assert_eq!(read(5), [1, 0, 255, 255]);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
