//! The BPE tokenizer of llama2.c's `tokenizer.bin`: encoding and decoding
//! exactly as `run.c` does, and `Utf8Stream`, which turns decoded pieces into
//! output bytes without ever splitting a UTF-8 character (llama2.c drops the
//! bytes of characters spelled with byte-fallback tokens; we keep them).

use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap};
use std::path::Path;

use crate::config::Config;
use crate::error::{Error, Result};

/// Token id of `<unk>`.
pub const UNK: u32 = 0;
/// Token id of beginning-of-sequence.
pub const BOS: u32 = 1;
/// Token id of end-of-sequence.
pub const EOS: u32 = 2;
/// Id of the byte-fallback token `<0x00>`; byte `b` is `BYTE_FALLBACK + b`.
const BYTE_FALLBACK: u32 = 3;
/// Longest token string accepted, in bytes. Real vocabularies stay under
/// 256; a length beyond this is a corrupt file, not a token.
const MAX_PIECE_BYTES: usize = 1 << 16;
/// Largest tokenizer file read. A 128k-token vocabulary takes about 2 MB.
const MAX_FILE_BYTES: u64 = 1 << 28;

/// A vocabulary of byte strings with merge scores, and how text is split
/// into them: run.c's BPE, or Hugging Face's library for a tokenizer.json.
#[derive(Clone, Debug)]
pub struct Tokenizer {
    /// Token strings, indexed by id.
    vocab: Vec<Vec<u8>>,
    /// Merge scores, indexed by id.
    scores: Vec<f32>,
    /// String to id; on duplicates the lowest id wins.
    lookup: HashMap<Vec<u8>, u32>,
    /// The header's longest-token length (at least the real longest).
    max_token_length: u32,
    /// The real longest token, in bytes: what merge buffers are sized by.
    longest_piece: usize,
    /// tokenizer.json's encoder when the vocabulary came from one; `None`:
    /// run.c's BPE over `lookup` and `scores`.
    hf: Option<Box<tokenizers::Tokenizer>>,
    /// Whether the leading space of a piece right after BOS is dropped
    /// (SentencePiece's dummy prefix; not byte-level BPE).
    strip_space_after_bos: bool,
    /// The ids `encode` adds for BOS and EOS.
    bos: u32,
    eos: u32,
}

impl Tokenizer {
    /// Reads `path`, which must hold exactly `vocab_size` entries.
    pub fn load(path: &Path, vocab_size: usize) -> Result<Self> {
        let bytes = read_file(path)?;
        Self::parse(&bytes, vocab_size).map_err(|reason| Error::tokenizer(path, reason))
    }

    /// Reads every entry of `path`, for when no model says how many there are.
    pub fn load_all(path: &Path) -> Result<Self> {
        let bytes = read_file(path)?;
        Self::parse_all(&bytes).map_err(|reason| Error::tokenizer(path, reason))
    }

    /// A tokenizer of `pieces` with `scores`, written as llama2.c's
    /// tokenizer.py writes a SentencePiece vocabulary: "▁" becomes a space,
    /// and the BOS and EOS pieces (ids `bos`, `eos`) become "\n<s>\n" and
    /// "\n</s>\n". For vocabularies read from other files (GGUF).
    pub fn from_sentencepiece_pieces(
        pieces: &[Vec<u8>],
        scores: &[f32],
        bos: u32,
        eos: u32,
    ) -> std::result::Result<Self, String> {
        if pieces.len() != scores.len() {
            return Err(format!(
                "{} pieces but {} scores",
                pieces.len(),
                scores.len()
            ));
        }
        let written: Vec<Vec<u8>> = pieces
            .iter()
            .enumerate()
            .map(|(id, p)| match id as u32 {
                id if id == bos => b"\n<s>\n".to_vec(),
                id if id == eos => b"\n</s>\n".to_vec(),
                _ => replace_spm_space(p),
            })
            .collect();
        let longest = written.iter().map(Vec::len).max().unwrap_or(1).max(1);
        let entries = written
            .iter()
            .map(Vec::as_slice)
            .zip(scores.iter().copied());
        Self::parse(&bin_bytes(longest as u32, entries), pieces.len())
    }

    /// Parses tokenizer.bin bytes, however many entries they hold.
    pub fn parse_all(bytes: &[u8]) -> std::result::Result<Self, String> {
        Self::parse(bytes, count_entries(bytes)?)
    }

