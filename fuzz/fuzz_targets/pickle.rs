//! PyTorch checkpoints (`torch.save` zip archives): any bytes are refused
//! with an error or open as a value tree, read without running anything.
//! Every tensor in the tree is located with `raw_tensor`, which either
//! refuses it or gives a contiguous float view whose `len` bytes lie in the
//! file, inside its storage, as many as its shape needs; `state_dict`, when
//! it reads, names each tensor once.
#![no_main]

use std::collections::HashSet;

use libfuzzer_sys::fuzz_target;
use llama2::checkpoint::pickle::{TorchFile, TorchTensor, Value};

/// Tensors located per input: a small pickle can name one tensor a great
/// many times, and each look-up checks the same things.
const MAX_LOCATED: usize = 4096;

struct Walk<'a> {
    file: &'a TorchFile,
    data_len: usize,
    located: usize,
}

impl Walk<'_> {
    fn value(&mut self, v: &Value) {
        let _ = (v.kind(), v.as_int(), v.as_float(), v.as_str());
        assert!(v.get("model").is_none() || matches!(v, Value::Dict(_)));
        match v {
            Value::List(items) | Value::Tuple(items) => items.iter().for_each(|i| self.value(i)),
            Value::Dict(pairs) => {
                for (k, val) in pairs {
                    self.value(k);
                    self.value(val);
                }
                // `get` finds the value of the last pair with a key.
                if let Some(key) = pairs.iter().rev().find_map(|(k, _)| k.as_str()) {
                    let last = pairs.iter().rev().find(|(k, _)| k.as_str() == Some(key));
                    let (found, last) = (v.get(key).expect("a key"), &last.expect("a key").1);
                    // By address: NaN floats are not equal to themselves.
                    assert!(std::ptr::eq(found, last), "get({key:?}) is not the last");
                }
            }
            Value::Tensor(t) => self.tensor("tensor", t),
            _ => {}
        }
    }

    fn tensor(&mut self, name: &str, t: &TorchTensor) {
        assert_eq!(t.contiguous_stride().len(), t.shape.len());
        let contiguous = t.is_contiguous();
        if self.located >= MAX_LOCATED {
            return;
        }
        self.located += 1;
        let Ok(raw) = self.file.raw_tensor(name, t) else {
            return;
        };
        let numel = t.numel().expect("a located tensor's size fits");
        assert!(contiguous, "{name}: a non-contiguous view was located");
        assert_eq!(t.shape.len(), t.stride.len());
        assert!(t.storage_offset + numel <= t.storage_len, "{t:?}");
        assert_eq!(Some(raw.dtype), t.dtype.raw());
        assert_eq!(raw.shape, t.shape);
        assert_eq!(raw.numel(), numel);
        assert_eq!(raw.len, numel * t.dtype.element_bytes(), "{t:?}");
        assert_eq!(raw.bytes().len(), raw.len);
        assert!(raw.offset + raw.len <= self.data_len, "{raw:?}");
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(file) = TorchFile::from_bytes(data) else {
        return;
    };
    let _ = (file.path(), format!("{file:?}"));
    let mut walk = Walk {
        file: &file,
        data_len: data.len(),
        located: 0,
    };
    walk.value(file.root());
    let Ok(tensors) = file.state_dict() else {
        return;
    };
    assert!(!tensors.is_empty(), "a state dict holds tensors");
    let mut names = HashSet::new();
    for (name, t) in &tensors {
        assert!(names.insert(name.as_str()), "tensor {name} twice");
        walk.tensor(name, t);
    }
});
