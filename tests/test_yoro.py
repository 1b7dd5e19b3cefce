"""YORO: teacher forcing == "reason once" KV-cached generation, on tiny models."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.conftest import assert_greedy_choices, cached_logits, params_from_hf, tiny_hf_model
from yoro_jax import llama
from yoro_jax.batch import prompt_response_layout
from yoro_jax.checkpoint import CheckpointError, Model, load_yoro, save_yoro
from yoro_jax.config import ConfigError
from yoro_jax.decoders import YoroDecoder, unscanned
from yoro_jax.generate import generate_tokens
from yoro_jax.yoro import (
    Yoro,
    YoroConfig,
    init_trainable,
    param_summary,
)

SPLITS = {
    "reference": YoroConfig(2, 2, 2, 2, 1),
    "lean": YoroConfig(1, 1, 1, 1, 2),
    "no-embedding-block": YoroConfig(0, 2, 0, 0, 0),
}
# The variants of docs/DESIGN.md §3.4 on the 6-layer tiny base (nets perturbed in tests so
# that zero-initialised paths are non-trivial).
VARIANTS = {
    "exact (preset)": YoroConfig.preset("exact", embedding_layers=1, compensation_layers=2),
    "exact, reference nets": YoroConfig(2, 2, 2, 2, 1, prompt_context="exact"),
    "exact, no compensation": YoroConfig(1, 2, 0, 1, 2, prompt_context="exact", nets="residual"),
    "residual, identity init": YoroConfig(
        2, 1, 1, 2, 2, nets="residual", compensation_init="identity"
    ),
    "reasoning init only": YoroConfig(1, 1, 2, 2, 1, compensation_init="reasoning"),
}


def randomise_biases(trainable, key):
    """Xavier init has zero biases; random ones make the MLP paths non-trivial in tests."""
    leaves, tree = jax.tree.flatten_with_path(trainable)
    keys = jax.random.split(key, len(leaves))
    out = [
        0.1 * jax.random.normal(k, leaf.shape) if "bias" in jax.tree_util.keystr(path) else leaf
        for (path, leaf), k in zip(leaves, keys, strict=True)
    ]
    return jax.tree.unflatten(tree, out)


@pytest.fixture(scope="module")
def tiny_base():
    return params_from_hf(tiny_hf_model(seed=21, num_hidden_layers=6))


def make_yoro(tiny_base, ycfg, seed=0):
    cfg, frozen = tiny_base
    model = Yoro(cfg, ycfg)
    trainable = init_trainable(ycfg, cfg, jax.random.key(seed), frozen)
    return model, frozen, randomise_biases(trainable, jax.random.key(1))


def perturb(trainable, key, scale=0.05):
    """Noise on every trainable leaf: zero-initialised layers become non-trivial."""
    leaves, tree = jax.tree.flatten(trainable)
    keys = jax.random.split(key, len(leaves))
    return jax.tree.unflatten(
        tree, [a + scale * jax.random.normal(k, a.shape) for a, k in zip(leaves, keys, strict=True)]
    )


def check_core_invariant(model, frozen, trainable):
    """Greedy generation, then teacher forcing on its output at another prompt boundary
    (13 vs the generator's 16): same greedy tokens, logits equal to 1e-4."""
    rng = np.random.RandomState(0)
    prompts = [list(rng.randint(3, 256, n)) for n in (7, 13, 3)]
    completions = generate_tokens(
        YoroDecoder(model), (frozen, trainable), prompts, max_new_tokens=20, eos_ids=[], pad_id=0
    )
    responses = [c.tokens for c in completions]
    assert all(len(r) == 20 for r in responses)

    tokens, valid, _ = prompt_response_layout(prompts, responses, 13, 13 + 20, 0)
    tf = np.asarray(jax.jit(model.forward, static_argnums=4)(frozen, trainable, tokens, valid, 13))
    predicting = tf[:, 12:-1]  # positions P-1 .. T-2 predict the 20 response tokens
    assert_greedy_choices(predicting, responses)

    cached = cached_logits(
        YoroDecoder(model), (frozen, trainable), prompts, np.asarray(responses, np.int32), width=16
    )
    np.testing.assert_allclose(cached, predicting, atol=1e-4)


@pytest.mark.parametrize("split", sorted(SPLITS))
def test_cached_generation_equals_teacher_forcing(tiny_base, split):
    check_core_invariant(*make_yoro(tiny_base, SPLITS[split]))


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_variant_cached_generation_equals_teacher_forcing(tiny_base, variant):
    model, frozen, trainable = make_yoro(tiny_base, VARIANTS[variant])
    check_core_invariant(model, frozen, perturb(trainable, jax.random.key(5)))


@pytest.mark.parametrize(
    "ycfg, keep",
    [
        (SPLITS["reference"], None),
        (VARIANTS["exact (preset)"], None),
        (SPLITS["reference"], (1, 0)),  # a reasoning layer skipped: the gated loop
    ],
    ids=["reference", "exact", "gated"],
)
def test_unscanned_layers_decode_like_the_stack(tiny_base, ycfg, keep):
    """Generation from unscanned params (a tuple of layers, per-layer caches) gives the
    stacked layout's tokens and logits: the layout changes speed, not results."""
    model, frozen, trainable = make_yoro(tiny_base, ycfg)
    trainable = perturb(trainable, jax.random.key(5))
    decoder = YoroDecoder(model, keep_layers=keep)
    rng = np.random.RandomState(3)
    prompts = [list(rng.randint(3, 256, n)) for n in (7, 12)]
    stacked, loose = (frozen, trainable), unscanned((frozen, trainable))
    assert llama.is_unscanned(loose[0]["layers"]) and llama.is_unscanned(loose[1]["compensation"])
    opts = dict(max_new_tokens=12, eos_ids=[], pad_id=0)
    expected = [c.tokens for c in generate_tokens(decoder, stacked, prompts, **opts)]
    assert [c.tokens for c in generate_tokens(decoder, loose, prompts, **opts)] == expected
    forced = np.asarray(expected, np.int32)
    np.testing.assert_allclose(
        cached_logits(decoder, loose, prompts, forced, width=16),
        cached_logits(decoder, stacked, prompts, forced, width=16),
        atol=1e-5,
    )


def test_exact_residual_nets_at_step_0_skip_the_middle_layers_exactly(tiny_base):
    """Preset "exact" before training == the base model with reasoning layers 1 and 2
    skipped on response tokens (E1, Lc1 = a copy of layer 3, C2), every layer that runs
    attending over the full model's own prompt KV at its depth: the training-free floor."""
    cfg, frozen = tiny_base
    ycfg = YoroConfig.preset("exact", embedding_layers=1, compensation_layers=1)
    model = Yoro(cfg, ycfg)
    trainable = init_trainable(ycfg, cfg, jax.random.key(0), frozen)  # as initialised
    prompts, responses = [[5, 6, 7, 8, 9], [10] * 8], [[3, 4, 5, 6], [7, 8, 9]]
    tokens, valid, _ = prompt_response_layout(prompts, responses, 8, 12, 0)
    tf = np.asarray(model.forward(frozen, trainable, tokens, valid, 8))

    from yoro_jax.generate import LlamaDecoder

    _, caches = LlamaDecoder(cfg).prefill(frozen, tokens[:, :8], valid[:, :8], valid)
    rope = llama.rope_tables(cfg, llama.positions_from_valid(valid)[:, 8:])
    mask = llama.attention_mask(valid, 8, 4)
    kept = np.array([0, 3, 4, 5])
    h, _ = llama.run_layers(
        cfg,
        jax.tree.map(lambda a: a[kept], frozen["layers"]),
        llama.embed_tokens(frozen, tokens[:, 8:]),
        rope,
        mask,
        jax.tree.map(lambda a: a[kept], caches),
        8,
    )
    skipped = np.asarray(llama.head(cfg, frozen, h))
    np.testing.assert_allclose(tf[:, 8:], skipped, atol=1e-5)
    full = np.asarray(llama.forward(cfg, frozen, tokens, valid))
    np.testing.assert_allclose(tf[:, :8][valid[:, :8]], full[:, :8][valid[:, :8]], atol=1e-5)
    assert np.abs(tf[:, 8:] - full[:, 8:]).max() > 1e-2  # skipping really changes the answer


def naive_yoro_generate(model: Yoro, frozen, trainable, prompt, n, width=48):
    """The original's algorithm: recompute everything from scratch for every new token.

    Written from the layer primitives, independently of Yoro.hidden_states. Sequences are
    right-padded to a fixed width (causal, so padding after position n-1 changes nothing).
    """
    cfg, ycfg, p = model.base, model.ycfg, len(prompt)
    layers, depth = frozen["layers"], cfg.num_hidden_layers
    emb = llama.slice_layers(layers, 0, ycfg.embedding_layers)
    reason = llama.slice_layers(layers, ycfg.embedding_layers, depth - ycfg.coherence_layers)
    coh = llama.slice_layers(layers, depth - ycfg.coherence_layers, depth)

    @jax.jit
    def last_logits(tokens, n_real):
        valid = jnp.arange(width)[None] < n_real
        rope = llama.rope_tables(cfg, jnp.arange(width)[None])
        mask = llama.attention_mask(valid, 0, width)
        e = llama.run_layers(cfg, emb, llama.embed_tokens(frozen, tokens), rope, mask)[0]
        prompt_rope = tuple(t[:, :p] for t in rope)
        r = llama.run_layers(cfg, reason, e[:, :p], prompt_rope, mask[:, :p, :p])[0]
        first = llama.head(
            cfg, frozen, llama.run_layers(cfg, coh, r, prompt_rope, mask[:, :p, :p])[0]
        )
        r_padded = jnp.concatenate([r, jnp.zeros((1, width - p, cfg.hidden_size))], axis=1)
        comp = llama.run_layers(cfg, trainable["compensation"], e, rope, mask)[0]
        z = model.concat(trainable, model.adapt(trainable, r_padded) + comp)
        rest = llama.head(cfg, frozen, llama.run_layers(cfg, coh, z, rope, mask)[0])
        return jnp.where(n_real == p, first[0, p - 1], rest[0, n_real - 1])

    seq = list(prompt)
    for _ in range(n):
        padded = np.zeros((1, width), np.int32)
        padded[0, : len(seq)] = seq
        seq.append(int(np.argmax(np.asarray(last_logits(padded, len(seq))))))
    return seq[p:]


def test_cached_generation_equals_naive_full_recompute(tiny_base):
    model, frozen, trainable = make_yoro(tiny_base, SPLITS["reference"], seed=3)
    rng = np.random.RandomState(4)
    prompts = [list(rng.randint(3, 256, n)) for n in (5, 11)]
    completions = generate_tokens(
        YoroDecoder(model), (frozen, trainable), prompts, max_new_tokens=16, eos_ids=[], pad_id=0
    )
    for prompt, completion in zip(prompts, completions, strict=True):
        assert completion.tokens == naive_yoro_generate(model, frozen, trainable, prompt, 16)


def test_reasoning_block_runs_once_per_generate_call(tiny_base, monkeypatch):
    model, frozen, trainable = make_yoro(tiny_base, SPLITS["reference"])
    executions = []
    original = Yoro.reason

    def counted(self, *args, **kwargs):
        jax.debug.callback(lambda: executions.append(1))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Yoro, "reason", counted)
    jax.clear_caches()  # make sure the counting version is what gets traced
    for max_new, chunk in ((24, None), (17, 4)):
        executions.clear()
        out = generate_tokens(
            YoroDecoder(model),
            (frozen, trainable),
            [[5, 6, 7], [8, 9]],
            max_new_tokens=max_new,
            eos_ids=[],
            pad_id=0,
            chunk=chunk,
        )
        assert len(out[0].tokens) == max_new
        assert len(executions) == 1
    jax.clear_caches()


