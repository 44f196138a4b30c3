"""Writes the checked-in seed corpus of the fuzz targets: tiny valid
checkpoints in versions 0, 1 and 2 (shared and separate classifier), tiny
tokenizer.bin files, prompts, and tiny hand-made files of the foreign
formats: GGUF, torch.save archives (zip + pickle), safetensors, Hugging Face
config.json and SentencePiece models. The real files of shared/models are
added as seeds at run time by scripts/fuzz.sh; they are not copied here.

torch is not needed: the pickles are written by Python's own pickler, with
stand-in classes that pickle under torch's names.

    python3 fuzz/seeds.py     # rewrites fuzz/corpus/<target> for every target
"""
import collections
import io
import json
import os
import pickle
import random
import struct
import sys
import types
import zipfile

HERE = os.path.dirname(os.path.abspath(__file__))
rng = random.Random(1)


def floats(n, scale=0.5):
    return [rng.uniform(-scale, scale) for _ in range(n)]


def pack_f32(values):
    return struct.pack(f"<{len(values)}f", *values)


def checkpoint(version, shared, dim=8, hidden=12, layers=1, heads=2, kv=1, vocab=8, seq=4, gs=4):
    hs = dim // heads
    kvd = kv * hs
    shapes = {
        "emb": (vocab * dim, 1), "att": (dim, layers), "wq": (dim * dim, layers),
        "wk": (kvd * dim, layers), "wv": (kvd * dim, layers), "wo": (dim * dim, layers),
        "ffn": (dim, layers), "w1": (hidden * dim, layers), "w2": (dim * hidden, layers),
        "w3": (hidden * dim, layers), "final": (dim, 1), "cls": (vocab * dim, 1),
    }
    norms = {"att", "ffn", "final"}
    dims = (dim, hidden, layers, heads, kv, vocab, seq)

    def tensor(name, quantize):
        n, count = shapes[name]
        out = b""
        for _ in range(count):
            v = [1.0 + x for x in floats(n, 0.2)] if name in norms else floats(n)
            if not quantize:
                out += pack_f32(v)
                continue
            q, scales = [], []
            for g in range(0, n, gs):
                group = v[g:g + gs]
                s = max(abs(x) for x in group) / 127.0
                scales.append(s)
                q += [0 if s == 0 else max(-127, min(127, round(x / s))) for x in group]
            out += struct.pack(f"<{n}b", *q) + pack_f32(scales)
        return out

    if version == 0:
        header = struct.pack("<7i", dim, hidden, layers, heads, kv, vocab if shared else -vocab, seq)
        order = ["emb", "att", "wq", "wk", "wv", "wo", "ffn", "w1", "w2", "w3", "final"]
        body = b"".join(tensor(t, False) for t in order)
        body += pack_f32([0.0] * (seq * hs))  # the legacy RoPE tables
        if not shared:
            body += tensor("cls", False)
        return header + body
    header = struct.pack("<Ii7iB", 0x616B3432, version, *dims, 1 if shared else 0)
    if version == 2:
        header += struct.pack("<i", gs)
    header += b"\0" * (256 - len(header))
    order = ["att", "ffn", "final", "emb", "wq", "wk", "wv", "wo", "w1", "w2", "w3"]
    if not shared:
        order.append("cls")
    quant = version == 2
    return header + b"".join(tensor(t, quant and t not in norms) for t in order)


def tokenizer(pieces):
    out = struct.pack("<i", max(len(p) for p in pieces))
    for i, p in enumerate(pieces):
        out += struct.pack("<fi", -float(i), len(p)) + p
    return out


def write(target, name, data):
    folder = os.path.join(HERE, "corpus", target)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, name), "wb") as f:
        f.write(data)


for version in (0, 1, 2):
    for shared in (True, False):
        write("checkpoint", f"v{version}-{'shared' if shared else 'separate'}", checkpoint(version, shared))
write("checkpoint", "v2-gs8-gqa", checkpoint(2, True, dim=16, heads=4, kv=2, hidden=24, gs=8))