    /// Parses tokenizer.bin bytes holding exactly `vocab_size` entries.
    /// Every size read from the bytes is checked before it is used, so no
    /// input makes this allocate more than a small multiple of its length.
    pub fn parse(bytes: &[u8], vocab_size: usize) -> std::result::Result<Self, String> {
        if vocab_size < 3 {
            return Err(format!(
                "a vocabulary of {vocab_size} tokens leaves no room for <unk>, <s> and </s>"
            ));
        }
        // Each entry takes at least 8 bytes (score and length).
        let room = bytes.len().saturating_sub(4) / 8;
        if vocab_size > room {
            return Err(format!(
                "the file is {} bytes, too short for the model's {vocab_size} tokens (each \
                 takes at least 8): is it truncated, or not the tokenizer of this model?",
                bytes.len()
            ));
        }
        let mut at = 0usize;
        let mut take = |n: usize, what: &str, i: usize| -> std::result::Result<&[u8], String> {
            let end = at.checked_add(n).filter(|&e| e <= bytes.len()).ok_or_else(|| {
                format!(
                    "the file ends inside {what} of entry {i}, but the model has {vocab_size} tokens: \
                     is this the tokenizer that belongs to the model?"
                )
            })?;
            let s = &bytes[at..end];
            at = end;
            Ok(s)
        };
        let max_token_length = i32::from_le_bytes(take(4, "the header", 0)?.try_into().unwrap());
        if !(1..=MAX_PIECE_BYTES as i32).contains(&max_token_length) {
            return Err(format!(
                "the header gives the longest token as {max_token_length} bytes; expected 1 to \
                 {MAX_PIECE_BYTES}: the file is corrupt or not a tokenizer.bin"
            ));
        }
        let mut vocab = Vec::with_capacity(vocab_size);
        let mut scores = Vec::with_capacity(vocab_size);
        for i in 0..vocab_size {
            let score = f32::from_le_bytes(take(4, "the score", i)?.try_into().unwrap());
            let len = i32::from_le_bytes(take(4, "the length", i)?.try_into().unwrap());
            if !(0..=max_token_length).contains(&len) {
                return Err(format!(
                    "entry {i} is {len} bytes long but the header says no token is longer than \
                     {max_token_length}; the file is corrupt"
                ));
            }
            vocab.push(take(len as usize, "the text", i)?.to_vec());
            scores.push(score);
        }
        if at != bytes.len() {
            return Err(format!(
                "it has {} bytes left after the model's {vocab_size} tokens, so it holds a larger \
                 vocabulary: pass the tokenizer the model was trained with (-z)",
                bytes.len() - at
            ));
        }
        let mut lookup = HashMap::with_capacity(vocab_size);
        for (id, s) in vocab.iter().enumerate() {
            lookup.entry(s.clone()).or_insert(id as u32);
        }
        let longest_piece = vocab.iter().map(Vec::len).max().unwrap_or(0);
        Ok(Tokenizer {
            vocab,
            scores,
            lookup,
            max_token_length: max_token_length as u32,
            longest_piece,
            hf: None,
            strip_space_after_bos: true,
            bos: BOS,
            eos: EOS,
        })
    }

    /// The tokenizer.json at `path`, for a model of `vocab_size` tokens
    /// (a tokenizer may have fewer: vocabularies are often padded) whose
    /// BOS and EOS are `bos` and `eos`.
    pub fn load_json(path: &Path, vocab_size: usize, bos: u32, eos: u32) -> Result<Self> {
        Self::from_json_vocabulary(path, crate::hf_tokenizer::load(path)?, vocab_size, bos, eos)
    }

    /// `load_json` for the tokenizer.json at `path` already read as `v`.
    fn from_json_vocabulary(
        path: &Path,
        v: crate::hf_tokenizer::HfVocabulary,
        vocab_size: usize,
        bos: u32,
        eos: u32,
    ) -> Result<Self> {
        if v.pieces.len() > vocab_size {
            return Err(Error::tokenizer(
                path,
                format!(
                    "it has {} tokens but the model only {vocab_size}: pass the tokenizer the \
                     model was trained with (-z)",
                    v.pieces.len()
                ),
            ));
        }
        let mut vocab = v.pieces;
        vocab.resize(vocab_size, Vec::new());
        let longest_piece = vocab.iter().map(Vec::len).max().unwrap_or(0);
        Ok(Tokenizer {
            scores: vec![0.0; vocab.len()],
            vocab,
            lookup: HashMap::new(),
            max_token_length: longest_piece as u32,
            longest_piece,
            hf: Some(Box::new(v.encoder)),
            strip_space_after_bos: v.strip_space_after_bos,
            bos,
            eos,
        })
    }

