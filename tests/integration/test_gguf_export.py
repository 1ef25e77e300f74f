"""GGUF export for llama.cpp, checked without llama.cpp: the file is read back with ``gguf.GGUFReader`` and run
through a numpy re-implementation of what llama.cpp's ``llama``/``deci``/``qwen2``/``qwen3`` graphs compute from
it (pairwise rope for llama/deci, half-split rope for qwen2/qwen3, per-layer heads, deci's rules for layers
without heads or FFN), and of its ``gemma3`` graph, which must give transformers' logits. ``benchmarks/gguf_llamacpp.py`` runs real llama.cpp.
"""

from __future__ import annotations

import json
import os

import gguf
import numpy as np
import pytest
import torch

from osscar_hf import GGUFExportError, export_gguf
from osscar_hf.arch import get_spec
from osscar_hf.cli import main
from osscar_hf.io import save_pruned, update_model_config
from osscar_hf.surgery import prune_attention, prune_mlp
from tests.conftest import make_model, make_text, make_tokenizer

VOCAB = 304  # the BPE tokenizer's 300 tokens, padded as models often are
IDS = torch.randint(3, 300, (2, 12), generator=torch.Generator().manual_seed(0))


def make_bpe_tokenizer():
    """A tiny byte-level BPE tokenizer (digits split one by one, as SmolLM2's), trained in-process."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<s>", "</s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([make_text(2000)], trainer)
    return fast_tokenizer(tok, "<|endoftext|>")


def fast_tokenizer(tok, unk_token: str):
    """``tok`` (a ``tokenizers.Tokenizer``) as a transformers tokenizer with <s>/</s>, an added token and a chat
    template."""
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token=unk_token)
    hf.add_tokens(["<tool>"])
    hf.chat_template = "{% for m in messages %}<s>{{ m['content'] }}</s>{% endfor %}"
    return hf


@pytest.fixture(scope="module")
def bpe():
    return make_bpe_tokenizer()


def shaped(kind: str, groups: list, neurons: list, **overrides) -> torch.nn.Module:
    """A tiny model whose block i keeps KV groups ``groups[i]`` and FFN neurons ``neurons[i]`` (None: all)."""
    model = make_model(kind, vocab_size=VOCAB, num_hidden_layers=len(groups), **overrides)
    spec = get_spec(model)
    m, n_rep, head_dim = spec.group_geometry(model.config)
    for block, kept_groups, kept_neurons in zip(model.get_submodule(spec.blocks), groups, neurons):
        if kept_groups is not None:
            prune_attention(block, spec, torch.tensor(kept_groups, dtype=torch.long), n_rep=n_rep, head_dim=head_dim,
                            num_groups=m)
        if kept_neurons is not None:
            prune_mlp(block, spec, torch.tensor(kept_neurons, dtype=torch.long))
    update_model_config(model, spec, n_rep=n_rep, head_dim=head_dim)
    return model


# --------------------------------------------------------------------------- reading the file back
def fields(reader: gguf.GGUFReader) -> dict:
    return {name: field.contents() for name, field in reader.fields.items()}


def tensors(reader: gguf.GGUFReader) -> dict[str, np.ndarray]:
    """name -> float64 array in Hugging Face orientation (rows = outputs), de-quantized."""
    out = {}
    for t in reader.tensors:
        data = gguf.quants.dequantize(t.data, t.tensor_type)
        out[t.name] = np.asarray(data, dtype=np.float64).reshape([int(n) for n in reversed(t.shape)])
    return out


def _per_layer(meta: dict, key: str, n: int) -> list[int]:
    value = meta[key]
    return list(value) if isinstance(value, list) else [value] * n


def _rms(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * weight


def _rope(x: np.ndarray, base: float, pairwise: bool) -> np.ndarray:
    """x: (tokens, heads, head_dim). llama.cpp's "normal" rope rotates channels (2i, 2i+1), "neox" (i, i+d/2)."""
    t, _, d = x.shape
    angle = np.arange(t)[:, None] * base ** (-np.arange(0, d, 2) / d)[None, :]
    cos, sin = np.cos(angle)[:, None, :], np.sin(angle)[:, None, :]
    a, b = (x[..., 0::2], x[..., 1::2]) if pairwise else (x[..., : d // 2], x[..., d // 2:])
    ra, rb = a * cos - b * sin, a * sin + b * cos
    if pairwise:
        return np.stack([ra, rb], -1).reshape(x.shape)
    return np.concatenate([ra, rb], -1)


def _attention(w: dict, p: str, h: np.ndarray, heads: int, kv: int, meta: dict, arch: str) -> np.ndarray:
    d, eps, base = meta[f"{arch}.attention.key_length"], meta[f"{arch}.attention.layer_norm_rms_epsilon"], \
        meta[f"{arch}.rope.freq_base"]
    if f"{p}attn_qkv.weight" in w:  # phi3: fused [q heads | k heads | v heads]
        fused = h @ w[f"{p}attn_qkv.weight"].T
        proj = dict(zip("qkv", np.split(fused, [heads * d, (heads + kv) * d], axis=-1)))
    else:
        proj = {x: h @ w[f"{p}attn_{x}.weight"].T + w.get(f"{p}attn_{x}.bias", 0) for x in "qkv"}
    q, k, v = (proj[x].reshape(len(h), -1, d) for x in "qkv")
    if f"{p}attn_q_norm.weight" in w:
        q, k = _rms(q, w[f"{p}attn_q_norm.weight"], eps), _rms(k, w[f"{p}attn_k_norm.weight"], eps)
    rot = meta[f"{arch}.rope.dimension_count"]  # phi3 may rotate only the first channels of a head
    q, k = (np.concatenate([_rope(x[..., :rot], base, pairwise=arch in ("llama", "deci")), x[..., rot:]], -1)
            for x in (q, k))
    group = heads // kv
    scores = np.einsum("thd,shd->hts", q, np.repeat(k, group, axis=1)) / np.sqrt(d)
    scores = scores + np.triu(np.full((len(h), len(h)), -np.inf), 1)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    out = np.einsum("hts,shd->thd", probs, np.repeat(v, group, axis=1)).reshape(len(h), -1)
    return out @ w[f"{p}attn_output.weight"].T + w.get(f"{p}attn_output.bias", 0)


def llama_cpp_logits(path, ids: list[int]) -> np.ndarray:
    """What llama.cpp computes from the file for one sequence (its deci graph's rules for empty layers included:
    no heads -> no attention, no attention norm; no FFN -> the layer's result is dropped)."""
    reader = gguf.GGUFReader(path)
    meta, w = fields(reader), tensors(reader)
    arch = meta["general.architecture"]
    n, eps = meta[f"{arch}.block_count"], meta[f"{arch}.attention.layer_norm_rms_epsilon"]
    heads, kvs, ffns = (_per_layer(meta, f"{arch}.{key}", n) for key in
                        ("attention.head_count", "attention.head_count_kv", "feed_forward_length"))
    x = w["token_embd.weight"][ids]
    for il in range(n):
        p = f"blk.{il}."
        cur = x if heads[il] == 0 else _attention(w, p, _rms(x, w[f"{p}attn_norm.weight"], eps), heads[il],
                                                 kvs[il], meta, arch)
        if ffns[il] == 0:
            continue
        ffn_in = cur + x if heads[il] > 0 else cur
        h = _rms(ffn_in, w[f"{p}ffn_norm.weight"], eps)
        up = h @ w[f"{p}ffn_up.weight"].T + w.get(f"{p}ffn_up.bias", 0)
        if f"{p}ffn_gate.weight" in w:
            gate = h @ w[f"{p}ffn_gate.weight"].T + w.get(f"{p}ffn_gate.bias", 0)
        else:  # phi3: one [gate | up] projection
            gate, up = np.split(up, 2, axis=-1)
        x = ffn_in + (gate / (1 + np.exp(-gate)) * up) @ w[f"{p}ffn_down.weight"].T + w.get(f"{p}ffn_down.bias", 0)
    out = w.get("output.weight", w["token_embd.weight"])
    return _rms(x, w["output_norm.weight"], eps) @ out.T


def _hf_logits(model) -> np.ndarray:
    with torch.no_grad():
        return model(IDS).logits.double().numpy()


def phi3(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` under a name that does not start llama.cpp's Phi-3 tokenizer rules (which look for the real Phi-3
    tokenizer's special tokens by name)."""
    model.config.name_or_path = "tiny-random"
    return model


# --------------------------------------------------------------------------- llama.cpp computes the model
CASES = {
    # name: (model builder, llama.cpp architecture, per-layer (heads, kv heads, ffn) written)
    "llama uniform": (lambda: make_model("llama-gqa", vocab_size=VOCAB), "llama", None),
    "llama mha pruned uniform": (lambda: shaped("llama-mha", [[0, 2, 3]] * 2, [range(0, 40, 2)] * 2), "llama", None),
    "mistral": (lambda: make_model("mistral", vocab_size=VOCAB), "llama", None),
    "qwen2": (lambda: make_model("qwen2", vocab_size=VOCAB), "qwen2", None),
    "qwen2 pruned heads": (lambda: shaped("qwen2", [[1], [0]], [range(10), range(10, 20)]), "llama", None),
    "qwen3": (lambda: shaped("qwen3", [[1]] * 2, [range(30)] * 2), "qwen3", None),
    # fused qkv_proj and gate_up_proj, half of every head rotated; its attention is never pruned for llama.cpp
    "phi3, half the neurons": (lambda: phi3(shaped("phi3", [None] * 2, [range(0, 48, 2)] * 2)), "phi3", None),
    "llama per-block": (lambda: shaped("llama-gqa", [[1], [], [0, 1]], [range(0, 20, 2), range(24), None]), "deci",
                        [(2, 1, 10), (0, 0, 24), (4, 2, 48)]),
    # layer 0 without heads (padded: llama.cpp takes the head size from layer 0), FFNs of width 0 (padded: deci
    # drops the attention output of a layer without FFN)
    "llama empty first and FFN-less layers": (
        lambda: shaped("llama-gqa", [[], [1], [], [0]], [None, [], [], range(5)]), "deci",
        [(1, 1, 48), (2, 1, 1), (0, 0, 1), (2, 1, 5)]),
    "qwen2 per-block (q/k/v biases)": (lambda: shaped("qwen2", [[1], [], [0, 1]], [range(10), range(24), []]), "deci",
                                       [(2, 1, 10), (0, 0, 24), (4, 2, 1)]),
    # o_proj bias in a layer without heads: deci ignores it there, so the layer gets one zero head
    "llama biases, a layer without heads": (
        lambda: shaped("llama-gqa", [[1], [], [0, 1]], [range(10), None, None], attention_bias=True, mlp_bias=True),
        "deci", [(2, 1, 10), (1, 1, 48), (4, 2, 48)]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_llama_cpp_computes_the_models_logits(case, bpe, tmp_path):
    build, arch, layers = CASES[case]
    model = build()
    path = export_gguf(model, tmp_path / "m.gguf", "f32", tokenizer=bpe)
    meta = fields(gguf.GGUFReader(path))
    assert meta["general.architecture"] == arch
    if layers is not None:
        n = len(layers)
        written = list(zip(*(_per_layer(meta, f"{arch}.{k}", n) for k in
                             ("attention.head_count", "attention.head_count_kv", "feed_forward_length"))))
        assert written == layers
    expected = _hf_logits(model)
    for row, ids in enumerate(IDS.tolist()):
        np.testing.assert_allclose(llama_cpp_logits(path, ids), expected[row], rtol=0, atol=2e-5)


def test_the_reference_sees_a_missing_rope_reordering(bpe, tmp_path, monkeypatch):
    """The check above fails when q/k rows are not reordered for llama's pairwise rope (it is not vacuous)."""
    import osscar_hf.export.gguf_tensors as tensors_module

    monkeypatch.setattr(tensors_module, "interleave_halves", lambda rows, heads: rows)
    model = make_model("llama-gqa", vocab_size=VOCAB)
    path = export_gguf(model, tmp_path / "m.gguf", "f32", tokenizer=bpe)
    assert np.abs(llama_cpp_logits(path, IDS[0].tolist()) - _hf_logits(model)[0]).max() > 1e-4


# --------------------------------------------------------------------------- metadata and tensors
def test_uniform_llama_metadata_and_every_tensor(bpe, tmp_path):
    model = make_model("llama-gqa", vocab_size=VOCAB, tie_word_embeddings=False)
    path = export_gguf(model, tmp_path / "m.gguf", "f32", tokenizer=bpe)
    reader = gguf.GGUFReader(path)
    meta, w = fields(reader), tensors(reader)
    cfg = model.config
    assert {k: meta[f"llama.{k}"] for k in ("context_length", "embedding_length", "block_count",
                                            "feed_forward_length", "attention.head_count", "attention.head_count_kv",
                                            "attention.key_length", "attention.value_length", "rope.dimension_count",
                                            "vocab_size")} == {
        "context_length": 128, "embedding_length": 32, "block_count": 2, "feed_forward_length": 48,
        "attention.head_count": 4, "attention.head_count_kv": 2, "attention.key_length": 8,
        "attention.value_length": 8, "rope.dimension_count": 8, "vocab_size": VOCAB}
    assert meta["llama.rope.freq_base"] == cfg.rope_parameters["rope_theta"]
    assert meta["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(cfg.rms_norm_eps)
    assert meta["general.file_type"] == gguf.LlamaFileType.ALL_F32
    assert {t.tensor_type for t in reader.tensors} == {gguf.GGMLQuantizationType.F32}
    names = {"token_embd.weight", "output_norm.weight", "output.weight"} | {
        f"blk.{i}.{n}.weight" for i in range(2) for n in ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output",
                                                         "ffn_norm", "ffn_gate", "ffn_up", "ffn_down")}
    assert set(w) == names
    sd = {k: v.double().numpy() for k, v in model.state_dict().items()}
    assert np.array_equal(w["token_embd.weight"], sd["model.embed_tokens.weight"])
    assert np.array_equal(w["output.weight"], sd["lm_head.weight"])
    layer = "model.layers.1."
    for gguf_name, hf_name in (("attn_v", "self_attn.v_proj"), ("attn_output", "self_attn.o_proj"),
                               ("ffn_down", "mlp.down_proj"), ("ffn_norm", "post_attention_layernorm")):
        assert np.array_equal(w[f"blk.1.{gguf_name}.weight"], sd[f"{layer}{hf_name}.weight"]), gguf_name
    q = sd[f"{layer}self_attn.q_proj.weight"].reshape(4, 2, 4, 32)  # heads, halves, pairs, in
    assert np.array_equal(w["blk.1.attn_q.weight"], q.transpose(0, 2, 1, 3).reshape(32, 32))  # pairs interleaved
    assert np.array_equal(w["blk.1.attn_k.weight"],
                          sd[f"{layer}self_attn.k_proj.weight"].reshape(2, 2, 4, 32).transpose(0, 2, 1, 3).reshape(16, 32))


def test_tied_embeddings_write_no_output_tensor(bpe, tmp_path):
    model = make_model("llama-gqa", vocab_size=VOCAB, tie_word_embeddings=True)
    model.tie_weights()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    w = tensors(gguf.GGUFReader(export_gguf(model, tmp_path / "m.gguf", "f32", tokenizer=bpe)))
    assert "output.weight" not in w and "token_embd.weight" in w


def test_per_layer_arrays_exactly_where_shapes_differ(bpe, tmp_path):
    # KV heads differ, FFN widths are the same in every block
    model = shaped("llama-gqa", [[1], [0, 1]], [range(20), range(20, 40)])
    meta = fields(gguf.GGUFReader(export_gguf(model, tmp_path / "m.gguf", "f32", tokenizer=bpe)))
    assert meta["general.architecture"] == "deci"
    assert meta["deci.attention.head_count"] == [2, 4] and meta["deci.attention.head_count_kv"] == [1, 2]
    assert meta["deci.feed_forward_length"] == 20
    assert meta["deci.attention.key_length"] == 8 and meta["deci.rope.dimension_count"] == 8


def test_mistral_declares_its_sliding_window_as_the_context(bpe, tmp_path):
    meta = fields(gguf.GGUFReader(export_gguf(make_model("mistral", vocab_size=VOCAB), tmp_path / "m.gguf", "f32",
                                              tokenizer=bpe)))
    assert meta["llama.context_length"] == 64  # the window: llama.cpp applies none


def test_llama3_rope_scaling_becomes_rope_factors(bpe, tmp_path):
    rope = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
    model = make_model("llama-gqa", vocab_size=VOCAB, rope_parameters=rope)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(model.config, attn_implementation="eager").eval()
    w = tensors(gguf.GGUFReader(export_gguf(model, tmp_path / "m.gguf", "f32", tokenizer=bpe)))
    plain = 1.0 / 10000.0 ** (np.arange(0, 8, 2) / 8)
    np.testing.assert_allclose(plain / w["rope_freqs.weight"], model.model.rotary_emb.inv_freq.double().numpy(),
                               rtol=1e-6)
    assert w["rope_freqs.weight"].max() > 1  # the low frequencies really are scaled


# --------------------------------------------------------------------------- storage types
def test_f16_bf16_and_q8_0(bpe, tmp_path):
    # FFN widths 32 (Q8_0 blocks fit) and 10 (they do not: written f16)
    model = shaped("llama-gqa", [[1], [0, 1]], [range(32), range(10)])
    reference = tensors(gguf.GGUFReader(export_gguf(model, tmp_path / "f32.gguf", "f32", tokenizer=bpe)))
    types = {"f16": gguf.GGMLQuantizationType.F16, "bf16": gguf.GGMLQuantizationType.BF16,
             "q8_0": gguf.GGMLQuantizationType.Q8_0}
    tolerance = {"f16": 1e-3, "bf16": 1e-2, "q8_0": 2e-2}
    for dtype, kind in types.items():
        reader = gguf.GGUFReader(export_gguf(model, tmp_path / f"{dtype}.gguf", dtype.upper(), tokenizer=bpe))
        stored = {t.name: t.tensor_type for t in reader.tensors}
        assert fields(reader)["general.file_type"] == {"f16": gguf.LlamaFileType.MOSTLY_F16,
                                                       "bf16": gguf.LlamaFileType.MOSTLY_BF16,
                                                       "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[dtype]
        assert stored["blk.0.attn_norm.weight"] == gguf.GGMLQuantizationType.F32  # vectors stay f32
        assert stored["blk.0.ffn_down.weight"] == kind  # rows of 32
        assert stored["blk.1.ffn_down.weight"] == (gguf.GGMLQuantizationType.F16 if dtype == "q8_0" else kind)
        assert stored["blk.0.attn_q.weight"] == kind
        for name, value in tensors(reader).items():
            np.testing.assert_allclose(value, reference[name], rtol=0, atol=tolerance[dtype], err_msg=name)


# --------------------------------------------------------------------------- the tokenizer
def test_tokenizer_metadata(bpe, tmp_path):
    meta = fields(gguf.GGUFReader(export_gguf(make_model("llama-gqa", vocab_size=VOCAB), tmp_path / "m.gguf", "f32",
                                              tokenizer=bpe)))
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == "smollm"
    vocab = bpe.get_vocab()
    tokens = meta["tokenizer.ggml.tokens"]
    assert len(tokens) == VOCAB and all(tokens[i] == t for t, i in vocab.items())
    assert len(bpe) == 301 and tokens[301:] == ["[PAD301]", "[PAD302]", "[PAD303]"]
    types = meta["tokenizer.ggml.token_type"]
    assert types[vocab["<s>"]] == gguf.TokenType.CONTROL and types[vocab["<tool>"]] == gguf.TokenType.USER_DEFINED
    assert types[vocab["a"]] == gguf.TokenType.NORMAL and types[303] == gguf.TokenType.UNUSED
    merges = json.loads(bpe.backend_tokenizer.to_str())["model"]["merges"]
    assert meta["tokenizer.ggml.merges"] == [m if isinstance(m, str) else " ".join(m) for m in merges]
    assert len(merges) > 10
    assert meta["tokenizer.ggml.bos_token_id"] == vocab["<s>"] and meta["tokenizer.ggml.eos_token_id"] == vocab["</s>"]
    assert meta["tokenizer.ggml.add_bos_token"] is False and meta["tokenizer.ggml.add_eos_token"] is False
    assert meta["tokenizer.chat_template"] == bpe.chat_template


def test_pre_tokenizer_names():
    from osscar_hf.export.gguf_tokenizer import pre_tokenizer_name

    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}
    assert pre_tokenizer_name({"pre_tokenizer": byte_level}) == "gpt-2"
    llama3 = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| "
                                               "?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"},
         "behavior": "Isolated", "invert": False}, {**byte_level, "use_regex": False}]}
    assert pre_tokenizer_name({"pre_tokenizer": llama3}) == "llama-bpe"
    with pytest.raises(GGUFExportError, match="prefix space"):
        pre_tokenizer_name({"pre_tokenizer": {**byte_level, "add_prefix_space": True}})
    with pytest.raises(GGUFExportError, match="matches none"):
        pre_tokenizer_name({"pre_tokenizer": {"type": "Whitespace"}})


def test_a_tokenizer_llama_cpp_cannot_reproduce_is_refused(tmp_path):
    with pytest.raises(GGUFExportError, match="'WordLevel' model cannot be exported: accepted are byte-level BPE"):
        export_gguf(make_model("llama-gqa"), tmp_path / "m.gguf", "f32", tokenizer=make_tokenizer())  # WordLevel
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- clear errors, before anything is written
def test_a_bad_dtype_is_refused_first(tmp_path):
    with pytest.raises(ValueError, match=r"dtype must be one of f32, f16, bf16, q8_0, got 'q4_k'") as caught:
        export_gguf(tmp_path / "no such folder", tmp_path / "m.gguf", "q4_k")  # checked before the folder
    assert isinstance(caught.value, GGUFExportError)


@pytest.mark.parametrize("case, match", [
    ("qwen3 per-block", "Qwen3 model with per-block shapes"),
    ("opt", "cannot export model_type 'opt' to GGUF: supported families are gemma, gemma2, .*, qwen3, qwen3_moe$"),
    ("query heads not a multiple of KV heads", "layer 0 has 3 query heads and 2 KV heads"),
    ("no tokenizer", "needs its tokenizer"),
])
def test_what_llama_cpp_cannot_hold_is_refused(case, match, bpe, tmp_path):
    tokenizer = bpe
    if case == "qwen3 per-block":
        model = shaped("qwen3", [[1], [0, 1]], [range(30), None])
    elif case == "opt":
        model = make_model("opt")
    elif case == "query heads not a multiple of KV heads":
        model = make_model("llama-gqa", vocab_size=VOCAB)
        attention = model.model.layers[0].self_attn
        attention.q_proj.weight.data = attention.q_proj.weight.data[:24]
        attention.o_proj.weight.data = attention.o_proj.weight.data[:, :24]
    else:
        model, tokenizer = make_model("llama-gqa", vocab_size=VOCAB), None
    with pytest.raises(GGUFExportError, match=match):
        export_gguf(model, tmp_path / "m.gguf", tokenizer=tokenizer)
    assert list(tmp_path.iterdir()) == []


def test_never_overwrites_unless_asked_and_leaves_no_partial_file(bpe, tmp_path, monkeypatch):
    import osscar_hf.export.gguf as gguf_module

    model = make_model("llama-gqa", vocab_size=VOCAB)
    target = tmp_path / "m.gguf"
    target.write_bytes(b"precious")
    with pytest.raises(GGUFExportError, match="refusing to overwrite"):
        export_gguf(model, target, tokenizer=bpe)
    assert target.read_bytes() == b"precious"
    with pytest.raises(GGUFExportError, match="is a folder"):
        export_gguf(model, tmp_path, tokenizer=bpe)

    original = gguf_module.encode

    def failing_encode(name, array, dtype):
        if name.startswith("blk.1."):
            raise OSError("disk full")
        return original(name, array, dtype)

    monkeypatch.setattr(gguf_module, "encode", failing_encode)
    with pytest.raises(OSError, match="disk full"):
        export_gguf(model, target, tokenizer=bpe, overwrite=True)
    assert target.read_bytes() == b"precious" and sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]
    monkeypatch.undo()
    with pytest.raises(GGUFExportError, match="a parent of it is a file"):
        export_gguf(model, target / "inside.gguf", tokenizer=bpe)
    export_gguf(model, target, "f32", tokenizer=bpe, overwrite=True)
    assert fields(gguf.GGUFReader(target))["general.architecture"] == "llama"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]
    assert export_gguf(model, tmp_path / "new" / "folder" / "m.gguf", tokenizer=bpe).is_file()  # parents made


def test_a_file_appearing_meanwhile_is_not_replaced(bpe, tmp_path, monkeypatch):
    import osscar_hf.export.gguf as gguf_module

    target = tmp_path / "m.gguf"
    original = gguf_module.encode

    def racing_encode(name, array, dtype):
        if not target.exists():
            target.write_bytes(b"someone else's")
        return original(name, array, dtype)

    monkeypatch.setattr(gguf_module, "encode", racing_encode)
    with pytest.raises(GGUFExportError, match="appeared while"):
        export_gguf(make_model("llama-gqa", vocab_size=VOCAB), target, tokenizer=bpe)
    assert target.read_bytes() == b"someone else's" and sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]


# --------------------------------------------------------------------------- every save format, and the command line
@pytest.mark.parametrize("fmt", ["stock", "osscar", "remote_code"])
def test_every_save_format_exports_as_the_model_in_memory(fmt, bpe, tmp_path):
    groups, neurons = ([[1], [1]], [range(10), range(10)]) if fmt == "stock" else ([[1], [0, 1]], [range(10), None])
    model = shaped("llama-gqa", groups, neurons)
    save_pruned(model, tmp_path / "saved", tokenizer=bpe, format=fmt)
    expected = tensors(gguf.GGUFReader(export_gguf(model, tmp_path / "memory.gguf", "f32", tokenizer=bpe)))
    if fmt == "remote_code":
        with pytest.raises(GGUFExportError, match="trust_remote_code=True"):
            export_gguf(tmp_path / "saved", tmp_path / "folder.gguf", "f32")
    path = export_gguf(tmp_path / "saved", tmp_path / "folder.gguf", "f32", trust_remote_code=fmt == "remote_code")
    reader = gguf.GGUFReader(path)
    got = tensors(reader)
    assert got.keys() == expected.keys()
    for name in got:
        assert np.array_equal(got[name], expected[name]), name
    assert fields(reader)["general.architecture"] == ("llama" if fmt == "stock" else "deci")
    assert fields(reader)["tokenizer.ggml.tokens"][:301] == [bpe.convert_ids_to_tokens(i) for i in range(301)]


def test_command_line(bpe, tmp_path, capsys):
    model = shaped("llama-gqa", [[1], [0, 1]], [range(10), None])
    save_pruned(model, tmp_path / "saved", tokenizer=bpe)
    out = tmp_path / "m.gguf"
    assert main(["export-gguf", str(tmp_path / "saved"), str(out), "--dtype", "q8_0"]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    assert fields(gguf.GGUFReader(out))["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q8_0
    assert main(["export-gguf", str(tmp_path / "saved"), str(out)]) == 1
    assert "refusing to overwrite" in capsys.readouterr().err
    assert main(["export-gguf", str(tmp_path / "saved"), str(out), "--overwrite", "--dtype", "f32"]) == 0
    with pytest.raises(SystemExit):
        main(["export-gguf", str(tmp_path / "saved"), str(out), "--dtype", "q4_k"])
    assert "invalid choice: 'q4_k'" in capsys.readouterr().err
    assert os.path.getsize(out) > 0


def test_query_heads_are_read_apart_from_kv_heads(bpe, tmp_path):
    """A block that keeps fewer query heads per KV head than the config's ratio (query-head pruning) is written with
    its own head and KV-head counts, and llama.cpp's grouping (query head h -> KV head h // ratio) computes what the
    model with those heads' output columns zeroed computes."""
    model = make_model("llama-gqa", vocab_size=VOCAB)  # 4 query heads, 2 KV heads, head_dim 8
    attention = model.model.layers[0].self_attn
    kept = torch.cat([torch.arange(0, 8), torch.arange(16, 24)])  # query heads 0 and 2: one per KV head
    with torch.no_grad():
        dropped = torch.cat([torch.arange(8, 16), torch.arange(24, 32)])
        attention.o_proj.weight[:, dropped] = 0
    expected = _hf_logits(model)
    with torch.no_grad():
        attention.q_proj.weight = torch.nn.Parameter(attention.q_proj.weight[kept])
        attention.o_proj.weight = torch.nn.Parameter(attention.o_proj.weight[:, kept])
    path = export_gguf(model, tmp_path / "m.gguf", "f32", tokenizer=bpe)
    meta = fields(gguf.GGUFReader(path))
    assert meta["general.architecture"] == "deci"
    assert meta["deci.attention.head_count"] == [2, 4] and meta["deci.attention.head_count_kv"] == 2
    for row, ids in enumerate(IDS.tolist()):
        np.testing.assert_allclose(llama_cpp_logits(path, ids), expected[row], rtol=0, atol=2e-5)


# --------------------------------------------------------------------------- Gemma 3 (llama.cpp's gemma3)
def _gelu_tanh(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))


def gemma_llama_cpp_logits(path, ids: list[int]) -> np.ndarray:
    """What llama.cpp's gemma, gemma2 and gemma3 graphs compute from the file: the embedding scaled by sqrt(hidden),
    norms as written (the 1 + weight of Gemma's RMSNorm is in the file), q/k norms (gemma3), rope from freq_base_swa
    on the layers the pattern marks sliding (with their window), queries scaled by 1/sqrt(key_length), the scores'
    soft cap (gemma2), a norm after attention and after the GELU (tanh) FFN (gemma2, gemma3), and the soft cap of the
    logits when the file has one."""
    reader = gguf.GGUFReader(path)
    meta, w = fields(reader), tensors(reader)
    a = meta["general.architecture"] + "."
    n, eps, d = meta[a + "block_count"], meta[a + "attention.layer_norm_rms_epsilon"], meta[a + "attention.key_length"]
    heads, kv = meta[a + "attention.head_count"], meta[a + "attention.head_count_kv"]
    pattern = meta.get(a + "attention.sliding_window_pattern", [False] * n)
    t = len(ids)
    x = w["token_embd.weight"][ids] * np.sqrt(meta[a + "embedding_length"])
    for il in range(n):
        p = f"blk.{il}."
        h = _rms(x, w[p + "attn_norm.weight"], eps)
        q, k, v = ((h @ w[f"{p}attn_{c}.weight"].T).reshape(t, -1, d) for c in "qkv")
        if p + "attn_q_norm.weight" in w:
            q, k = _rms(q, w[p + "attn_q_norm.weight"], eps), _rms(k, w[p + "attn_k_norm.weight"], eps)
        base = meta[a + "rope.freq_base_swa"] if pattern[il] else meta[a + "rope.freq_base"]
        q, k = _rope(q, base, pairwise=False), _rope(k, base, pairwise=False)
        k, v = np.repeat(k, heads // kv, axis=1), np.repeat(v, heads // kv, axis=1)
        scores = np.einsum("thd,shd->hts", q, k) / np.sqrt(d)
        if a + "attn_logit_softcapping" in meta:
            scores = np.tanh(scores / meta[a + "attn_logit_softcapping"]) * meta[a + "attn_logit_softcapping"]
        distance = np.arange(t)[:, None] - np.arange(t)[None, :]
        masked = (distance < 0) | (pattern[il] and distance >= meta[a + "attention.sliding_window"])
        scores = np.where(masked, -np.inf, scores)
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        out = np.einsum("hts,shd->thd", probs, v).reshape(t, -1) @ w[p + "attn_output.weight"].T
        post = p + "post_attention_norm.weight" in w
        x = x + (_rms(out, w[p + "post_attention_norm.weight"], eps) if post else out)
        h = _rms(x, w[p + "ffn_norm.weight"], eps)
        ffn = (_gelu_tanh(h @ w[p + "ffn_gate.weight"].T) * (h @ w[p + "ffn_up.weight"].T)) @ w[p + "ffn_down.weight"].T
        x = x + (_rms(ffn, w[p + "post_ffw_norm.weight"], eps) if post else ffn)
    logits = _rms(x, w["output_norm.weight"], eps) @ w.get("output.weight", w["token_embd.weight"]).T
    cap = meta.get(a + "final_logit_softcapping")
    return np.tanh(logits / cap) * cap if cap else logits


def gemma3(**overrides) -> torch.nn.Module:
    """A tiny Gemma 3 text model llama.cpp can hold: the query scale it derives (1/sqrt(head_dim)), a window of 4
    on its sliding layers (shorter than the 12 tokens scored)."""
    return make_model("gemma3-text", vocab_size=VOCAB, query_pre_attn_scalar=8, sliding_window=4, **overrides).eval()


def _query_heads(model, kept_per_group: int) -> torch.nn.Module:
    spec = get_spec(model)
    m, n_rep, head_dim = spec.group_geometry(model.config)
    for block in model.model.layers:
        heads = torch.tensor([g * n_rep + j for g in range(m) for j in range(kept_per_group)])
        prune_attention(block, spec, torch.arange(m), n_rep=n_rep, head_dim=head_dim, num_groups=m, kept_heads=heads)
        prune_mlp(block, spec, torch.arange(0, 48, 2))
    update_model_config(model, spec, n_rep=n_rep, head_dim=head_dim)
    return model


def gemma3_with_vision() -> torch.nn.Module:
    """A tiny Gemma 3 with its vision tower (Gemma3ForConditionalGeneration, the text blocks under
    model.language_model): only the language model is written."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    text = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, max_position_embeddings=128, pad_token_id=1,
                bos_token_id=2, eos_token_id=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=48,
                head_dim=8, query_pre_attn_scalar=8, sliding_window=4,
                layer_types=["sliding_attention", "full_attention"])
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                  patch_size=14)
    torch.manual_seed(0)
    model = Gemma3ForConditionalGeneration(Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4,
                                                        image_token_index=VOCAB - 1)).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:  # Gemma's norms start at 0 (a scale of 1): randomise them, they are shifted on export
                param.normal_(0, 0.2)
    return model


GEMMA3_CASES = {  # Gemma 3 text, then Gemma 2 and Gemma 1 (see gemma_arch)
    "with its vision tower (the language model written)": gemma3_with_vision,
    "dense": lambda: gemma3(),
    "one query head per KV group, half the neurons": lambda: _query_heads(gemma3(), 1),
    "logit soft cap, untied head": lambda: gemma3(final_logit_softcapping=0.3, tie_word_embeddings=False),
    # Gemma 2 (soft caps on the scores and the logits, a window on every other layer) and Gemma 1
    "gemma2, one query head per KV group, half the neurons": lambda: _query_heads(
        make_model("gemma2", vocab_size=VOCAB, query_pre_attn_scalar=8, sliding_window=4).eval(), 1),
    "gemma, half the KV groups and neurons": lambda: shaped("gemma", [[1]] * 2, [range(0, 48, 2)] * 2).eval(),
}


@pytest.mark.parametrize("case", list(GEMMA3_CASES))
def test_llama_cpp_gemma_computes_the_models_logits(case, bpe, tmp_path):
    model = GEMMA3_CASES[case]()
    path = export_gguf(model, tmp_path / "m.gguf", "f32", tokenizer=bpe)
    arch = fields(gguf.GGUFReader(path))["general.architecture"]
    assert arch == gemma_arch(case)
    expected = _hf_logits(model)
    for row, ids in enumerate(IDS.tolist()):
        np.testing.assert_allclose(gemma_llama_cpp_logits(path, ids), expected[row], rtol=0, atol=2e-5)


def test_gemma3_metadata_norms_and_the_references_sensitivity(bpe, tmp_path):
    import osscar_hf.export.gguf_tensors as tensors_module

    model = gemma3()
    path = export_gguf(model, tmp_path / "m.gguf", "f32", tokenizer=bpe)
    reader = gguf.GGUFReader(path)
    meta, w = fields(reader), tensors(reader)
    assert meta["gemma3.attention.sliding_window"] == 4
    assert meta["gemma3.attention.sliding_window_pattern"] == [True, False]  # the config's layer_types
    assert (meta["gemma3.rope.freq_base"], meta["gemma3.rope.freq_base_swa"]) == (1e6, 1e4)
    assert "output.weight" not in w  # tied
    sd = {k: v.double().numpy() for k, v in model.state_dict().items()}
    for gguf_name, hf_name in (("post_attention_norm", "post_attention_layernorm"),
                               ("ffn_norm", "pre_feedforward_layernorm"), ("post_ffw_norm", "post_feedforward_layernorm"),
                               ("attn_q_norm", "self_attn.q_norm")):
        np.testing.assert_allclose(w[f"blk.0.{gguf_name}.weight"], sd[f"model.layers.0.{hf_name}.weight"] + 1,
                                   rtol=0, atol=1e-7)
    # not vacuous: the 12 tokens reach past the window (a wider one changes the logits), and without the norms'
    # shift the reference no longer matches
    expected = _hf_logits(model)[0]
    assert np.abs(gemma_llama_cpp_logits(path, IDS[0].tolist()) - expected).max() < 2e-5
    model.config.sliding_window = 100
    assert np.abs(_hf_logits(model)[0] - expected).max() > 1e-3
    model.config.sliding_window = 4
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(tensors_module.NORM_SHIFT, "gemma3_text", 0.0)
        unshifted = export_gguf(model, tmp_path / "unshifted.gguf", "f32", tokenizer=bpe)
    assert np.abs(gemma_llama_cpp_logits(unshifted, IDS[0].tolist()) - expected).max() > 1e-3


@pytest.mark.parametrize("overrides, match", [
    (dict(query_pre_attn_scalar=12), r"query_pre_attn_scalar=12 where llama.cpp scales queries by 1/sqrt\(8\)"),
    (dict(attn_logit_softcapping=50.0), r"attn_logit_softcapping=50.0 \(llama.cpp's gemma3 has no attention soft cap"),
    (dict(hidden_activation="gelu"), "hidden_activation='gelu'"),
])
def test_what_gemma3_in_llama_cpp_computes_otherwise_is_refused(overrides, match, bpe, tmp_path):
    model = make_model("gemma3-text", vocab_size=VOCAB, **dict(dict(query_pre_attn_scalar=8), **overrides))
    with pytest.raises(GGUFExportError, match=match):
        export_gguf(model, tmp_path / "m.gguf", tokenizer=bpe)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("overrides, match", [
    (dict(final_logit_softcapping=None), r"no final_logit_softcapping \(llama.cpp's gemma2 always applies one"),
    (dict(tie_word_embeddings=False), "an LM head of its own"),
])
def test_what_gemma2_in_llama_cpp_computes_otherwise_is_refused(overrides, match, bpe, tmp_path):
    model = make_model("gemma2", vocab_size=VOCAB, query_pre_attn_scalar=8, **overrides)
    with pytest.raises(GGUFExportError, match=match):
        export_gguf(model, tmp_path / "m.gguf", tokenizer=bpe)
    assert list(tmp_path.iterdir()) == []


def gemma_arch(case: str) -> str:
    """The llama.cpp architecture of a GEMMA3_CASES case."""
    return {"gemma2": "gemma2", "gemma": "gemma"}.get(case.split(",")[0], "gemma3")


def test_gemma3_with_its_vision_tower_writes_the_language_model_alone(bpe, tmp_path, caplog):
    import logging

    model = gemma3_with_vision()
    with caplog.at_level(logging.INFO, logger="osscar_hf"):
        reader = gguf.GGUFReader(export_gguf(model, tmp_path / "m.gguf", "f32", tokenizer=bpe))
    assert "the vision tower and projector" in caplog.text and "mmproj" in caplog.text
    names = {t.name for t in reader.tensors}
    assert len(names) == 2 + 2 * 13 and not any("vision" in n or "mm" in n for n in names)
    assert fields(reader)["gemma3.embedding_length"] == 32  # the text config's


def test_gemma3_with_per_block_shapes_is_refused(bpe, tmp_path):
    model = gemma3()
    spec = get_spec(model)
    prune_mlp(model.model.layers[0], spec, torch.arange(16))
    with pytest.raises(GGUFExportError, match="gemma3_text model with per-block shapes.*allocation='uniform'"):
        export_gguf(model, tmp_path / "m.gguf", tokenizer=bpe)
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- mixtures of experts
MOE_ARCHS = {"mixtral": "llama", "qwen3_moe": "qwen3moe", "qwen2_moe": "qwen2moe", "olmoe": "olmoe"}


def half_experts(kind: str, per_block: bool = False, **overrides) -> torch.nn.Module:
    """A tiny mixture of experts with 16 of every expert's 32 neurons kept (block 1 keeps 24 with ``per_block``),
    and 24 of a shared expert's 48. OLMoE without GQA (llama.cpp normalises its keys over hidden channels)."""
    from osscar_hf.surgery import expert_neurons

    overrides = dict(dict(num_key_value_heads=4) if kind == "olmoe" else {}, **overrides)
    model = make_model(kind, vocab_size=VOCAB, **overrides).eval()
    spec = get_spec(model)
    for b, block in enumerate(model.model.layers):
        kept = 24 if per_block and b == 1 else 16
        prune_mlp(block, spec, expert_neurons(torch.arange(kept).expand(4, kept), 32))
        if spec.shared_expert_spec() is not None:
            prune_mlp(block, spec.shared_expert_spec(), torch.arange(24))
    m, n_rep, head_dim = spec.group_geometry(model.config)
    update_model_config(model, spec, n_rep=n_rep, head_dim=head_dim)
    return model


@pytest.mark.parametrize("kind", list(MOE_ARCHS))
def test_a_mixture_of_experts_writes_its_experts_router_and_shared_expert(kind, bpe, tmp_path):
    """llama.cpp itself computes these files' logits to 1.5e-7 of transformers' (benchmarks/gguf_llamacpp.py
    --tiny); here the metadata and every expert tensor are read back."""
    model = half_experts(kind)
    reader = gguf.GGUFReader(export_gguf(model, tmp_path / "m.gguf", "f32", tokenizer=bpe))
    meta, w = fields(reader), tensors(reader)
    arch = MOE_ARCHS[kind]
    assert meta["general.architecture"] == arch
    assert (meta[f"{arch}.expert_count"], meta[f"{arch}.expert_used_count"]) == (4, 2)
    assert meta[f"{arch}.feed_forward_length"] == 16
    if arch in ("qwen2moe", "qwen3moe"):
        assert meta[f"{arch}.expert_feed_forward_length"] == 16
    mlp = model.model.layers[1].mlp
    gate_up, down = mlp.experts.gate_up_proj.detach().double().numpy(), mlp.experts.down_proj.detach().double().numpy()
    assert np.array_equal(w["blk.1.ffn_gate_exps.weight"], gate_up[:, :16])  # experts x neurons x hidden
    assert np.array_equal(w["blk.1.ffn_up_exps.weight"], gate_up[:, 16:])
    assert np.array_equal(w["blk.1.ffn_down_exps.weight"], down)
    assert np.array_equal(w["blk.1.ffn_gate_inp.weight"], mlp.gate.weight.detach().double().numpy())
    shared = {n for n in w if "shexp" in n}
    if kind == "qwen2_moe":
        assert meta["qwen2moe.expert_shared_feed_forward_length"] == 24
        assert np.array_equal(w["blk.1.ffn_down_shexp.weight"], mlp.shared_expert.down_proj.weight.detach().double().numpy())
        assert w["blk.1.ffn_gate_inp_shexp.weight"].shape == (32,)  # a vector, as llama.cpp reads it
        assert len(shared) == 8
    else:
        assert not shared


@pytest.mark.parametrize("case, match", [
    ("per-block", "qwen3_moe model with per-block shapes.*'deci' has no experts"),
    ("qwen2_moe query heads", r"qwen2_moe model with 2 query heads of 8 .*sizes the query and output projections"),
    ("olmoe gqa", "olmoe model with 2 KV heads of 8 .*normalises keys over 32 channels"),
    ("qwen3_moe without renormalised routing", "norm_topk_prob=False, but llama.cpp's 'qwen3moe' renormalises"),
])
def test_what_llama_cpp_computes_otherwise_for_experts_is_refused(case, match, bpe, tmp_path):
    if case == "per-block":
        model = half_experts("qwen3_moe", per_block=True)
    elif case == "qwen2_moe query heads":
        model = half_experts("qwen2_moe")
        spec = get_spec(model)
        for block in model.model.layers:
            prune_attention(block, spec, torch.tensor([0]), n_rep=2, head_dim=8, num_groups=2)
    elif case == "olmoe gqa":
        model = half_experts("olmoe", num_key_value_heads=2)
    else:
        model = half_experts("qwen3_moe", norm_topk_prob=False)
    with pytest.raises(GGUFExportError, match=match):
        export_gguf(model, tmp_path / "m.gguf", tokenizer=bpe)
    assert list(tmp_path.iterdir()) == []


def test_phi3_with_pruned_heads_is_refused(bpe, tmp_path):
    model = phi3(shaped("phi3", [[1]] * 2, [None] * 2))
    with pytest.raises(GGUFExportError, match=r"phi3 model with 2 query heads of 8 .*sizes the query and output "
                                              r"projections 32 x 32; prune its MLP only"):
        export_gguf(model, tmp_path / "m.gguf", tokenizer=bpe)
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- GPT-NeoX (llama.cpp's gptneox)
def _layer_norm(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, eps: float) -> np.ndarray:
    mean = x.mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(((x - mean) ** 2).mean(-1, keepdims=True) + eps) * weight + bias


def gptneox_llama_cpp_logits(path, ids: list[int]) -> np.ndarray:
    """What llama.cpp's gptneox graph computes from the file: LayerNorms with biases, the fused [q | k | v] rows
    (kind-major in the file), half-split rope on the first rope.dimension_count channels, biases everywhere, a GELU
    (tanh) FFN, attention and FFN on the same input when the file says parallel residual."""
    reader = gguf.GGUFReader(path)
    meta, w = fields(reader), tensors(reader)
    a = "gptneox."
    n, eps, heads = meta[a + "block_count"], meta[a + "attention.layer_norm_epsilon"], meta[a + "attention.head_count"]
    hidden, rot, base = meta[a + "embedding_length"], meta[a + "rope.dimension_count"], meta[a + "rope.freq_base"]
    d, t = hidden // heads, len(ids)
    x = w["token_embd.weight"][ids]
    for il in range(n):
        p = f"blk.{il}."
        h = _layer_norm(x, w[p + "attn_norm.weight"], w[p + "attn_norm.bias"], eps)
        q, k, v = (z.reshape(t, heads, d) for z in np.split(h @ w[p + "attn_qkv.weight"].T + w[p + "attn_qkv.bias"], 3, -1))
        q, k = (np.concatenate([_rope(z[..., :rot], base, pairwise=False), z[..., rot:]], -1) for z in (q, k))
        scores = np.einsum("thd,shd->hts", q, k) / np.sqrt(d) + np.triu(np.full((t, t), -np.inf), 1)
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        attn = np.einsum("hts,shd->thd", probs, v).reshape(t, -1) @ w[p + "attn_output.weight"].T + w[p + "attn_output.bias"]
        ffn_in = x if meta[a + "use_parallel_residual"] else x + attn
        h = _layer_norm(ffn_in, w[p + "ffn_norm.weight"], w[p + "ffn_norm.bias"], eps)
        ffn = _gelu_tanh(h @ w[p + "ffn_up.weight"].T + w[p + "ffn_up.bias"]) @ w[p + "ffn_down.weight"].T + \
            w[p + "ffn_down.bias"]
        x = ffn_in + ffn + (attn if meta[a + "use_parallel_residual"] else 0)
    return _layer_norm(x, w["output_norm.weight"], w["output_norm.bias"], eps) @ w["output.weight"].T


def gptneox(parallel: bool = True) -> torch.nn.Module:
    """A tiny GPT-NeoX with half its neurons kept (its attention is never pruned for llama.cpp) and the GELU llama.cpp
    computes (transformers' exact "gelu" differs slightly: the export warns)."""
    return shaped("gpt_neox", [None] * 2, [range(0, 48, 2)] * 2, hidden_act="gelu_pytorch_tanh",
                  use_parallel_residual=parallel).eval()


NEOX_CASES = {"gpt_neox parallel residual, half the neurons": lambda: gptneox(True),
              "gpt_neox sequential residual, half the neurons": lambda: gptneox(False)}


@pytest.mark.parametrize("case", list(NEOX_CASES))
def test_llama_cpp_gptneox_computes_the_models_logits(case, bpe, tmp_path):
    model = NEOX_CASES[case]()
    path = export_gguf(model, tmp_path / "m.gguf", "f32", tokenizer=bpe)
    meta = fields(gguf.GGUFReader(path))
    assert meta["general.architecture"] == "gptneox" and meta["gptneox.rope.dimension_count"] == 2  # 8 * 0.25
    expected = _hf_logits(model)
    for row, ids in enumerate(IDS.tolist()):
        np.testing.assert_allclose(gptneox_llama_cpp_logits(path, ids), expected[row], rtol=0, atol=2e-5)


def test_gptneox_rows_reordering_is_what_the_reference_needs(bpe, tmp_path, monkeypatch):
    """The check above fails when the per-head [q | k | v] rows are written as they are (it is not vacuous)."""
    import osscar_hf.export.gguf_tensors as tensors_module

    monkeypatch.setattr(tensors_module, "neox_qkv_rows", lambda rows, heads: rows)
    model = gptneox()
    path = export_gguf(model, tmp_path / "m.gguf", "f32", tokenizer=bpe)
    assert np.abs(gptneox_llama_cpp_logits(path, IDS[0].tolist()) - _hf_logits(model)[0]).max() > 1e-4


def test_gptneox_with_pruned_heads_is_refused_and_exact_gelu_warns(bpe, tmp_path, caplog):
    with pytest.raises(GGUFExportError, match=r"gpt_neox model with 2 query heads of 8 .*prune its MLP only"):
        export_gguf(shaped("gpt_neox", [[0, 1]] * 2, [None] * 2), tmp_path / "m.gguf", tokenizer=bpe)
    assert list(tmp_path.iterdir()) == []
    export_gguf(shaped("gpt_neox", [None] * 2, [None] * 2), tmp_path / "m.gguf", tokenizer=bpe)  # hidden_act="gelu"
    assert "tanh approximation" in caplog.text
