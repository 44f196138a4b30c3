//! Hugging Face `config.json`: any bytes that are JSON are refused with an
//! error or give a config that validates, whose sizes and token ids are the
//! ones the JSON gives (or transformers' defaults where it gives none), and
//! whose derived values (parameter count, RoPE frequencies) compute
//! without overflow and are finite.
#![no_main]

use libfuzzer_sys::fuzz_target;
use llama2::checkpoint::hf;
use serde_json::Value;

/// RoPE frequencies are computed only for heads up to this size (a valid
/// config may have heads of 2^24 values).
const MAX_HEAD_FOR_ROPE: usize = 1 << 12;

fn int(j: &Value, key: &str) -> Option<u64> {
    j.get(key).and_then(Value::as_u64)
}

fuzz_target!(|data: &[u8]| {
    let Ok(json) = serde_json::from_slice::<Value>(data) else {
        return;
    };
    let Ok(c) = hf::parse_config(&json) else {
        return;
    };
    c.validate().expect("parse_config returns a valid config");
    let size = |key| int(&json, key).map(|v| v as usize);
    assert_eq!(Some(c.dim), size("hidden_size"));
    assert_eq!(Some(c.hidden_dim), size("intermediate_size"));
    assert_eq!(Some(c.n_layers), size("num_hidden_layers"));
    assert_eq!(Some(c.n_heads), size("num_attention_heads"));
    assert_eq!(
        c.n_kv_heads,
        size("num_key_value_heads").unwrap_or(c.n_heads)
    );
    assert_eq!(Some(c.vocab_size), size("vocab_size"));
    assert_eq!(Some(c.seq_len), size("max_position_embeddings"));
    assert_eq!(u64::from(c.bos), int(&json, "bos_token_id").unwrap_or(1));
    let eos: Vec<u64> = match json.get("eos_token_id") {
        None | Some(Value::Null) => vec![2],
        Some(Value::Array(ids)) => ids.iter().map(|v| v.as_u64().expect("an id")).collect(),
        Some(v) => vec![v.as_u64().expect("an id")],
    };
    let parsed: Vec<u64> = c.eos.as_slice().iter().map(|&id| id.into()).collect();
    assert_eq!(parsed, eos, "EOS ids");
    assert!(c.eos_ends_generation);

    let _ = c.parameter_count();
    assert_eq!(c.kv_dim(), c.n_kv_heads * c.head_size());
    assert_eq!(c.kv_group() * c.n_kv_heads, c.n_heads);
    if c.head_size() <= MAX_HEAD_FOR_ROPE {
        let freqs = c.rope_frequencies();
        assert_eq!(freqs.len(), c.head_size() / 2);
        assert!(
            freqs.iter().all(|f| f.is_finite()),
            "RoPE frequencies {freqs:?} of {c:?}"
        );
    }
});
