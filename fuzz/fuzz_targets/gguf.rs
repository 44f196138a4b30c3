//! GGUF files: any bytes are refused with an error or open as a file whose
//! every accessor answers without a panic. Of a file that opens: the
//! version is 2 or 3 and the alignment a power of two; metadata keys are
//! unique and `get` finds each one's value, and the typed getters agree
//! with the value's own conversions; every tensor's bytes lie in the file
//! (`len` of them, at an aligned offset, as many as its type and shape
//! need) and `tensor(name)` finds it, while each unsupported tensor's name
//! is an error there; a vocabulary that reads has one score and one token
//! type per piece, and BOS and EOS ids inside it; a config that reads is
//! valid, and weights that assemble have its shapes.
#![no_main]

mod common {
    pub mod raw_tensors;
}

use std::collections::HashSet;

use libfuzzer_sys::fuzz_target;
use llama2::checkpoint::gguf::{self, MetaArray, MetaValue};

/// Calls every accessor of an array, and of the arrays inside it.
fn walk_array(a: &MetaArray) {
    let n = a.len();
    assert_eq!(a.is_empty(), n == 0);
    let _ = a.element_type_name();
    if let Some(s) = a.as_strings() {
        assert_eq!(s.len(), n);
    }
    if let Some(f) = a.as_f32s() {
        assert_eq!(f.len(), n);
    }
    if let Some(i) = a.as_i32s() {
        assert_eq!(i.len(), n);
    }
    if let Some(i) = a.to_i64s() {
        assert_eq!(i.len(), n);
    }
    if let Some(f) = a.to_f64s() {
        assert_eq!(f.len(), n);
    }
    if let Some(inner) = a.as_arrays() {
        assert_eq!(inner.len(), n);
        inner.iter().for_each(walk_array);
    }
}

fn walk_value(v: &MetaValue) {
    let _ = v.to_string();
    let _ = v.type_name();
    let _ = (v.as_i64(), v.as_f64(), v.as_bool());
    if let Some(s) = v.as_str() {
        assert_eq!(Some(s.as_bytes()), v.as_bytes());
    }
    if let Some(a) = v.as_array() {
        assert_eq!(
            v.to_string(),
            format!("[{} × {}]", a.len(), a.element_type_name())
        );
        walk_array(a);
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(g) = gguf::from_bytes(data) else {
        return;
    };
    assert!(matches!(g.version(), 2 | 3), "version {}", g.version());
    let alignment = g.alignment();
    assert!(alignment.is_power_of_two(), "alignment {alignment}");

    let mut keys = HashSet::new();
    for (key, value) in g.metadata() {
        assert!(keys.insert(key.as_str()), "metadata key {key} twice");
        // By address: NaN values are not equal to themselves.
        assert!(
            g.get(key).is_some_and(|v| std::ptr::eq(v, value)),
            "get({key})"
        );
        walk_value(value);
        assert_eq!(g.get_u64(key).ok().flatten(), value.as_u64());
        assert_eq!(g.get_u64(key).is_ok(), value.as_u64().is_some());
        assert_eq!(g.require_u64(key).ok(), value.as_u64());
        let f = g.get_f64(key).ok().flatten();
        assert_eq!(f.map(f64::to_bits), value.as_f64().map(f64::to_bits));
        assert_eq!(g.get_str(key).ok().flatten(), value.as_str());
    }

    let mut names = common::raw_tensors::check(g.tensors(), data);
    for t in g.tensors() {
        assert_eq!(t.offset as u64 % alignment, 0, "{t:?} is not aligned");
        let found = g
            .tensor(&t.name)
            .expect("a supported tensor")
            .expect("listed");
        assert_eq!((found.offset, found.len), (t.offset, t.len));
    }
    for u in g.unsupported_tensors() {
        assert!(names.insert(u.name.as_str()), "tensor {} twice", u.name);
        assert!(u.ggml_type.raw_dtype().is_none(), "{u:?}");
        assert!(u.offset <= data.len() as u64, "{u:?}");
        assert_eq!(u.offset % alignment, 0, "{u:?} is not aligned");
        let _ = u.ggml_type.to_string();
        assert!(g.tensor(&u.name).is_err(), "{u:?} reads as a weight");
    }
    let absent = "\0 no such tensor";
    if !names.contains(absent) {
        assert!(matches!(g.tensor(absent), Ok(None)));
    }

    if let Ok(v) = g.vocabulary() {
        let n = v.pieces.len();
        assert_eq!(v.scores.len(), n);
        assert_eq!(v.token_types.len(), n);
        for id in [v.bos, v.eos].into_iter().flatten() {
            assert!((id as usize) < n, "token id {id} of {n}");
        }
        assert_eq!(
            g.get_str("tokenizer.ggml.model").ok().flatten(),
            Some(v.model.as_str())
        );
    }

    // As a model: a config that reads is valid, and weights that assemble
    // have the shapes it gives.
    let Ok(config) = g.config() else {
        return;
    };
    config
        .validate()
        .expect("GgufFile::config returns a valid config");
    if let Ok(weights) = g.model() {
        assert_eq!(weights.config, config);
        weights
            .check_shapes()
            .expect("assembled weights have the config's shapes");
    }
});
