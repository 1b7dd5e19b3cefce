"""The Flax Llama computes what transformers' LlamaForCausalLM computes (float32, CPU)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.conftest import params_from_hf, random_batch, tiny_hf_model
from yoro_jax import llama

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 32,
}

CONFIGS = {
    "gqa-untied": {},
    "mha-tied": {"num_key_value_heads": 4, "tie_word_embeddings": True},
    "mqa-untied": {"num_key_value_heads": 1},
    "gqa-llama3-rope": {"rope_scaling": LLAMA3_ROPE, "rope_theta": 500000.0},
    "gqa-linear-rope": {"rope_scaling": {"rope_type": "linear", "factor": 4.0}},
    "head-dim-override": {"head_dim": 32, "num_attention_heads": 2, "num_key_value_heads": 1},
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_logits_match_transformers(name):
    hf = tiny_hf_model(seed=1, **CONFIGS[name])
    cfg, params = params_from_hf(hf)
    tokens, valid = random_batch(np.random.RandomState(0), [40, 23, 7], cfg.vocab_size, 40)
    positions = np.maximum(np.cumsum(valid, axis=1) - 1, 0)
    with torch.no_grad():
        ref = hf(
            torch.tensor(tokens, dtype=torch.long),
            attention_mask=torch.tensor(valid, dtype=torch.long),
            position_ids=torch.tensor(positions, dtype=torch.long),
        ).logits.numpy()
    ours = np.asarray(llama.forward(cfg, params, tokens, valid))
    assert np.abs(ours - ref)[valid].max() <= 1e-4


def test_padding_does_not_change_a_row():
    """A left-padded row gets exactly the logits it gets alone."""
    hf = tiny_hf_model(seed=2)
    cfg, params = params_from_hf(hf)
    tokens, valid = random_batch(np.random.RandomState(1), [12, 30], cfg.vocab_size, 30)
    batched = np.asarray(llama.forward(cfg, params, tokens, valid))
    alone = np.asarray(llama.forward(cfg, params, tokens[:1, -12:], valid[:1, -12:]))
    np.testing.assert_allclose(batched[0, -12:], alone[0], atol=1e-5)


def test_rope_variants_match_transformers_inv_freq():
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from yoro_jax.config import LlamaConfig

    for overrides in (CONFIGS["gqa-llama3-rope"], CONFIGS["gqa-linear-rope"]):
        hf_cfg = tiny_hf_model(**overrides).config
        rope_type = hf_cfg.rope_parameters["rope_type"]
        ref, _ = ROPE_INIT_FUNCTIONS[rope_type](hf_cfg, "cpu")
        ours = llama.rope_inv_freq(LlamaConfig.from_hf_dict(hf_cfg.to_dict()))
        np.testing.assert_allclose(ours, ref.numpy(), rtol=1e-6)
