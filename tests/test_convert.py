"""Conversion: HF (safetensors, sharded, bin) and GGUF round trips, and clear failures."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
import torch

from tests.conftest import random_batch, tiny_hf_model
from yoro_jax import llama
from yoro_jax.checkpoint import CheckpointError, load_model
from yoro_jax.convert.cli import main as convert_main
from yoro_jax.convert.core import convert
from yoro_jax.convert.gguf_import import undo_rope_permutation
from yoro_jax.convert.mapping import ConversionError


def _reference_logits(hf, tokens, valid):
    positions = np.maximum(np.cumsum(valid, axis=1) - 1, 0)
    with torch.no_grad():
        return hf(
            torch.tensor(tokens, dtype=torch.long),
            attention_mask=torch.tensor(valid, dtype=torch.long),
            position_ids=torch.tensor(positions, dtype=torch.long),
        ).logits.numpy()


def _assert_parity(hf, model_dir, atol=1e-4):
    model = load_model(model_dir)
    tokens, valid = random_batch(np.random.RandomState(0), [20, 9], model.config.vocab_size, 20)
    ours = np.asarray(llama.forward(model.config, model.params, tokens, valid))
    assert np.abs(ours - _reference_logits(hf, tokens, valid))[valid].max() <= atol
    return model


@pytest.mark.parametrize(
    "save_kwargs",
    [{}, {"max_shard_size": "100KB"}, {"safe_serialization": False}],
    ids=["safetensors", "sharded", "pytorch-bin"],
)
def test_hf_round_trip_through_cli(tmp_path, save_kwargs):
    hf = tiny_hf_model(seed=3, tie_word_embeddings=bool(save_kwargs))
    hf.save_pretrained(tmp_path / "hf", **save_kwargs)
    if save_kwargs.get("max_shard_size"):
        assert len(list((tmp_path / "hf").glob("*.safetensors"))) > 1
    assert convert_main([str(tmp_path / "hf"), "--out", str(tmp_path / "jax")]) == 0
    _assert_parity(hf, tmp_path / "jax")


def test_bfloat16_conversion(tmp_path):
    hf = tiny_hf_model(seed=4)
    hf.save_pretrained(tmp_path / "hf")
    convert(str(tmp_path / "hf"), tmp_path / "jax", dtype="bfloat16")
    model = load_model(tmp_path / "jax")
    assert {leaf.dtype for leaf in jax.tree.leaves(model.params)} == {np.dtype("bfloat16")}
    as_f32 = load_model(tmp_path / "jax", dtype="float32")
    assert as_f32.params["embed"].dtype == np.float32


def _write_tiny_gguf(hf, path):
    """A llama.cpp-style GGUF of ``hf``: F32 tensors, Q/K rows permuted as llama.cpp does."""
    import gguf

    cfg = hf.config
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads

    def permute(w, n):  # llama.cpp convert_hf_to_gguf.py's LlamaModel.permute
        return w.reshape(n, 2, w.shape[0] // n // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    names = {
        "input_layernorm": "attn_norm",
        "post_attention_layernorm": "ffn_norm",
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
    }
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_dimension_count(cfg.hidden_size // heads)
    for name, tensor in hf.state_dict().items():
        w = tensor.float().numpy()
        if name == "model.embed_tokens.weight":
            gguf_name = "token_embd.weight"
        elif name == "model.norm.weight":
            gguf_name = "output_norm.weight"
        elif name == "lm_head.weight":
            if cfg.tie_word_embeddings:
                continue  # llama.cpp stores no output tensor for tied heads
            gguf_name = "output.weight"
        else:
            _, _, index, rest = name.split(".", 3)
            module = rest.rsplit(".", 1)[0]
            gguf_name = f"blk.{index}.{names[module]}.weight"
            if module == "self_attn.q_proj":
                w = permute(w, heads)
            elif module == "self_attn.k_proj":
                w = permute(w, kv_heads)
        writer.add_tensor(gguf_name, np.ascontiguousarray(w))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("tied", [False, True])
def test_gguf_round_trip_undoes_rope_permutation(tmp_path, tied):
    hf = tiny_hf_model(seed=5, tie_word_embeddings=tied)
    _write_tiny_gguf(hf, tmp_path / "tiny.gguf")
    convert(str(tmp_path / "tiny.gguf"), tmp_path / "jax")
    model = _assert_parity(hf, tmp_path / "jax")
    assert model.config.tie_word_embeddings == tied
    assert model.tokenizer is None  # this GGUF carries no tokenizer


def test_undo_rope_permutation_inverts_llama_cpp():
    w = np.arange(8 * 4 * 3, dtype=np.float32).reshape(8 * 4, 3)
    permuted = w.reshape(4, 2, 4, 3).swapaxes(1, 2).reshape(w.shape)
    np.testing.assert_array_equal(undo_rope_permutation(permuted, 4), w)


# ----------------------------------------------------------------------------- failures
def _saved(tmp_path, **overrides):
    hf = tiny_hf_model(**overrides)
    hf.save_pretrained(tmp_path / "hf")
    return tmp_path / "hf"


def test_unsupported_architecture_is_a_clear_error(tmp_path, capsys):
    src = _saved(tmp_path)
    config = json.loads((src / "config.json").read_text())
    config.update(model_type="mistral", architectures=["MistralForCausalLM"])
    (src / "config.json").write_text(json.dumps(config))
    assert convert_main([str(src), "--out", str(tmp_path / "out")]) == 2
    assert "unsupported architecture" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_shape_mismatch_names_the_tensor_and_leaves_nothing(tmp_path):
    src = _saved(tmp_path)
    config = json.loads((src / "config.json").read_text())
    config["intermediate_size"] = 128
    (src / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConversionError, match=r"shape mismatch for 'model\.layers\.0\.mlp"):
        convert(str(src), tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_missing_weights_and_missing_tensors(tmp_path):
    src = _saved(tmp_path)
    (src / "model.safetensors").rename(tmp_path / "moved.safetensors")
    with pytest.raises(ConversionError, match="no weights"):
        convert(str(src), tmp_path / "out")
    config = json.loads((src / "config.json").read_text())
    config["num_hidden_layers"] = 5  # the weights only have 4
    (src / "config.json").write_text(json.dumps(config))
    (tmp_path / "moved.safetensors").rename(src / "model.safetensors")
    with pytest.raises(ConversionError, match="missing 9 tensor"):
        convert(str(src), tmp_path / "out")


def test_not_a_source(tmp_path):
    with pytest.raises(ConversionError, match="neither an existing directory"):
        convert(str(tmp_path / "nowhere"), tmp_path / "out")
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf at all")
    with pytest.raises(ConversionError, match="not a readable GGUF"):
        convert(str(tmp_path / "junk.gguf"), tmp_path / "out")


def test_existing_output_is_kept_unless_overwrite(tmp_path):
    src = _saved(tmp_path)
    convert(str(src), tmp_path / "out")
    before = load_model(tmp_path / "out").fingerprint
    with pytest.raises(FileExistsError):
        convert(str(src), tmp_path / "out")
    hf = tiny_hf_model(seed=9)
    hf.save_pretrained(tmp_path / "hf2")
    convert(str(tmp_path / "hf2"), tmp_path / "out", overwrite=True)
    after = load_model(tmp_path / "out")
    assert after.fingerprint != before
    _assert_parity(hf, tmp_path / "out")


def test_incomplete_directory_does_not_load(tmp_path):
    src = _saved(tmp_path)
    convert(str(src), tmp_path / "out")
    (tmp_path / "out" / "yoro_jax.json").unlink()
    with pytest.raises(CheckpointError, match="not a complete yoro-jax model directory"):
        load_model(tmp_path / "out")


def test_a_killed_writer_leaves_nothing_the_next_one_trips_over(tmp_path):
    """SIGKILL inside ``atomic_directory`` leaves its hidden partial dir; the next writer of
    the same output removes it (its pid is dead) and writes the output."""
    import subprocess
    import sys

    from yoro_jax.checkpoint import atomic_directory

    out = tmp_path / "model"
    script = (
        "import os, sys\n"
        "from yoro_jax.checkpoint import atomic_directory\n"
        "with atomic_directory(sys.argv[1]) as tmp:\n"
        "    (tmp / 'half-written').write_text('x')\n"
        "    os.kill(os.getpid(), 9)\n"
    )
    killed = subprocess.run([sys.executable, "-c", script, str(out)], capture_output=True)
    assert killed.returncode == -9
    [left] = tmp_path.glob(".model.partial-*")
    assert not out.exists()
    with atomic_directory(out) as tmp:
        (tmp / "done").write_text("ok")
    assert not left.exists() and (out / "done").read_text() == "ok"
    assert [p.name for p in tmp_path.iterdir()] == ["model"]