    /// This vocabulary as tokenizer.bin bytes (what `llama2 export` writes
    /// beside a model whose tokenizer has no other file form).
    pub fn to_bin_bytes(&self) -> Vec<u8> {
        let entries = self
            .vocab
            .iter()
            .map(Vec::as_slice)
            .zip(self.scores.iter().copied());
        bin_bytes(self.max_token_length.max(1), entries)
    }

    pub fn vocab_size(&self) -> usize {
        self.vocab.len()
    }

    /// The longest token in bytes, as stored in the file header.
    pub fn max_token_length(&self) -> u32 {
        self.max_token_length
    }

    /// The merge score of token `id` (0 outside the vocabulary).
    pub fn score(&self, id: u32) -> f32 {
        self.scores.get(id as usize).copied().unwrap_or(0.0)
    }

    /// Whether this tokenizer came from a tokenizer.json (encoded by the
    /// tokenizers library) rather than a SentencePiece vocabulary.
    pub fn is_hugging_face(&self) -> bool {
        self.hf.is_some()
    }

    /// The BOS and EOS ids `encode` adds.
    pub fn bos_eos(&self) -> (u32, u32) {
        (self.bos, self.eos)
    }

    /// The longest token string in bytes, as measured.
    pub fn longest_piece(&self) -> usize {
        self.longest_piece
    }

    /// The raw string of token `id`; empty for an id outside the vocabulary.
    pub fn piece(&self, id: u32) -> &[u8] {
        self.vocab.get(id as usize).map_or(&[], Vec::as_slice)
    }

    /// Encodes `text` as run.c does: optional BOS, the dummy-prefix space
    /// when the text is not empty, one token per UTF-8 character (byte
    /// fallback when there is none), greedy merges of the best-scoring
    /// adjacent pair, optional EOS.
    pub fn encode(&self, text: &str, bos: bool, eos: bool) -> Vec<u32> {
        self.encode_bytes(text.as_bytes(), bos, eos)
    }

    /// `encode` for any tokenizer: a tokenizer.json's encoder can fail on
    /// some texts (its regexes have backtracking limits), which is an error
    /// here rather than a wrong encoding.
    pub fn encode_text(&self, text: &str, bos: bool, eos: bool) -> Result<Vec<u32>> {
        let Some(hf) = &self.hf else {
            return Ok(self.encode(text, bos, eos));
        };
        let encoding = hf
            .encode(text, false)
            .map_err(|e| Error::Invalid(format!("cannot tokenize the text: {e}")))?;
        let mut ids = Vec::with_capacity(encoding.len() + 2);
        if bos {
            ids.push(self.bos);
        }
        ids.extend_from_slice(encoding.get_ids());
        if eos {
            ids.push(self.eos);
        }
        Ok(ids)
    }

    /// `encode` over raw bytes (invalid UTF-8 is handled as run.c does). A
    /// tokenizer.json tokenizer encodes the text with invalid bytes replaced,
    /// and an empty encoding where its library fails (see `encode_text`).
    pub fn encode_bytes(&self, text: &[u8], bos: bool, eos: bool) -> Vec<u32> {
        if self.hf.is_some() {
            let text = String::from_utf8_lossy(text);
            return self.encode_text(&text, bos, eos).unwrap_or_default();
        }
        let mut pieces = Vec::with_capacity(text.len() + 1);
        if !text.is_empty() {
            if let Some(&space) = self.lookup.get(&b" "[..]) {
                pieces.push(space);
            }
        }
        self.push_characters(text, &mut pieces);
        self.merge_pairs(&mut pieces);
        let mut tokens = Vec::with_capacity(pieces.len() + 2);
        if bos {
            tokens.push(self.bos);
        }
        tokens.extend(pieces);
        if eos {
            tokens.push(self.eos);
        }
        tokens
    }