specials = [b"<unk>", b"\n<s>\n", b"\n</s>\n"]
byte_tokens = [b"<0x%02X>" % b for b in range(256)]
words = [b" ", b"e", b"t", b"a", b" t", b"he", b" the", b"\xc3\xa9", b"\xe2\x82\xac", b"\xf0\x9f\xa6\x99"]


def tokenizer_input(mode, file, text):
    """The tokenizer target's input: mode byte, text length (u16), file, text."""
    return bytes([mode]) + struct.pack("<H", len(text)) + file + text


write("tokenizer", "bytes-words", tokenizer_input(0, tokenizer(specials + byte_tokens + words), b"the tea \xc3\xa9t\xc3\xa9"))
write("tokenizer", "no-bytes", tokenizer_input(0, tokenizer(specials + words), b"hello \xff world"))
write("tokenizer", "vocab-from-text", tokenizer_input(3, tokenizer(specials), b"abc"))

for name, text in [
    ("story", "Once upon a time, there was a little girl named Lily."),
    ("unicode", "Ünïcödé 🦙 日本語\n\ttabs and  double  spaces"),
    ("code", "fn main() { println!(\"{}\", 1 + 2); } // 0123456789"),
    ("specials", "<s> </s> <unk> <0x0A> [INST] <<SYS>>"),
]:
    write("encode", name, text.encode())
write("encode", "invalid-utf8", b"ok \xff\xfe \xc3 \xe2\x82 \xed\xa0\x80 end")


# ---------------------------------------------------------------------------
# GGUF

GGUF_U8, GGUF_U32, GGUF_I32, GGUF_F32, GGUF_BOOL, GGUF_STRING, GGUF_ARRAY, GGUF_U64, GGUF_F64 = (
    0, 4, 5, 6, 7, 8, 9, 10, 12)
GGML_F32, GGML_F16, GGML_Q8_0, GGML_Q4_K, GGML_BF16 = 0, 1, 8, 12, 30


def gguf_string(b):
    if isinstance(b, str):
        b = b.encode()
    return struct.pack("<Q", len(b)) + b


def gguf_value(ty, v):
    scalar = {GGUF_U8: "<B", GGUF_U32: "<I", GGUF_I32: "<i", GGUF_F32: "<f", GGUF_BOOL: "<?",
              GGUF_U64: "<Q", GGUF_F64: "<d"}
    if ty == GGUF_STRING:
        return gguf_string(v)
    if ty == GGUF_ARRAY:
        elem, items = v
        return struct.pack("<IQ", elem, len(items)) + b"".join(gguf_value(elem, i) for i in items)
    return struct.pack(scalar[ty], v)


def gguf(metadata, tensors, version=3, alignment=32):
    """metadata: [(key, type, value)]; tensors: [(name, ne innermost first, ggml type, data)]."""
    out = b"GGUF" + struct.pack("<IQQ", version, len(tensors), len(metadata))
    for key, ty, v in metadata:
        out += gguf_string(key) + struct.pack("<I", ty) + gguf_value(ty, v)
    data, offsets = b"", []
    for _, _, _, blob in tensors:
        data += b"\0" * (-len(data) % alignment)
        offsets.append(len(data))
        data += blob
    for (name, ne, ty, _), off in zip(tensors, offsets):
        out += gguf_string(name) + struct.pack("<I", len(ne)) + struct.pack(f"<{len(ne)}Q", *ne)
        out += struct.pack("<IQ", ty, off)
    out += b"\0" * (-len(out) % alignment)
    return out + data


def f16s(values):
    return struct.pack(f"<{len(values)}e", *values)


def bf16s(values):
    return b"".join(struct.pack("<f", v)[2:] for v in values)


def q8_0(values):
    out = b""
    for g in range(0, len(values), 32):
        block = values[g:g + 32]
        scale = max(abs(x) for x in block) / 127.0 or 1.0
        out += struct.pack("<e", scale) + struct.pack("<32b", *[round(x / scale) for x in block])
    return out