def test_only_trainable_params_get_gradients(tiny_base):
    model, frozen, trainable = make_yoro(tiny_base, SPLITS["reference"])
    tokens, valid, response = prompt_response_layout(
        [[5, 6, 7], [9] * 6], [[3, 4], [8, 8, 8]], 6, 10, 0
    )

    def loss(trainable, frozen):
        hidden, _ = model.response_hidden(frozen, trainable, tokens, valid, 6)
        return jnp.sum(model.logits(frozen, hidden) ** 2) * 1e-6

    grads = jax.jit(jax.grad(loss))(trainable, frozen)
    assert jax.tree.structure(grads) == jax.tree.structure(trainable)
    for path, g in jax.tree.flatten_with_path(grads)[0]:
        assert float(jnp.abs(g).max()) > 0, jax.tree_util.keystr(path)
    # frozen params are not an argument of differentiation: the gradient computation's
    # outputs are exactly the trainable leaves
    jaxpr = jax.make_jaxpr(jax.grad(loss))(trainable, frozen)
    assert len(jaxpr.out_avals) == len(jax.tree.leaves(trainable))


def test_response_hidden_selects_the_predicting_positions(tiny_base):
    model, frozen, trainable = make_yoro(tiny_base, SPLITS["lean"])
    tokens, valid, _ = prompt_response_layout([[5, 6, 7], [9] * 6], [[3, 4], [8, 8, 8]], 6, 10, 0)
    full = np.asarray(model.forward(frozen, trainable, tokens, valid, 6))
    hidden, _ = model.response_hidden(frozen, trainable, tokens, valid, 6)
    np.testing.assert_allclose(np.asarray(model.logits(frozen, hidden)), full[:, 5:], atol=1e-6)


