//! SentencePiece `tokenizer.model` files, the protobuf `ModelProto` that
//! Llama 2, Mistral and llama2.c's own trained tokenizers ship, and their
//! conversion to llama2.c's `tokenizer.bin`, byte for byte what llama2.c's
//! `tokenizer.py` writes, so a model directory needs no Python step.
//!
//! Only the vocabulary is read: field 1 of `ModelProto`, repeated
//! `SentencePiece { 1: piece (string), 2: score (float), 3: type (enum) }`.
//! Every other field (trainer_spec, normalizer_spec, ...) is skipped by its
//! wire type. The protobuf decoder is a small one of our own rather than a
//! dependency: the format needs four wire types, and a hand-written decoder
//! can check every length against its enclosing message, so any input is
//! either read or refused with an error saying where it went wrong.
//!
//! Protobuf messages have no end marker: a file cut exactly between two
//! fields is a valid, shorter message. A cut anywhere else is an error.

use std::path::Path;

use crate::error::{Error, Result};
use crate::files;

/// Largest model file read. Llama 2's (32000 pieces) is 500 KB; large
/// multilingual vocabularies (256k pieces) stay under 5 MB.
const MAX_FILE_BYTES: u64 = 64 << 20;
/// `ModelProto.pieces`.
const PIECES_FIELD: u32 = 1;
/// `SentencePiece.piece`, `.score` and `.type`.
const PIECE_TEXT_FIELD: u32 = 1;
const PIECE_SCORE_FIELD: u32 = 2;
const PIECE_TYPE_FIELD: u32 = 3;
/// Largest protobuf field number (2^29 - 1).
const MAX_FIELD_NUMBER: u64 = (1 << 29) - 1;
/// How SentencePiece spells a space inside pieces (U+2581).
const SPACE_MARK: char = '\u{2581}';
/// The pieces of the beginning- and end-of-sequence tokens, and how
/// llama2.c's tokenizer.py writes them (so that they decode visibly).
const BOS_PIECE: &str = "<s>";
const EOS_PIECE: &str = "</s>";
const BOS_WRITTEN: &str = "\n<s>\n";
const EOS_WRITTEN: &str = "\n</s>\n";

/// `SentencePiece.Type`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PieceKind {
    Normal,
    /// `<unk>`.
    Unknown,
    /// `<s>`, `</s>` and other tokens that never come from text.
    Control,
    UserDefined,
    Unused,
    /// A byte-fallback piece, `<0x00>` to `<0xFF>`.
    Byte,
}

impl PieceKind {
    /// The kind of the enum value `value` (proto2's numbering).
    fn from_proto(value: u64) -> Option<Self> {
        Some(match value {
            1 => PieceKind::Normal,
            2 => PieceKind::Unknown,
            3 => PieceKind::Control,
            4 => PieceKind::UserDefined,
            5 => PieceKind::Unused,
            6 => PieceKind::Byte,
            _ => return None,
        })
    }
}

/// One vocabulary entry; its id is its index in the model.
#[derive(Clone, Debug, PartialEq)]
pub struct Piece {
    /// The piece as SentencePiece stores it, spaces spelled "▁".
    pub text: String,
    pub score: f32,
    pub kind: PieceKind,
}

/// The vocabulary of a SentencePiece model, in id order.
#[derive(Clone, Debug, PartialEq)]
pub struct SentencePieceModel {
    pub pieces: Vec<Piece>,
}

impl SentencePieceModel {
    /// Reads the `tokenizer.model` file at `path`.
    pub fn load(path: &Path) -> Result<Self> {
        let bytes = files::read_bounded(path, "SentencePiece model", MAX_FILE_BYTES)?;
        Self::parse(&bytes).map_err(|reason| Error::tokenizer(path, reason))
    }

    /// Parses a serialized `ModelProto`. Memory stays within a small
    /// multiple of `bytes`' length whatever they hold.
    pub fn parse(bytes: &[u8]) -> std::result::Result<Self, String> {
        let mut fields = Fields::new(bytes, 0);
        let mut pieces = Vec::new();
        while let Some(field) = fields.next_field()? {
            if field.number != PIECES_FIELD {
                continue;
            }
            let Value::Bytes(body, body_at) = field.value else {
                return Err(field.wrong_wire_type("a piece (length-delimited)"));
            };
            let piece =
                parse_piece(body, body_at).map_err(|e| format!("piece {}: {e}", pieces.len()))?;
            pieces.push(piece);
        }
        if pieces.is_empty() {
            return Err(
                "it holds no pieces (ModelProto field 1); is it a SentencePiece model?".into(),
            );
        }
        Ok(SentencePieceModel { pieces })
    }