    /// Splits `text` into code points of at most 4 bytes (a lead byte and its
    /// continuation bytes, like run.c) and pushes one token per code point.
    fn push_characters(&self, text: &[u8], tokens: &mut Vec<u32>) {
        let mut start = 0;
        while start < text.len() {
            let mut end = start + 1;
            while end < text.len() && text[end] & 0xC0 == 0x80 && end - start < 4 {
                end += 1;
            }
            let ch = &text[start..end];
            match self.lookup.get(ch) {
                Some(&id) => tokens.push(id),
                None => tokens.extend(ch.iter().map(|&b| self.byte_token(b))),
            }
            start = end;
        }
    }

    /// The byte-fallback token of `b`, or `<unk>` in a vocabulary too small
    /// to have byte tokens (run.c would index past its table there).
    fn byte_token(&self, b: u8) -> u32 {
        let id = b as u32 + BYTE_FALLBACK;
        if (id as usize) < self.vocab.len() {
            id
        } else {
            UNK
        }
    }

    /// Repeatedly merges the adjacent pair whose concatenation is the token
    /// with the strictly highest score (leftmost on ties) until none merges.
    /// run.c rescans every pair after each merge, which is quadratic; this
    /// keeps candidate pairs in a heap ordered by (score, leftmost) over a
    /// linked list of live tokens, and merges in exactly the same order.
    fn merge_pairs(&self, tokens: &mut Vec<u32>) {
        let n = tokens.len();
        let mut next: Vec<usize> = (1..=n).collect(); // n marks the end
        let mut prev: Vec<usize> = (0..n).map(|i| i.wrapping_sub(1)).collect();
        let mut heap = BinaryHeap::new();
        let mut buf = Vec::with_capacity(2 * self.longest_piece);
        for i in 0..n.saturating_sub(1) {
            self.push_candidate(&mut heap, &mut buf, tokens, i, i + 1);
        }
        let mut alive = vec![true; n];
        while let Some(c) = heap.pop() {
            let (l, r) = (c.left, c.right);
            let stale = !alive[l]
                || !alive[r]
                || next[l] != r
                || tokens[l] != c.left_id
                || tokens[r] != c.right_id;
            if stale {
                continue;
            }
            tokens[l] = c.merged;
            alive[r] = false;
            next[l] = next[r];
            if next[r] < n {
                prev[next[r]] = l;
            }
            if prev[l] < n {
                self.push_candidate(&mut heap, &mut buf, tokens, prev[l], l);
            }
            if next[l] < n {
                self.push_candidate(&mut heap, &mut buf, tokens, l, next[l]);
            }
        }
        let mut i = 0;
        tokens.retain(|_| {
            i += 1;
            alive[i - 1]
        });
    }

    /// Queues the pair at positions `l`, `r` if it forms a mergeable token.
    fn push_candidate(
        &self,
        heap: &mut BinaryHeap<Candidate>,
        buf: &mut Vec<u8>,
        tokens: &[u32],
        l: usize,
        r: usize,
    ) {
        buf.clear();
        buf.extend_from_slice(self.piece(tokens[l]));
        buf.extend_from_slice(self.piece(tokens[r]));
        if let Some(&id) = self.lookup.get(buf.as_slice()) {
            let score = self.scores[id as usize];
            // run.c starts its search from -1e10, so pairs scoring lower never merge.
            if score > -1e10 {
                heap.push(Candidate {
                    score,
                    left: l,
                    right: r,
                    left_id: tokens[l],
                    right_id: tokens[r],
                    merged: id,
                });
            }
        }
    }

    /// The bytes token `token` stands for after `prev`: its string, without
    /// the leading space right after BOS, and `<0xXX>` turned into that byte.
    pub fn decode(&self, prev: u32, token: u32) -> &[u8] {
        let mut piece = self.piece(token);
        if !self.strip_space_after_bos {
            return piece;
        }
        if prev == self.bos && piece.first() == Some(&b' ') {
            piece = &piece[1..];
        }
        if let Some(b) = parse_byte_token(piece) {
            return &BYTE_VALUES[b as usize..b as usize + 1];
        }
        piece
    }
}