@pytest.mark.parametrize(
    "ycfg,match",
    [
        (YoroConfig(3, 3), "leaves no reasoning layer"),
        (YoroConfig(embedding_layers=-1), "embedding_layers must be an integer >= 0"),
        (YoroConfig(adaptation_layers=1.5), "adaptation_layers must be an integer"),
        (YoroConfig(prompt_context="full"), "prompt_context: 'full' is not one of yoro, exact"),
        (YoroConfig(nets="deep"), "nets: 'deep' is not one of reference, residual"),
        (YoroConfig(2, 2, 3, prompt_context="exact"), "compensation_layers \\(3\\) stand for"),
    ],
)
def test_invalid_splits_are_config_errors(tiny_base, ycfg, match):
    with pytest.raises(ConfigError, match=match):
        Yoro(tiny_base[0], ycfg)


def test_param_summary(tiny_base):
    model, frozen, trainable = make_yoro(tiny_base, SPLITS["reference"])
    summary = param_summary(model, frozen, trainable)
    per_layer = sum(x[0].size for x in jax.tree.leaves(frozen["layers"]))
    assert summary["reasoning_layers"] == 2
    assert summary["executed_per_token_full"] - summary["executed_per_token_yoro"] == (
        2 * per_layer
        - sum(x.size for x in jax.tree.leaves(trainable["compensation"]))
        - sum(x.size for x in jax.tree.leaves(trainable["concatenation"]))
    )
    assert summary["trainable"] == sum(x.size for x in jax.tree.leaves(trainable))