sp_pieces = ["<unk>", "<s>", "</s>", "<0x0A>", "\u2581", "e", "t", "\u2581t", "he", "\u2581the"]
sp_types = [2, 3, 3, 6, 1, 1, 1, 1, 1, 1]
gguf_meta = [
    ("general.architecture", GGUF_STRING, "llama"),
    ("general.name", GGUF_STRING, "tiny"),
    ("general.alignment", GGUF_U32, 32),
    ("llama.context_length", GGUF_U32, 4),
    ("llama.embedding_length", GGUF_U32, 8),
    ("llama.block_count", GGUF_U32, 1),
    ("llama.feed_forward_length", GGUF_U32, 12),
    ("llama.attention.head_count", GGUF_U32, 2),
    ("llama.attention.head_count_kv", GGUF_U32, 1),
    ("llama.attention.layer_norm_rms_epsilon", GGUF_F32, 1e-5),
    ("llama.rope.freq_base", GGUF_F32, 10000.0),
    ("general.file_type", GGUF_U32, 0),
    ("general.quantized", GGUF_BOOL, False),
    ("general.size", GGUF_U64, 1 << 40),
    ("general.ratio", GGUF_F64, 0.25),
    ("general.nested", GGUF_ARRAY, (GGUF_ARRAY, [(GGUF_U8, [1, 2]), (GGUF_STRING, ["a", "b"])])),
    ("tokenizer.ggml.model", GGUF_STRING, "llama"),
    ("tokenizer.ggml.tokens", GGUF_ARRAY, (GGUF_STRING, sp_pieces)),
    ("tokenizer.ggml.scores", GGUF_ARRAY, (GGUF_F32, [-float(i) for i in range(len(sp_pieces))])),
    ("tokenizer.ggml.token_type", GGUF_ARRAY, (GGUF_I32, sp_types)),
    ("tokenizer.ggml.bos_token_id", GGUF_U32, 1),
    ("tokenizer.ggml.eos_token_id", GGUF_U32, 2),
]
gguf_tensors = [
    ("token_embd.weight", [8, 10], GGML_F32, pack_f32(floats(80))),
    ("output_norm.weight", [8], GGML_F16, f16s(floats(8))),
    ("blk.0.attn_norm.weight", [8], GGML_BF16, bf16s(floats(8))),
    ("blk.0.attn_q.weight", [32, 2], GGML_Q8_0, q8_0(floats(64))),
    ("blk.0.ffn_down.weight", [256], GGML_Q4_K, bytes(144)),
    ("empty", [0, 3], GGML_F32, b""),
]
write("gguf", "v3-tiny", gguf(gguf_meta, gguf_tensors))
# A whole model (dim 8, hidden 12, 1 layer, 2 heads, 1 KV head, vocab 10),
# which config() and model() read; and one in Q8_0 (dim 32: rows of 32).
model_meta = [m for m in gguf_meta if m[0] != "general.nested"]
model_tensors = [
    ("token_embd.weight", [8, 10], GGML_F32, pack_f32(floats(80))),
    ("output_norm.weight", [8], GGML_F32, pack_f32(floats(8))),
    ("blk.0.attn_norm.weight", [8], GGML_F32, pack_f32(floats(8))),
    ("blk.0.attn_q.weight", [8, 8], GGML_F32, pack_f32(floats(64))),
    ("blk.0.attn_k.weight", [8, 4], GGML_F16, f16s(floats(32))),
    ("blk.0.attn_v.weight", [8, 4], GGML_BF16, bf16s(floats(32))),
    ("blk.0.attn_output.weight", [8, 8], GGML_F32, pack_f32(floats(64))),
    ("blk.0.ffn_norm.weight", [8], GGML_F32, pack_f32(floats(8))),
    ("blk.0.ffn_gate.weight", [8, 12], GGML_F32, pack_f32(floats(96))),
    ("blk.0.ffn_down.weight", [12, 8], GGML_F32, pack_f32(floats(96))),
    ("blk.0.ffn_up.weight", [8, 12], GGML_F32, pack_f32(floats(96))),
]
write("gguf", "model-f32", gguf(model_meta, model_tensors))
q8_meta = [m for m in model_meta if not m[0].startswith("llama.")] + [
    ("llama.context_length", GGUF_U32, 4), ("llama.embedding_length", GGUF_U32, 32),
    ("llama.block_count", GGUF_U32, 1), ("llama.feed_forward_length", GGUF_U32, 32),
    ("llama.attention.head_count", GGUF_U32, 4), ("llama.attention.head_count_kv", GGUF_U32, 2),
]
q8_tensors = [("token_embd.weight", [32, 10], GGML_Q8_0, q8_0(floats(320))),
              ("output.weight", [32, 10], GGML_Q8_0, q8_0(floats(320))),
              ("output_norm.weight", [32], GGML_F32, pack_f32(floats(32))),
              ("blk.0.attn_norm.weight", [32], GGML_F32, pack_f32(floats(32))),
              ("blk.0.ffn_norm.weight", [32], GGML_F32, pack_f32(floats(32)))]