/// The tokenizer of the model at `model` with `vocab_size` tokens: the file
/// `explicit` (`-z`) when given, read according to its kind (`.model`:
/// SentencePiece, `.json`: Hugging Face, `.gguf`: the vocabulary inside,
/// anything else: tokenizer.bin); else the vocabulary inside a GGUF model,
/// `tokenizer.model`, `tokenizer.json` or `tokenizer.bin` in a model
/// directory, or `tokenizer.bin` / `tokenizer.model` beside a model file,
/// then `./tokenizer.bin` (run.c's default).
pub fn find(explicit: Option<&Path>, model: &Path, config: &Config) -> Result<Tokenizer> {
    if let Some(path) = explicit {
        return load_by_kind(path, config);
    }
    if model.is_file() && crate::checkpoint::gguf::is_gguf(model) {
        return load_by_kind(model, config);
    }
    // A model directory's own tokenizer first; beside a llama2.c file,
    // run.c's tokenizer.bin first.
    let candidates: Vec<std::path::PathBuf> = if model.is_dir() {
        let names = ["tokenizer.model", "tokenizer.json", "tokenizer.bin"];
        names.iter().map(|n| model.join(n)).collect()
    } else {
        let beside = model.parent().unwrap_or(Path::new("."));
        let names = ["tokenizer.bin", "tokenizer.model"];
        let mut c: Vec<_> = names.iter().map(|n| beside.join(n)).collect();
        c.push("tokenizer.bin".into());
        c
    };
    for candidate in &candidates {
        if candidate.is_file() {
            return load_by_kind(candidate, config);
        }
    }
    let tried: Vec<String> = candidates.iter().map(|c| c.display().to_string()).collect();
    Err(Error::Invalid(format!(
        "no tokenizer given and none found at {}: pass one with -z",
        tried.join(", ")
    )))
}

/// The tokenizer at `path` on its own, without a model (`llama2
/// tokenize`): read by its kind, with `vocab_size` entries when given, else
/// all of them. A tokenizer.json's BOS and EOS come from the
/// tokenizer_config.json beside it, else from the usual special tokens.
pub fn open(path: &Path, vocab_size: Option<usize>) -> Result<Tokenizer> {
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
    match (ext, vocab_size) {
        ("json", _) => {
            let v = crate::hf_tokenizer::load(path)?;
            let (bos, eos) = crate::hf_tokenizer::special_ids(path, &v.encoder);
            let vocab_size = vocab_size.unwrap_or(v.pieces.len());
            Tokenizer::from_json_vocabulary(path, v, vocab_size, bos, eos)
        }
        ("model" | "gguf", _) => {
            let mut config = Config::llama2c(0, 0, 0, 0, 0, 0, 0, true);
            config.vocab_size = match vocab_size {
                Some(n) => n,
                None => count_by_kind(path)?,
            };
            load_by_kind(path, &config)
        }
        (_, Some(n)) => Tokenizer::load(path, n),
        (_, None) => Tokenizer::load_all(path),
    }
}

/// How many tokens a SentencePiece model or a GGUF vocabulary holds.
fn count_by_kind(path: &Path) -> Result<usize> {
    if crate::checkpoint::gguf::is_gguf(path) {
        return Ok(crate::checkpoint::gguf::open(path)?
            .vocabulary()?
            .pieces
            .len());
    }
    Ok(crate::sentencepiece::SentencePieceModel::load(path)?
        .pieces
        .len())
}

/// Reads the tokenizer at `path` according to its kind.
fn load_by_kind(path: &Path, config: &Config) -> Result<Tokenizer> {
    let vocab_size = config.vocab_size;
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
    match ext {
        "model" => {
            let spm = crate::sentencepiece::SentencePieceModel::load(path)?;
            Tokenizer::parse(&spm.to_tokenizer_bin(), vocab_size)
                .map_err(|reason| Error::tokenizer(path, reason))
        }
        "gguf" => {
            let v = crate::checkpoint::gguf::open(path)?.vocabulary()?;
            if v.model != "llama" {
                return Err(Error::tokenizer(
                    path,
                    format!(
                        "its tokenizer is of kind {:?}; only SentencePiece (\"llama\") \
                         vocabularies are supported in GGUF files yet",
                        v.model
                    ),
                ));
            }
            let tok = Tokenizer::from_sentencepiece_pieces(
                &v.pieces,
                &v.scores,
                v.bos.unwrap_or(BOS),
                v.eos.unwrap_or(EOS),
            )
            .map_err(|reason| Error::tokenizer(path, reason))?;
            if tok.vocab_size() != vocab_size {
                return Err(Error::tokenizer(
                    path,
                    format!(
                        "it has {} tokens but the model has {vocab_size}",
                        tok.vocab_size()
                    ),
                ));
            }
            Ok(tok)
        }
        "json" => {
            let eos = config.eos.as_slice().first().copied().unwrap_or(EOS);
            Tokenizer::load_json(path, vocab_size, config.bos, eos)
        }
        _ => Tokenizer::load(path, vocab_size),
    }
}

