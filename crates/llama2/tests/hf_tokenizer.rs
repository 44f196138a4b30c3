//! tokenizer.json through our `Tokenizer` against the ids of Hugging Face's
//! Python `tokenizers` library (0.23.3, `encode(text, add_special_tokens=False)`),
//! recorded below, on strings with unicode, spaces, digits, code and special
//! tokens; and decoding those ids back through `Utf8Stream`.

mod common;

use common::model_path;
use llama2::tokenizer::Utf8Stream;

const STRINGS: &[&str] = &[
    "Hello world",
    "Ünïcödé 🦙 日本語 text",
    "  leading   spaces and trailing  ",
    "12345 67890 3.14159",
    "def f(x):\n    return x**2  # code\n\tdone",
    "<|eot_id|> and <s> special </s>",
    "",
    "a b c",
    "I'm you're they'll we've",
    "Ölçü Ñandú naïve café",
];

/// `hf/llama3-tiny-random/tokenizer.json`.
const LLAMA3_TINY_RANDOM: &[&[u32]] = &[
    &[9906, 1917],
    &[
        53591, 77, 38672, 66, 3029, 67, 978, 11410, 99, 247, 105180, 102158, 1495,
    ],
    &[220, 6522, 256, 12908, 323, 28848, 256],
    &[4513, 1774, 220, 17458, 1954, 220, 18, 13, 9335, 2946],
    &[
        755, 282, 2120, 997, 262, 471, 865, 334, 17, 220, 674, 2082, 198, 41595,
    ],
    &[128009, 323, 366, 82, 29, 3361, 694, 82, 29],
    &[],
    &[64, 115648, 105584, 66],
    &[40, 2846, 499, 2351, 814, 3358, 584, 3077],
    &[
        64461, 75, 3209, 2448, 1717, 239, 438, 6792, 95980, 588, 53050,
    ],
];

/// `hf/llama2-tokenizer/tokenizer.json`.
const LLAMA2_TOKENIZER: &[&[u32]] = &[
    &[15043, 3186],
    &[
        7189, 29876, 30085, 29883, 9289, 29948, 29871, 243, 162, 169, 156, 29871, 30325, 30346,
        30968, 1426,
    ],
    &[259, 8236, 259, 8162, 322, 25053, 259],
    &[
        29871, 29896, 29906, 29941, 29946, 29945, 29871, 29953, 29955, 29947, 29929, 29900, 29871,
        29941, 29889, 29896, 29946, 29896, 29945, 29929,
    ],
    &[
        822, 285, 29898, 29916, 1125, 13, 268, 2457, 921, 1068, 29906, 259, 29937, 775, 13, 12,
        15091,
    ],
    &[
        529, 29989, 29872, 327, 29918, 333, 29989, 29958, 322, 29871, 1, 259, 18732, 29871, 2,
    ],
    &[],
    &[263, 30081, 29890, 30080, 29883],
    &[
        306, 29915, 29885, 366, 29915, 276, 896, 29915, 645, 591, 29915, 345,
    ],
    &[
        6450, 29880, 30019, 29993, 29871, 30334, 392, 30030, 1055, 30085, 345, 274, 28059,
    ],
];

/// `hf/stories260K/tokenizer.json`.
const STORIES260K: &[&[u32]] = &[
    &[346, 306, 414, 263, 304, 341],
    &[
        410, 198, 159, 416, 198, 178, 429, 198, 185, 418, 485, 410, 243, 162, 169, 156, 410, 233,
        154, 168, 233, 159, 175, 235, 173, 161, 259, 411, 444, 413,
    ],
    &[
        410, 410, 278, 411, 380, 299, 410, 410, 262, 427, 412, 331, 419, 269, 259, 420, 412, 290,
        299, 410, 410,
    ],
    &[
        410, 475, 479, 472, 484, 480, 410, 490, 491, 487, 483, 477, 410, 472, 426, 475, 484, 475,
        480, 483,
    ],
    &[
        279, 411, 431, 272, 489, 444, 488, 467, 13, 410, 410, 410, 410, 276, 413, 425, 420, 416,
        410, 444, 497, 497, 479, 410, 410, 38, 280, 414, 418, 411, 13, 12, 418, 289, 411,
    ],
    &[
        410, 504, 506, 411, 309, 98, 292, 506, 505, 269, 410, 1, 410, 262, 427, 411, 429, 417, 412,
        421, 410, 2,
    ],
    &[],
    &[261, 498, 430, 229, 131, 140, 429],
    &[359, 439, 423, 364, 439, 276, 366, 439, 306, 382, 439, 360],
    &[
        410, 198, 153, 421, 198, 170, 198, 191, 410, 198, 148, 412, 264, 198, 189, 297, 412, 198,
        178, 360, 280, 412, 431, 485,
    ],
];

fn check(dir: &str, want: &[&[u32]]) {
    let path = model_path(&format!("hf/{dir}/tokenizer.json"));
    let tok = llama2::tokenizer::open(&path, None).unwrap();
    for (text, ids) in STRINGS.iter().zip(want) {
        let got = tok.encode_text(text, false, false).unwrap();
        assert_eq!(&got, ids, "{dir}: {text:?}");
        // With BOS first, the pieces decode back to the text (the leading
        // space SentencePiece adds is dropped after BOS).
        let mut with_bos = tok.encode_text(text, true, false).unwrap();
        assert_eq!(with_bos.len(), ids.len() + 1);
        let mut stream = Utf8Stream::new();
        let mut out = Vec::new();
        let mut prev = with_bos.remove(0);
        for id in with_bos {
            stream.push(tok.decode(prev, id), &mut out);
            prev = id;
        }
        let decoded = String::from_utf8(out).unwrap();
        let printable = !text.contains(['\t']);
        if printable && !text.starts_with(' ') {
            assert_eq!(decoded, *text, "{dir}: decoding {text:?}");
        }
    }
}

#[test]
fn llama3_byte_level_bpe_matches_the_tokenizers_library() {
    check("llama3-tiny-random", LLAMA3_TINY_RANDOM);
}

#[test]
fn llama2_sentencepiece_bpe_matches_the_tokenizers_library() {
    check("llama2-tokenizer", LLAMA2_TOKENIZER);
}

#[test]
fn tok512_json_matches_the_tokenizers_library() {
    check("stories260K", STORIES260K);
}

#[test]
fn bos_and_eos_come_from_tokenizer_config() {
    let tok =
        llama2::tokenizer::open(&model_path("hf/llama3-tiny-random/tokenizer.json"), None).unwrap();
    assert_eq!(tok.encode_text("", true, true).unwrap(), [128000, 128009]);
    assert_eq!(tok.vocab_size(), 128256);
}