for name, rows in [("attn_q", 32), ("attn_k", 16), ("attn_v", 16), ("attn_output", 32),
                   ("ffn_gate", 32), ("ffn_down", 32), ("ffn_up", 32)]:
    q8_tensors.append((f"blk.0.{name}.weight", [32, rows], GGML_Q8_0, q8_0(floats(32 * rows))))
write("gguf", "model-q8_0", gguf(q8_meta, q8_tensors))
write("gguf", "v2-align64", gguf(
    [("general.alignment", GGUF_U64, 64), ("general.architecture", GGUF_STRING, "llama")],
    gguf_tensors[:4], version=2, alignment=64))
write("gguf", "gpt2-vocab", gguf(
    [("tokenizer.ggml.model", GGUF_STRING, "gpt2"),
     ("tokenizer.ggml.tokens", GGUF_ARRAY, (GGUF_STRING, ["a", "b", "\u0120c"])),
     ("tokenizer.ggml.eos_token_id", GGUF_U64, 2)],
    []))

# ---------------------------------------------------------------------------
# torch.save archives. Stand-ins for torch's storage classes and its
# tensor-rebuilding function pickle under torch's names; the pickler's
# persistent_id turns storages into torch's ("storage", ...) tuples.

torch = types.ModuleType("torch")
torch_utils = types.ModuleType("torch._utils")
torch._utils = torch_utils
for storage_name in ("FloatStorage", "HalfStorage", "BFloat16Storage", "LongStorage"):
    cls = type(storage_name, (), {"__module__": "torch"})
    setattr(torch, storage_name, cls)


def _rebuild_tensor_v2(*args):
    raise AssertionError("never called: the pickle is only written")


def _rebuild_parameter(*args):
    raise AssertionError("never called: the pickle is only written")


for fn in (_rebuild_tensor_v2, _rebuild_parameter):
    fn.__module__ = "torch._utils"
    setattr(torch_utils, fn.__name__, fn)
sys.modules.setdefault("torch", torch)
sys.modules.setdefault("torch._utils", torch_utils)


class Storage:
    def __init__(self, kind, key, data, element_bytes):
        self.kind, self.key, self.data = kind, key, data
        self.numel = len(data) // element_bytes


class Tensor:
    def __init__(self, storage, shape, offset=0, stride=None, parameter=False):
        if stride is None:
            stride, step = [], 1
            for d in reversed(shape):
                stride.insert(0, step)
                step *= d
        self.args = (storage, offset, tuple(shape), tuple(stride), False, collections.OrderedDict())
        self.parameter = parameter

    def __reduce__(self):
        if self.parameter:
            plain = Tensor(None, ())
            plain.args = self.args
            return (torch_utils._rebuild_parameter, (plain, True, collections.OrderedDict()))
        return (torch_utils._rebuild_tensor_v2, self.args)


class TorchPickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, Storage):
            return ("storage", obj.kind, obj.key, "cpu", obj.numel)
        return None


def torch_zip(obj, storages, prefix="archive"):
    buf = io.BytesIO()
    TorchPickler(buf, protocol=2).dump(obj)
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as z:
        z.writestr(f"{prefix}/data.pkl", buf.getvalue())
        z.writestr(f"{prefix}/byteorder", b"little")
        for s in storages:
            z.writestr(f"{prefix}/data/{s.key}", s.data)
        z.writestr(f"{prefix}/version", b"3\n")
    return out.getvalue()


emb = Storage(torch.FloatStorage, "0", pack_f32(floats(80)), 4)
norm = Storage(torch.HalfStorage, "1", f16s(floats(8)), 2)
wq = Storage(torch.BFloat16Storage, "2", bf16s(floats(64)), 2)
steps = Storage(torch.LongStorage, "3", struct.pack("<2q", 1, 2), 8)
state = collections.OrderedDict([
    ("tok_embeddings.weight", Tensor(emb, [10, 8])),
    ("norm.weight", Tensor(norm, [8])),
    ("layers.0.attention.wq.weight", Tensor(wq, [8, 8])),
    # A view into the embedding's storage, and a non-contiguous one.
    ("output.weight", Tensor(emb, [4, 8], offset=8)),
    ("transposed", Tensor(emb, [8, 10], stride=[1, 8])),
])
state._metadata = collections.OrderedDict([("", {"version": 1})])
write("pickle", "state-dict", torch_zip(state, [emb, norm, wq], prefix="consolidated.00"))
train = {
    "model": collections.OrderedDict(
        ("_orig_mod." + k, Tensor(t.args[0], t.args[2], t.args[1], t.args[3], parameter=True))
        for k, t in list(state.items())[:4]),
    "optimizer": {"state": {0: {"step": Tensor(steps, [2])}}, "param_groups": [{"lr": 5e-4, "params": [0]}]},
    "model_args": {"dim": 8, "n_layers": 1, "n_heads": 2, "n_kv_heads": 1, "vocab_size": 10,
                   "multiple_of": 4, "max_seq_len": 4, "dropout": 0.0, "norm_eps": None},
    "iter_num": 100000,
    "best_val_loss": 1.25,
    "config": {"out_dir": "out", "compile": True, "dtype": "float32", "neg": -3, "big": 1 << 40,
               "tuple": (1, 2, 3, 4)},  # no bytes: protocol 2 pickles them as a call
}
write("pickle", "train-ckpt", torch_zip(train, [emb, norm, wq, steps], prefix="ckpt"))

# ---------------------------------------------------------------------------
# safetensors


def safetensors(tensors, metadata=None):
    """tensors: [(name, dtype, shape, data)]."""
    header, data = {}, b""
    if metadata is not None:
        header["__metadata__"] = metadata
    for name, dtype, shape, blob in tensors:
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(data), len(data) + len(blob)]}
        data += blob
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + data


write("safetensors", "tiny", safetensors([
    ("model.embed_tokens.weight", "F32", [10, 8], pack_f32(floats(80))),
    ("model.norm.weight", "F16", [8], f16s(floats(8))),
    ("model.layers.0.self_attn.q_proj.weight", "BF16", [8, 8], bf16s(floats(64))),
    ("empty", "F32", [0, 4], b""),
    ("scalar", "F32", [], pack_f32([1.5])),
], {"format": "pt"}))
write("safetensors", "one-tensor", safetensors([("w", "F32", [2, 3], pack_f32(floats(6)))]))

# ---------------------------------------------------------------------------
# Hugging Face config.json: stories260K's and the Llama 3 one's structure.