    /// The id of the beginning-of-sequence token: the control piece "<s>",
    /// as SentencePiece finds it.
    pub fn bos_id(&self) -> Option<usize> {
        self.control_id(BOS_PIECE)
    }

    /// The id of the end-of-sequence token: the control piece "</s>".
    pub fn eos_id(&self) -> Option<usize> {
        self.control_id(EOS_PIECE)
    }

    fn control_id(&self, text: &str) -> Option<usize> {
        self.pieces
            .iter()
            .position(|p| p.kind == PieceKind::Control && p.text == text)
    }

    /// The model as llama2.c's `tokenizer.bin`, exactly as its
    /// `tokenizer.py` exports it: u32 max_token_length (the longest written
    /// piece, in bytes), then per piece f32 score, i32 length and the bytes,
    /// where pieces have "▁" replaced by a space, and BOS and EOS are
    /// written as "\n<s>\n" and "\n</s>\n".
    ///
    /// # Panics
    ///
    /// If a piece is 2 GiB or longer, which `parse` never returns.
    pub fn to_tokenizer_bin(&self) -> Vec<u8> {
        let (bos, eos) = (self.bos_id(), self.eos_id());
        let written: Vec<String> = self
            .pieces
            .iter()
            .enumerate()
            .map(|(id, piece)| match Some(id) {
                i if i == bos => BOS_WRITTEN.to_string(),
                i if i == eos => EOS_WRITTEN.to_string(),
                _ => piece.text.replace(SPACE_MARK, " "),
            })
            .collect();
        let length = |text: &str| i32::try_from(text.len()).expect("pieces are under 2 GiB");
        let longest = written.iter().map(|t| length(t)).max().unwrap_or(0);
        let entries = written
            .iter()
            .map(|t| t.as_bytes())
            .zip(self.pieces.iter().map(|p| p.score));
        crate::tokenizer::bin_bytes(longest as u32, entries)
    }
}

/// A `SentencePiece` message; absent fields take proto2's defaults (empty
/// text, score 0, type normal). A field given twice keeps its last value,
/// as protobuf merges them.
fn parse_piece(body: &[u8], at: usize) -> std::result::Result<Piece, String> {
    let mut piece = Piece {
        text: String::new(),
        score: 0.0,
        kind: PieceKind::Normal,
    };
    let mut fields = Fields::new(body, at);
    while let Some(field) = fields.next_field()? {
        match (field.number, &field.value) {
            (PIECE_TEXT_FIELD, &Value::Bytes(text, text_at)) => {
                piece.text = piece_text(text, text_at)?;
            }
            (PIECE_SCORE_FIELD, &Value::Fixed32(bits)) => piece.score = f32::from_bits(bits),
            (PIECE_TYPE_FIELD, &Value::Varint(v)) => {
                piece.kind = PieceKind::from_proto(v).ok_or_else(|| {
                    format!(
                        "at byte {}: its type is {v}; SentencePiece types are 1 to 6",
                        field.at
                    )
                })?;
            }
            (PIECE_TEXT_FIELD, _) => return Err(field.wrong_wire_type("a string")),
            (PIECE_SCORE_FIELD, _) => return Err(field.wrong_wire_type("a 32-bit float")),
            (PIECE_TYPE_FIELD, _) => return Err(field.wrong_wire_type("a varint enum")),
            _ => {}
        }
    }
    Ok(piece)
}

/// A piece's text: UTF-8, and short enough that its length fits the i32
/// that tokenizer.bin stores.
fn piece_text(bytes: &[u8], at: usize) -> std::result::Result<String, String> {
    if i32::try_from(bytes.len()).is_err() {
        return Err(format!(
            "at byte {at}: its text is {} bytes long; pieces must be under 2 GiB",
            bytes.len()
        ));
    }
    String::from_utf8(bytes.to_vec())
        .map_err(|e| format!("at byte {at}: its text is not UTF-8 ({e})"))
}

/// A field's value, by wire type.
enum Value<'a> {
    Varint(u64),
    /// A 64-bit value, which no field we read has; only skipped.
    Fixed64,
    /// The bytes, and where they start in the file.
    Bytes(&'a [u8], usize),
    Fixed32(u32),
}