/// A mergeable adjacent pair. The heap pops the highest score first, and
/// among equal scores the leftmost pair, as run.c's scan picks it.
struct Candidate {
    score: f32,
    left: usize,
    right: usize,
    /// Token ids when queued; a pair whose tokens changed since is stale.
    left_id: u32,
    right_id: u32,
    merged: u32,
}

impl Ord for Candidate {
    fn cmp(&self, other: &Self) -> Ordering {
        self.score
            .total_cmp(&other.score)
            .then(other.left.cmp(&self.left))
    }
}

impl PartialOrd for Candidate {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl PartialEq for Candidate {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for Candidate {}

/// The bytes of the tokenizer file at `path` (a regular file of bounded size).
fn read_file(path: &Path) -> Result<Vec<u8>> {
    crate::files::read_bounded(path, "tokenizer", MAX_FILE_BYTES)
}

/// Number of whole entries in tokenizer.bin bytes.
fn count_entries(bytes: &[u8]) -> std::result::Result<usize, String> {
    let mut at = 4usize;
    let mut count = 0;
    while at < bytes.len() {
        let len_at = at + 4;
        let len = bytes
            .get(len_at..len_at + 4)
            .map(|b| i32::from_le_bytes(b.try_into().unwrap()))
            .ok_or("the file ends inside an entry")?;
        if !(0..=MAX_PIECE_BYTES as i32).contains(&len) {
            return Err(format!(
                "entry {count} has length {len}; the file is corrupt"
            ));
        }
        at = len_at + 4 + len as usize;
        count += 1;
    }
    if at != bytes.len() || count < 3 {
        return Err("the file ends inside an entry or holds fewer than 3 tokens".into());
    }
    Ok(count)
}

/// tokenizer.bin bytes: the header's longest-token length, then each entry
/// as its score, its length and its bytes. The one writer of the format.
pub fn bin_bytes<'a>(
    max_token_length: u32,
    entries: impl Iterator<Item = (&'a [u8], f32)>,
) -> Vec<u8> {
    let mut bytes = max_token_length.to_le_bytes().to_vec();
    for (piece, score) in entries {
        bytes.extend(score.to_le_bytes());
        bytes.extend((piece.len() as i32).to_le_bytes());
        bytes.extend_from_slice(piece);
    }
    bytes
}

/// `piece` with SentencePiece's "▁" (U+2581) turned into a space.
fn replace_spm_space(piece: &[u8]) -> Vec<u8> {
    const SPM_SPACE: &[u8] = "\u{2581}".as_bytes();
    let mut out = Vec::with_capacity(piece.len());
    let mut rest = piece;
    while !rest.is_empty() {
        if rest.starts_with(SPM_SPACE) {
            out.push(b' ');
            rest = &rest[SPM_SPACE.len()..];
        } else {
            out.push(rest[0]);
            rest = &rest[1..];
        }
    }
    out
}

/// Every byte value, so a byte token can be returned as a slice.
static BYTE_VALUES: [u8; 256] = {
    let mut t = [0u8; 256];
    let mut i = 0;
    while i < 256 {
        t[i] = i as u8;
        i += 1;
    }
    t
};

/// The byte of a `<0xXX>` piece, read like run.c's `sscanf("<0x%02hhX>")`.
fn parse_byte_token(piece: &[u8]) -> Option<u8> {
    let hex = piece.strip_prefix(b"<0x")?;
    let digits = hex
        .iter()
        .take(2)
        .take_while(|c| c.is_ascii_hexdigit())
        .count();
    if digits == 0 {
        return None;
    }
    let s = std::str::from_utf8(&hex[..digits]).ok()?;
    u8::from_str_radix(s, 16).ok()
}

/// What happens to single-byte pieces beyond ASCII (byte-fallback tokens
/// such as `<0xE6>`) when they are printed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Printing {
    /// Collected into whole UTF-8 characters, so a character the tokenizer
    /// spells in bytes (emoji, rare CJK) is printed.
    #[default]
    Characters,
    /// Dropped, as llama2.c's `safe_printf` drops every single byte that is
    /// not printable ASCII or whitespace: run.c's text exactly.
    Llama2c,
}

/// Turns decoded pieces into bytes safe to print, always valid UTF-8:
/// single-byte pieces are printed when they are printable ASCII or
/// whitespace (as llama2.c does), collected into whole UTF-8 characters when
/// they are part of one (unless `Printing::Llama2c`), and dropped otherwise;
/// longer pieces pass through when they are valid UTF-8, and otherwise go
/// through the same collector byte by byte (a tokenizer may split a
/// character across pieces, or hold bytes that are no UTF-8 at all), which
/// drops whatever is not part of a whole character.
#[derive(Default, Debug)]
pub struct Utf8Stream {
    pending: Vec<u8>,
    /// Bytes the pending character needs in all.
    need: usize,
    printing: Printing,
}

impl Utf8Stream {
    pub fn new() -> Self {
        Self::default()
    }

