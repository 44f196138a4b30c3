//! Pretokenized training data as llama2.c's tinystories.py writes it and
//! train.py's `PretokDataset` reads it: a directory of `*.bin` shards, each
//! little-endian uint16 token ids (every document's tokens with BOS
//! prepended, concatenated). Split as tinystories.py does: the first shard
//! by name is validation, the rest training; a lone shard gives its last
//! 10% to validation. Batches are random windows of `T + 1` tokens (inputs
//! the first `T`, targets the next `T`) drawn with our seeded generator.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::model::Batch;
use crate::rng::Rng;

/// One split: its shards' tokens, each shard kept whole so windows never
/// cross a shard boundary (as train.py's).
#[derive(Clone, Debug)]
pub struct Split {
    shards: Vec<Vec<u16>>,
}

/// Which split to draw from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SplitName {
    Train,
    Val,
}

/// The training and validation tokens of a data directory.
#[derive(Clone, Debug)]
pub struct TokenData {
    pub train: Split,
    pub val: Split,
}

impl Split {
    /// Tokens in the split.
    pub fn tokens(&self) -> usize {
        self.shards.iter().map(Vec::len).sum()
    }

    /// A `[batch][seq_len]` batch of windows, each uniform over every start
    /// position of every shard (so shards weigh by their length).
    pub fn batch(
        &self,
        rng: &mut Rng,
        batch: usize,
        seq_len: usize,
        config: &llama2::Config,
    ) -> Result<Batch> {
        let starts: Vec<u64> = self
            .shards
            .iter()
            .map(|s| (s.len() - seq_len) as u64)
            .collect();
        let total: u64 = starts.iter().sum();
        let (mut inputs, mut targets) = (Vec::new(), Vec::new());
        for _ in 0..batch {
            let mut at = rng.below(total);
            let shard = starts
                .iter()
                .position(|&n| {
                    let here = at < n;
                    if !here {
                        at -= n;
                    }
                    here
                })
                .expect("at < total");
            let w = &self.shards[shard][at as usize..at as usize + seq_len + 1];
            inputs.extend(w[..seq_len].iter().map(|&t| t as i32));
            targets.extend(w[1..].iter().map(|&t| t as i32));
        }
        Batch::new(batch, seq_len, &inputs, &targets, config)
    }
}

impl TokenData {
    /// Reads every `*.bin` shard of `dir`, checking each id against
    /// `vocab_size` and each shard against one window of `seq_len + 1`.
    pub fn load(dir: &Path, vocab_size: usize, seq_len: usize) -> Result<TokenData> {
        let paths = shard_paths(dir)?;
        let mut shards = paths
            .iter()
            .map(|p| read_shard(p, vocab_size))
            .collect::<Result<Vec<_>>>()?;
        let (train, val) = if shards.len() == 1 {
            // One shard: its last 10% validates, so both splits exist.
            let all = shards.pop().expect("one shard");
            let cut = all.len() - all.len() / 10;
            (vec![all[..cut].to_vec()], vec![all[cut..].to_vec()])
        } else {
            let val = shards.remove(0);
            (shards, vec![val])
        };
        let data = TokenData {
            train: Split { shards: train },
            val: Split { shards: val },
        };
        for (name, split) in [("training", &data.train), ("validation", &data.val)] {
            if let Some(s) = split.shards.iter().find(|s| s.len() <= seq_len) {
                return Err(Error::Invalid(format!(
                    "{}: a {name} shard (or part of the only shard) has {} tokens, fewer than \
                     one window of max_seq_len + 1 = {}",
                    dir.display(),
                    s.len(),
                    seq_len + 1
                )));
            }
        }
        Ok(data)
    }

    pub fn split(&self, name: SplitName) -> &Split {
        match name {
            SplitName::Train => &self.train,
            SplitName::Val => &self.val,
        }
    }
}

/// The `*.bin` files of `dir`, sorted by name.
fn shard_paths(dir: &Path) -> Result<Vec<PathBuf>> {
    let entries = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    let mut paths = Vec::new();
    for entry in entries {
        let path = entry.map_err(|e| Error::io(dir, e))?.path();
        if path.is_file() && path.extension().is_some_and(|x| x == "bin") {
            paths.push(path);
        }
    }
    paths.sort();
    if paths.is_empty() {
        return Err(Error::folder(
            dir,
            "no *.bin token shards (little-endian uint16 ids, as tinystories.py pretokenize writes)",
        ));
    }
    Ok(paths)
}

/// One shard's ids, each checked to be below `vocab_size`.
fn read_shard(path: &Path, vocab_size: usize) -> Result<Vec<u16>> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    if bytes.len() % 2 != 0 {
        return Err(Error::folder(
            path,
            format!("{} bytes is not a whole number of uint16 ids", bytes.len()),
        ));
    }
    let ids: Vec<u16> = bytes
        .chunks_exact(2)
        .map(|b| u16::from_le_bytes([b[0], b[1]]))
        .collect();
    if let Some((i, &id)) = ids
        .iter()
        .enumerate()
        .find(|(_, &id)| id as usize >= vocab_size)
    {
        return Err(Error::folder(
            path,
            format!("token {i} is id {id}, outside the vocabulary 0..{vocab_size} (--vocab-size)"),
        ));
    }
    Ok(ids)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, ids: &[u16]) {
        let bytes: Vec<u8> = ids.iter().flat_map(|i| i.to_le_bytes()).collect();
        std::fs::write(dir.join(name), bytes).unwrap();
    }

    fn tmp(name: &str) -> PathBuf {
        let d =
            std::env::temp_dir().join(format!("llama2-train-data-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn splits_and_windows() {
        let d = tmp("split");
        write(
            &d,
            "data01.bin",
            &(0..40).map(|i| i % 8).collect::<Vec<_>>(),
        );
        write(&d, "data00.bin", &[1u16; 20]);
        let data = TokenData::load(&d, 8, 4).unwrap();
        assert_eq!(data.val.tokens(), 20);
        assert_eq!(data.train.tokens(), 40);
        let config = llama2::Config::from_header(8, 8, 1, 1, 1, 8, 4, true).unwrap();
        let b = data.train.batch(&mut Rng::new(3), 5, 4, &config).unwrap();
        for r in 0..5 {
            for t in 0..4 {
                // The pattern counts up mod 8, so each target follows its input.
                assert_eq!(b.targets[r * 4 + t] as u32, (b.inputs[r * 4 + t] + 1) % 8);
            }
        }
        let one = tmp("one");
        write(&one, "only.bin", &[2u16; 100]);
        let data = TokenData::load(&one, 8, 4).unwrap();
        assert_eq!((data.train.tokens(), data.val.tokens()), (90, 10));
    }

    #[test]
    fn clear_errors() {
        let d = tmp("errors");
        let msg = |r: Result<TokenData>| r.unwrap_err().to_string();
        assert!(msg(TokenData::load(&d, 8, 4)).contains("no *.bin"));
        write(&d, "a.bin", &[1, 2, 9, 1, 1, 1, 1, 1]);
        assert!(msg(TokenData::load(&d, 8, 4)).contains("token 2 is id 9"));
        write(&d, "a.bin", &[1; 30]);
        write(&d, "b.bin", &[1; 3]);
        assert!(msg(TokenData::load(&d, 8, 4)).contains("fewer than one window"));
        assert!(msg(TokenData::load(&d.join("missing"), 8, 4)).contains("missing"));
    }
}