/// One field of a message.
struct Field<'a> {
    number: u32,
    value: Value<'a>,
    /// Where its key starts in the file.
    at: usize,
}

impl Field<'_> {
    fn wrong_wire_type(&self, expected: &str) -> String {
        let found = match self.value {
            Value::Varint(_) => "a varint",
            Value::Fixed64 => "a 64-bit value",
            Value::Bytes(..) => "length-delimited bytes",
            Value::Fixed32(_) => "a 32-bit value",
        };
        format!(
            "at byte {}: field {} should be {expected} but is {found}",
            self.at, self.number
        )
    }
}

/// The fields of one message, read in order from its bytes. `base` is
/// where those bytes start in the file, so that errors can say where they
/// are.
struct Fields<'a> {
    bytes: &'a [u8],
    pos: usize,
    base: usize,
}

impl<'a> Fields<'a> {
    fn new(bytes: &'a [u8], base: usize) -> Self {
        Fields {
            bytes,
            pos: 0,
            base,
        }
    }

    /// The next field, or `None` at the end of the message.
    fn next_field(&mut self) -> std::result::Result<Option<Field<'a>>, String> {
        if self.pos == self.bytes.len() {
            return Ok(None);
        }
        let at = self.base + self.pos;
        let key = self.varint()?;
        let number = key >> 3;
        if number == 0 || number > MAX_FIELD_NUMBER {
            return Err(format!(
                "at byte {at}: field number {number} is outside protobuf's 1 to {MAX_FIELD_NUMBER}"
            ));
        }
        let value = match key & 7 {
            0 => Value::Varint(self.varint()?),
            1 => {
                self.fixed::<8>()?;
                Value::Fixed64
            }
            2 => {
                let len = self.varint()?;
                let body_at = self.base + self.pos;
                Value::Bytes(self.take(len)?, body_at)
            }
            5 => Value::Fixed32(u32::from_le_bytes(self.fixed()?)),
            3 | 4 => {
                return Err(format!(
                    "at byte {at}: field {number} is a group (wire type {}), which \
                     SentencePiece models do not use; is this a SentencePiece model?",
                    key & 7
                ))
            }
            wire => {
                return Err(format!(
                    "at byte {at}: field {number} has wire type {wire}, which protobuf does not \
                     define; is this a SentencePiece model?"
                ))
            }
        };
        Ok(Some(Field {
            // number <= MAX_FIELD_NUMBER < 2^32.
            number: number as u32,
            value,
            at,
        }))
    }

    /// A base-128 varint: at most 10 bytes, and no bits beyond 64.
    fn varint(&mut self) -> std::result::Result<u64, String> {
        let at = self.base + self.pos;
        let mut value = 0u64;
        // Nine bytes carry 63 bits; a tenth may only add bit 63.
        for shift in (0..63).step_by(7) {
            let byte = self.varint_byte(at)?;
            value |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Ok(value);
            }
        }
        match self.varint_byte(at)? {
            last @ (0 | 1) => Ok(value | u64::from(last) << 63),
            _ => Err(format!(
                "at byte {at}: a varint is longer than 10 bytes or overflows 64 bits"
            )),
        }
    }

    fn varint_byte(&mut self, at: usize) -> std::result::Result<u8, String> {
        let byte = self.bytes.get(self.pos).copied().ok_or_else(|| {
            format!(
                "at byte {at}: a varint runs past the end of its message (is the file truncated?)"
            )
        })?;
        self.pos += 1;
        Ok(byte)
    }

    fn take(&mut self, len: u64) -> std::result::Result<&'a [u8], String> {
        let at = self.base + self.pos;
        let left = self.bytes.len() - self.pos;
        match usize::try_from(len) {
            Ok(n) if n <= left => {
                self.pos += n;
                Ok(&self.bytes[self.pos - n..self.pos])
            }
            _ => Err(format!(
                "at byte {at}: a field of {len} bytes runs past the end of its message, which \
                 has {left} bytes left (is the file truncated?)"
            )),
        }
    }

    fn fixed<const N: usize>(&mut self) -> std::result::Result<[u8; N], String> {
        let bytes = self.take(N as u64)?;
        Ok(bytes.try_into().expect("take returns exactly N bytes"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn models() -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/models")
    }

    #[test]
    fn converts_to_llama2c_tokenizer_bin_byte_for_byte() {
        for (model, bin, n) in [
            ("tokenizer.model", "tokenizer.bin", 32000),
            ("tok512.model", "tok512.bin", 512),
        ] {
            let m = SentencePieceModel::load(&models().join(model)).unwrap();
            assert_eq!(m.pieces.len(), n, "{model}");
            assert_eq!((m.bos_id(), m.eos_id()), (Some(1), Some(2)), "{model}");
            let kinds: Vec<_> = m.pieces[..4].iter().map(|p| p.kind).collect();
            use PieceKind::*;
            assert_eq!(kinds, [Unknown, Control, Control, Byte], "{model}");
            assert_eq!(m.pieces[3].text, "<0x00>");
            let want = std::fs::read(models().join(bin)).unwrap();
            assert!(
                m.to_tokenizer_bin() == want,
                "{model} does not convert to {bin}"
            );
        }
    }

    /// The bytes of varint `v`.
    fn varint(mut v: u64) -> Vec<u8> {
        let mut out = Vec::new();
        while v >= 0x80 {
            out.push(v as u8 | 0x80);
            v >>= 7;
        }
        out.push(v as u8);
        out
    }

    fn key(number: u64, wire: u64) -> Vec<u8> {
        varint(number << 3 | wire)
    }

    fn bytes_field(number: u64, body: &[u8]) -> Vec<u8> {
        [key(number, 2), varint(body.len() as u64), body.to_vec()].concat()
    }

    fn piece(text: &str, score: f32, kind: u64) -> Vec<u8> {
        let body = [
            bytes_field(1, text.as_bytes()),
            key(2, 5),
            score.to_le_bytes().to_vec(),
            key(3, 0),
            varint(kind),
        ]
        .concat();
        bytes_field(1, &body)
    }

    #[test]
    fn unknown_fields_are_skipped_and_defaults_apply() {
        let unknown = [
            key(99, 0),
            varint(u64::MAX),
            key(98, 1),
            vec![0; 8],
            key(97, 5),
            vec![0; 4],
            bytes_field(96, b"anything"),
        ]
        .concat();
        let bytes = [
            piece("<unk>", 0.0, 2),
            unknown.clone(),
            bytes_field(
                1,
                &[bytes_field(1, b"\xe2\x96\x81a").as_slice(), &unknown].concat(),
            ),
            bytes_field(1, &[]),
            bytes_field(2, &unknown),
        ]
        .concat();
        let m = SentencePieceModel::parse(&bytes).unwrap();
        let want = [
            ("<unk>", 0.0, PieceKind::Unknown),
            ("\u{2581}a", 0.0, PieceKind::Normal),
            ("", 0.0, PieceKind::Normal),
        ];
        let got: Vec<_> = m
            .pieces
            .iter()
            .map(|p| (p.text.as_str(), p.score, p.kind))
            .collect();
        assert_eq!(got, want);
        // Without control pieces <s> and </s>, nothing is renamed.
        assert_eq!((m.bos_id(), m.eos_id()), (None, None));
        let bin = m.to_tokenizer_bin();
        let expected = [
            &5u32.to_le_bytes()[..],
            &0f32.to_le_bytes(),
            &5i32.to_le_bytes(),
            b"<unk>",
            &0f32.to_le_bytes(),
            &2i32.to_le_bytes(),
            b" a",
            &0f32.to_le_bytes(),
            &0i32.to_le_bytes(),
        ]
        .concat();
        assert_eq!(bin, expected);
    }

    #[test]
    fn bos_and_eos_are_the_control_pieces() {
        let bytes = [
            piece("<s>", -1.0, 1),
            piece("</s>", 0.0, 3),
            piece("<s>", 0.5, 3),
        ]
        .concat();
        let m = SentencePieceModel::parse(&bytes).unwrap();
        assert_eq!((m.bos_id(), m.eos_id()), (Some(2), Some(1)));
        let bin = m.to_tokenizer_bin();
        assert_eq!(&bin[..4], &6u32.to_le_bytes());
        let first = [&(-1f32).to_le_bytes()[..], &3i32.to_le_bytes(), b"<s>"].concat();
        assert_eq!(&bin[4..4 + first.len()], first);
        assert!(bin.ends_with(b"\n<s>\n"));
    }

    #[test]
    fn malformed_messages_are_errors() {
        let good = piece("a", 1.0, 1);
        let cases: Vec<(&str, Vec<u8>, &str)> = vec![
            ("empty", vec![], "no pieces"),
            ("no pieces", bytes_field(2, b"x"), "no pieces"),
            ("group", [good.clone(), key(5, 3)].concat(), "group"),
            ("end group", key(1, 4), "group"),
            ("wire type 6", key(1, 6), "wire type 6"),
            ("wire type 7", [key(3, 7), vec![0]].concat(), "wire type 7"),
            ("field 0", [key(0, 0), vec![1]].concat(), "field number 0"),
            (
                "field number too large",
                [key(1 << 29, 0), vec![1]].concat(),
                "field number",
            ),
            (
                "varint of 11 bytes",
                [key(9, 0), vec![0xff; 10], vec![0]].concat(),
                "10 bytes",
            ),
            (
                "varint overflow",
                [key(9, 0), vec![0xff; 9], vec![2]].concat(),
                "overflows",
            ),
            (
                "varint truncated",
                [key(9, 0), vec![0x80]].concat(),
                "runs past the end",
            ),
            (
                "length past the end",
                [key(1, 2), varint(1 << 40), vec![0; 3]].concat(),
                "runs past the end",
            ),
            (
                "length overflows",
                [key(1, 2), varint(u64::MAX)].concat(),
                "runs past the end",
            ),
            (
                "pieces as varint",
                [key(1, 0), vec![1]].concat(),
                "should be a piece",
            ),
            (
                "score as varint",
                bytes_field(1, &[key(2, 0), vec![1]].concat()),
                "should be a 32-bit float",
            ),
            (
                "text as fixed32",
                bytes_field(1, &[key(1, 5), vec![0; 4]].concat()),
                "should be a string",
            ),
            (
                "type as bytes",
                bytes_field(1, &bytes_field(3, b"")),
                "should be a varint",
            ),
            ("bad type", piece("a", 0.0, 7), "type is 7"),
            (
                "negative type",
                piece("a", 0.0, u64::MAX),
                "SentencePiece types",
            ),
            (
                "text not UTF-8",
                bytes_field(1, &bytes_field(1, b"\xff")),
                "not UTF-8",
            ),
            (
                "piece body truncated",
                bytes_field(1, &[key(1, 2), varint(5), b"ab".to_vec()].concat()),
                "runs past the end",
            ),
            (
                "fixed32 truncated",
                bytes_field(1, &[key(2, 5), vec![0; 3]].concat()),
                "runs past the end",
            ),
        ];
        for (what, bytes, expect) in cases {
            let err = SentencePieceModel::parse(&bytes).unwrap_err();
            assert!(err.contains(expect), "{what}: {err}");
        }
        let err = SentencePieceModel::parse(&[good.clone(), piece("b", 0.0, 9)].concat());
        assert!(err.unwrap_err().starts_with("piece 1: "));
    }

    #[test]
    fn every_cut_of_tok512_is_an_error_or_a_shorter_vocabulary() {
        let bytes = std::fs::read(models().join("tok512.model")).unwrap();
        let full = SentencePieceModel::parse(&bytes).unwrap();
        // The first field is piece 0: a key, a one-byte length, the body.
        let first_end = 2 + usize::from(bytes[1]);
        let mut errors = 0;
        for n in 0..bytes.len() {
            match SentencePieceModel::parse(&bytes[..n]) {
                Err(_) => errors += 1,
                // A cut between two fields leaves a valid message.
                Ok(m) => {
                    assert!(n >= first_end, "cut at {n} inside piece 0 parsed");
                    assert!(full.pieces.starts_with(&m.pieces), "cut at {n}");
                }
            }
        }
        // Fields end at about one byte in fifteen; every other cut fails.
        assert!(errors > bytes.len() * 9 / 10, "{errors} of {}", bytes.len());
    }

    #[test]
    fn corrupted_models_never_panic() {
        let bytes = std::fs::read(models().join("tok512.model")).unwrap();
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for _ in 0..3000 {
            let mut m = bytes.clone();
            for _ in 0..1 + next() % 4 {
                let at = (next() % m.len() as u64) as usize;
                m[at] = next() as u8;
            }
            if let Ok(model) = SentencePieceModel::parse(&m) {
                let bin = model.to_tokenizer_bin();
                assert!(bin.len() >= 4 + 8 * model.pieces.len());
            }
        }
    }

    #[test]
    fn load_refuses_what_is_not_a_model() {
        let err = SentencePieceModel::load(&models()).unwrap_err().to_string();
        assert!(err.contains("directory"), "{err}");
        // tokenizer.bin starts with max_token_length 27: key 27 is a group.
        let err = SentencePieceModel::load(&models().join("tokenizer.bin"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("SentencePiece model"), "{err}");
    }
}