    /// A stream treating byte pieces as `printing` says.
    pub fn printing(printing: Printing) -> Self {
        Utf8Stream {
            printing,
            ..Self::default()
        }
    }

    /// Appends the printable form of `piece` to `out`.
    pub fn push(&mut self, piece: &[u8], out: &mut Vec<u8>) {
        match piece {
            [] => {}
            [b] if self.printing == Printing::Llama2c => {
                self.pending.clear();
                if b.is_ascii_graphic() || is_c_space(*b) {
                    out.push(*b);
                }
            }
            [b] => self.push_byte(*b, true, out),
            _ if self.pending.is_empty() && std::str::from_utf8(piece).is_ok() => {
                out.extend_from_slice(piece)
            }
            _ => {
                for &b in piece {
                    self.push_byte(b, false, out);
                }
            }
        }
    }

    /// Feeds one byte. `alone`: the byte is a whole piece, so ASCII control
    /// characters other than whitespace are dropped, as llama2.c does.
    fn push_byte(&mut self, b: u8, alone: bool, out: &mut Vec<u8>) {
        if b & 0xC0 == 0x80 && !self.pending.is_empty() {
            self.pending.push(b);
            if self.pending.len() == self.need {
                if std::str::from_utf8(&self.pending).is_ok() {
                    out.extend_from_slice(&self.pending);
                }
                self.pending.clear();
            }
            return;
        }
        self.pending.clear();
        let width = match b {
            0xC2..=0xDF => 2,
            0xE0..=0xEF => 3,
            0xF0..=0xF4 => 4,
            _ => 0,
        };
        if width > 0 {
            self.pending.push(b);
            self.need = width;
        } else if b.is_ascii() && (!alone || b.is_ascii_graphic() || is_c_space(b)) {
            out.push(b);
        }
    }
}

/// C's `isspace` in the "C" locale.
fn is_c_space(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | 0x0B | 0x0C | b'\r')
}

#[cfg(test)]
mod tests {
    use super::*;

    /// run.c's merge loop, verbatim in spirit: rescan all pairs per merge.
    fn merge_reference(t: &Tokenizer, tokens: &mut Vec<u32>) {
        loop {
            let mut best: Option<(f32, usize, u32)> = None;
            for i in 0..tokens.len().saturating_sub(1) {
                let mut pair = t.piece(tokens[i]).to_vec();
                pair.extend_from_slice(t.piece(tokens[i + 1]));
                if let Some(&id) = t.lookup.get(&pair) {
                    let score = t.scores[id as usize];
                    if score > best.map_or(-1e10, |(s, _, _)| s) {
                        best = Some((score, i, id));
                    }
                }
            }
            let Some((_, i, id)) = best else { break };
            tokens[i] = id;
            tokens.remove(i + 1);
        }
    }

    fn models() -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/models")
    }

    #[test]
    fn heap_merge_matches_rescanning_merge() {
        let cases = [("tok512.bin", 512), ("tokenizer.bin", 32000)];
        let texts = [
            "Once upon a time, there was a little girl named Lily.",
            "aaaaaaaaaaaaaaaaaaaaaaaa   bbbb  aaaa",
            "Ünïcödé 🦙 and 日本語 text\n\twith tabs",
            "the the the the the the the the the",
            "",
        ];
        for (file, vocab) in cases {
            let t = Tokenizer::load(&models().join(file), vocab).unwrap();
            for text in texts {
                let mut naive = Vec::new();
                if !text.is_empty() {
                    naive.push(t.lookup[&b" "[..]]);
                }
                t.push_characters(text.as_bytes(), &mut naive);
                let mut fast = naive.clone();
                merge_reference(&t, &mut naive);
                t.merge_pairs(&mut fast);
                assert_eq!(fast, naive, "{file}: {text:?}");
            }
        }
    }
}