stories_config = {
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 1, "dtype": "float32", "eos_token_id": 2, "head_dim": 4, "hidden_act": "silu",
    "hidden_size": 8, "initializer_range": 0.02, "intermediate_size": 12,
    "max_position_embeddings": 16, "mlp_bias": False, "model_type": "llama",
    "num_attention_heads": 2, "num_hidden_layers": 1, "num_key_value_heads": 1,
    "pad_token_id": None, "pretraining_tp": 1, "rms_norm_eps": 1e-05,
    "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"},
    "tie_word_embeddings": True, "transformers_version": "5.23.0", "use_cache": True,
    "vocab_size": 32,
}
llama3_config = dict(stories_config, **{
    "bos_token_id": 128000, "dtype": "bfloat16", "eos_token_id": [128001, 128008, 128009],
    "head_dim": 16, "hidden_size": 64, "intermediate_size": 192, "max_position_embeddings": 8192,
    "num_attention_heads": 4, "num_hidden_layers": 2, "num_key_value_heads": 2,
    "rope_parameters": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                        "original_max_position_embeddings": 64, "rope_theta": 500000.0,
                        "rope_type": "llama3"},
    "vocab_size": 128256,
})
# transformers 4's style: rope_theta and rope_scaling at the top level.
old_config = {k: v for k, v in llama3_config.items() if k not in ("rope_parameters", "head_dim")}
old_config.update({"rope_theta": 500000.0, "tie_word_embeddings": False, "rope_scaling": {
    "factor": 8.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
    "original_max_position_embeddings": 8192, "rope_type": "llama3"}})
minimal_config = {k: stories_config[k] for k in (
    "model_type", "hidden_size", "intermediate_size", "num_hidden_layers",
    "num_attention_heads", "vocab_size", "max_position_embeddings")}
for name, config in [("stories", stories_config), ("llama3", llama3_config),
                     ("transformers4", old_config), ("minimal", minimal_config)]:
    write("hf_config", name, json.dumps(config, indent=2).encode())

# ---------------------------------------------------------------------------
# SentencePiece ModelProto: field 1 repeated SentencePiece {1: piece,
# 2: score (float), 3: type}; other fields (trainer_spec 2,
# normalizer_spec 3) are skipped.


def pb_varint(v):
    out = b""
    while v >= 0x80:
        out += bytes([v & 0x7F | 0x80])
        v >>= 7
    return out + bytes([v])


def pb_field(number, wire, payload):
    key = pb_varint(number << 3 | wire)
    if wire == 2:
        return key + pb_varint(len(payload)) + payload
    return key + payload


def sp_model(pieces, extra=b""):
    out = b""
    for text, score, kind in pieces:
        body = pb_field(1, 2, text.encode()) + pb_field(2, 5, struct.pack("<f", score))
        if kind != 1:  # proto2's default type is NORMAL
            body += pb_field(3, 0, pb_varint(kind))
        out += pb_field(1, 2, body)
    return out + extra


trainer_spec = pb_field(2, 2, pb_field(3, 0, pb_varint(1)) + pb_field(4, 0, pb_varint(512))
                        + pb_field(35, 0, pb_varint(1)))
normalizer_spec = pb_field(3, 2, pb_field(1, 2, b"identity") + pb_field(3, 0, pb_varint(1)))
sp_vocab = [(t, -float(i), k) for i, (t, k) in enumerate(zip(sp_pieces, sp_types))]
write("sentencepiece", "tiny", sp_model(sp_vocab, trainer_spec + normalizer_spec))
write("sentencepiece", "bytes", sp_model(
    [("<unk>", 0.0, 2), ("<s>", 0.0, 3), ("</s>", 0.0, 3)]
    + [("<0x%02X>" % b, 0.0, 6) for b in range(256)] + [("\u2581a", -1.0, 1), ("\u00e9", -2.0, 4)]))
write("sentencepiece", "fixed64-and-unused", sp_model(
    [("<unk>", 0.0, 2), ("a", 0.0, 5), ("b", 0.0, 1)], pb_field(9, 1, struct.pack("<d", 1.0))))