@pytest.mark.parametrize("ycfg", [SPLITS["lean"], VARIANTS["exact (preset)"]])
def test_save_load_round_trip_and_base_mismatch(tiny_base, tmp_path, ycfg):
    model, frozen, trainable = make_yoro(tiny_base, ycfg)
    base = Model(tiny_base[0], frozen, None, tmp_path / "base", "a" * 64)
    save_yoro(tmp_path / "nets", ycfg, trainable, base.path, base.fingerprint)
    loaded_cfg, loaded, _ = load_yoro(tmp_path / "nets", base)
    assert loaded_cfg == ycfg
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(trainable), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    other = Model(tiny_base[0], frozen, None, tmp_path / "other", "b" * 64)
    with pytest.raises(CheckpointError, match="trained on a different base model"):
        load_yoro(tmp_path / "nets", other)
    with pytest.raises(CheckpointError, match="no trained YORO nets"):
        load_yoro(tmp_path, base)


def test_damaged_nets_fail_with_their_path(tiny_base, tmp_path):
    cfg, frozen = tiny_base
    model, _, trainable = make_yoro(tiny_base, SPLITS["reference"])
    base = Model(cfg, frozen, None, tmp_path / "base", "f" * 64)
    save_yoro(tmp_path / "nets", model.ycfg, trainable, base.path, base.fingerprint)
    files = [p for p in (tmp_path / "nets").rglob("*") if p.is_file() and p.stat().st_size]
    biggest = max(files, key=lambda p: p.stat().st_size)
    biggest.write_bytes(biggest.read_bytes()[: biggest.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="trainable: the saved arrays do not load"):
        load_yoro(tmp_path / "nets", base)


@pytest.mark.parametrize("ycfg", [SPLITS["lean"], VARIANTS["exact (preset)"]])
def test_format_1_directories_are_upgraded_on_load(tiny_base, tmp_path, ycfg):
    """Directories written before the layers were stacked (a list of layers) load into the
    stacked layout bitwise, and the model's fingerprint is the same in both formats."""
    import json

    from yoro_jax import checkpoint

    cfg, frozen = tiny_base
    model, frozen, trainable = make_yoro(tiny_base, ycfg)
    listed = {**frozen, "layers": llama.unstack_layers(frozen["layers"])}
    old_dir = tmp_path / "base-v1"
    old_dir.mkdir()
    cfg.save(old_dir / checkpoint.CONFIG_FILE)
    checkpoint.save_pytree(old_dir / checkpoint.PARAMS_DIR, listed)
    meta = {
        "format_version": 1,
        "source": "test",
        "dtype": "float32",
        "fingerprint": checkpoint.params_fingerprint(listed),
    }
    (old_dir / checkpoint.META_FILE).write_text(json.dumps(meta))
    base = checkpoint.load_model(old_dir)
    assert base.fingerprint == checkpoint.params_fingerprint(frozen)  # format-independent
    for a, b in zip(jax.tree.leaves(base.params), jax.tree.leaves(frozen), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    nets = tmp_path / "nets-v1"
    old_nets = {**trainable, "compensation": llama.unstack_layers(trainable["compensation"])}
    save_yoro(nets, ycfg, old_nets, old_dir, base.fingerprint)
    saved = json.loads((nets / checkpoint.YORO_CONFIG_FILE).read_text())
    del saved["format_version"]  # as version 1 wrote it
    (nets / checkpoint.YORO_CONFIG_FILE).write_text(json.dumps(saved))
    _, loaded, _ = load_yoro(nets, base)
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(trainable), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
