"""KV-cached generation: equals full recomputation, batches exactly, samples reproducibly."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.conftest import params_from_hf, random_batch, tiny_hf_model
from yoro_jax import llama
from yoro_jax.batch import left_pad
from yoro_jax.decoders import unscanned
from yoro_jax.generate import LlamaDecoder, advance, bucket, generate_tokens, step
from yoro_jax.sampling import SamplingConfig, sample_tokens


@pytest.fixture(scope="module")
def tiny():
    cfg, params = params_from_hf(tiny_hf_model(seed=11))
    return cfg, params, LlamaDecoder(cfg)


@pytest.mark.parametrize("layout", ["stacked", "unscanned"])
def test_cached_decode_equals_full_recomputation(tiny, layout):
    """Prefill + step-by-step decode logits == one full forward pass, left-padded batch,
    with the layers stacked (one scan) or unscanned (a loop, per-layer caches)."""
    cfg, params, decoder = tiny
    forward_params = params
    if layout == "unscanned":
        params = unscanned(params)
        assert llama.is_unscanned(params["layers"])
    rng = np.random.RandomState(0)
    lengths, width, steps = [16, 5, 11], 16, 12
    prompt, valid = random_batch(rng, lengths, cfg.vocab_size, width)
    continuation = rng.randint(3, cfg.vocab_size, (len(lengths), steps)).astype(np.int32)

    kv_valid = jnp.zeros((3, width + steps), bool).at[:, :width].set(valid)
    logits, caches = decoder.prefill(params, prompt, valid, kv_valid)
    cached = [np.asarray(logits)]
    positions = valid.sum(1)
    for i in range(steps - 1):
        slot = width + i
        kv_valid = kv_valid.at[:, slot].set(True)
        logits, caches = step(
            decoder,
            params,
            caches,
            continuation[:, i : i + 1],
            (positions + i)[:, None],
            kv_valid,
            slot,
        )
        cached.append(np.asarray(logits))
    cached = np.stack(cached, axis=1)  # [B, steps, V]

    full_tokens = np.concatenate([prompt, continuation], axis=1)
    full_valid = np.concatenate([valid, np.ones_like(continuation, bool)], axis=1)
    full = np.asarray(llama.forward(cfg, forward_params, full_tokens, full_valid))
    np.testing.assert_allclose(cached, full[:, width - 1 : width + steps - 1], atol=1e-5)
    if layout == "unscanned":  # one buffer per layer: a tuple of per-layer caches
        assert isinstance(caches, tuple) and len(caches) == cfg.num_hidden_layers


_jit_forward = jax.jit(llama.forward, static_argnums=0)


def _naive_greedy(cfg, params, prompt, n, width=64):
    """Recompute the whole sequence for every token (what the PyTorch original does).

    The sequence is left-padded to a fixed width so the forward pass compiles once.
    """
    tokens = list(prompt)
    for _ in range(n):
        x, valid = left_pad([tokens], width, pad_id=0)
        logits = _jit_forward(cfg, params, x, valid)
        tokens.append(int(np.argmax(np.asarray(logits)[0, -1])))
    return tokens[len(prompt) :]


def test_batched_greedy_generation_equals_naive_loop(tiny):
    cfg, params, decoder = tiny
    rng = np.random.RandomState(1)
    prompts = [list(rng.randint(3, cfg.vocab_size, n)) for n in (3, 17, 9)]
    out = generate_tokens(decoder, params, prompts, max_new_tokens=20, eos_ids=[], pad_id=0)
    for prompt, completion in zip(prompts, out, strict=True):
        assert completion.tokens == _naive_greedy(cfg, params, prompt, 20)
        assert completion.finish_reason == "length"


def test_chunked_and_streamed_generation_equal_one_call(tiny):
    cfg, params, decoder = tiny
    prompts = [[5, 6, 7, 8], [9, 10]]
    kwargs = dict(max_new_tokens=13, eos_ids=[], pad_id=0, sampling=SamplingConfig(0.8), seed=3)
    whole = generate_tokens(decoder, params, prompts, **kwargs)
    seen = []
    streamed = generate_tokens(decoder, params, prompts, chunk=4, on_update=seen.append, **kwargs)
    assert [c.tokens for c in streamed] == [c.tokens for c in whole]
    assert [len(rows[0]) for rows in seen] == [1, 5, 9, 13]


def test_sampling_is_seeded_and_rows_independent(tiny):
    cfg, params, decoder = tiny
    prompts = [[5, 6, 7, 8]] * 2
    kwargs = dict(max_new_tokens=16, eos_ids=[], pad_id=0, sampling=SamplingConfig(1.0))
    a = generate_tokens(decoder, params, prompts, seed=0, **kwargs)
    b = generate_tokens(decoder, params, prompts, seed=0, **kwargs)
    c = generate_tokens(decoder, params, prompts, seed=1, **kwargs)
    assert [x.tokens for x in a] == [x.tokens for x in b]
    assert a[0].tokens != c[0].tokens
    assert a[0].tokens != a[1].tokens  # same prompt, different rows, different samples


def test_eos_stops_a_row_and_others_continue(tiny):
    cfg, params, decoder = tiny
    prompts = [[5, 6, 7], [40, 41, 42, 43, 44]]
    free = generate_tokens(decoder, params, prompts, max_new_tokens=10, eos_ids=[], pad_id=0)
    eos = free[0].tokens[3]
    assert eos not in free[0].tokens[:3]
    out = generate_tokens(decoder, params, prompts, max_new_tokens=10, eos_ids=[eos], pad_id=0)
    assert out[0].tokens == free[0].tokens[:4] and out[0].finish_reason == "eos"
    expected_other = free[1].tokens
    if eos in expected_other:
        expected_other = expected_other[: expected_other.index(eos) + 1]
    assert out[1].tokens == expected_other


class LetterTokenizer:
    """Token t decodes to the letter chr(97 + t % 26): enough to test stop strings."""

    def decode(self, tokens, skip_special_tokens=True):
        return "".join(chr(97 + int(t) % 26) for t in tokens)


def test_stop_strings_cut_text_and_tokens(tiny):
    cfg, params, decoder = tiny
    tokenizer = LetterTokenizer()
    free = generate_tokens(decoder, params, [[5, 6, 7]], max_new_tokens=24, eos_ids=[], pad_id=0)
    text = tokenizer.decode(free[0].tokens)
    stop = text[10:12]
    cut = text.find(stop)
    out = generate_tokens(
        decoder,
        params,
        [[5, 6, 7]],
        max_new_tokens=24,
        eos_ids=[],
        pad_id=0,
        tokenizer=tokenizer,
        stop=[stop],
    )
    assert out[0].finish_reason == "stop"
    assert out[0].text == text[:cut]
    assert out[0].tokens == free[0].tokens[: cut + 2]


def test_prompt_lengths_in_one_bucket_share_compiled_programs(tiny):
    cfg, params, decoder = tiny
    kwargs = dict(max_new_tokens=8, eos_ids=[], pad_id=0, chunk=4)
    generate_tokens(decoder, params, [[3] * 5, [4] * 9], **kwargs)
    compiled = advance._cache_size()
    generate_tokens(decoder, params, [[3] * 12, [4] * 2], **kwargs)
    generate_tokens(decoder, params, [[7] * 16, [8] * 16], **kwargs)
    assert advance._cache_size() == compiled
    assert bucket(5) == bucket(16) == 16 and bucket(17) == 32


def test_left_pad_layout():
    tokens, valid = left_pad([[1, 2], [3, 4, 5]], 4, pad_id=0)
    assert tokens.tolist() == [[0, 0, 1, 2], [0, 3, 4, 5]]
    assert valid.tolist() == [[False, False, True, True], [False, True, True, True]]


def test_top_k_and_top_p_filters():
    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]]))
    keys = jax.random.split(jax.random.key(0), 400)

    def draws(sampling):
        return {int(sample_tokens(logits, k, sampling)[0]) for k in keys}

    assert draws(SamplingConfig(1.0, top_k=1)) == {0}
    assert draws(SamplingConfig(1.0, top_k=2)) == {0, 1}
    assert draws(SamplingConfig(1.0, top_p=0.7)) == {0, 1}  # 0.5 < 0.7 <= 0.8
    assert draws(SamplingConfig(1.0, top_p=0.9)) == {0, 1, 2}
    assert draws(SamplingConfig(1.0)) == {0, 1, 2, 3}


@pytest.mark.parametrize(
    "kwargs,match",
    [({"temperature": -1}, "temperature"), ({"top_k": -2}, "top_k"), ({"top_p": 0}, "top_p")],
)
def test_bad_sampling_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingConfig(**kwargs)


def test_bad_generation_requests(tiny):
    cfg, params, decoder = tiny
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate_tokens(decoder, params, [[1]], max_new_tokens=0, eos_ids=[], pad_id=0)
    with pytest.raises(ValueError, match="at least one token"):
        generate_tokens(decoder, params, [[]], max_new_tokens=4, eos_ids=[], pad_id=0)


def test_recorded_top_k_matches_full_forward(tiny):
    """Teacher data: top-k log-probs recorded while decoding == log_softmax of a full pass."""
    cfg, params, decoder = tiny
    prompts = [[5, 6, 7, 8, 9], [10, 11]]
    out = generate_tokens(
        decoder, params, prompts, max_new_tokens=9, eos_ids=[], pad_id=0, record_top_k=4
    )
    for prompt, completion in zip(prompts, out, strict=True):
        assert completion.top_ids.shape == (9, 4)
        seq = np.asarray([prompt + completion.tokens], np.int32)
        logits = llama.forward(cfg, params, seq, np.ones_like(seq, bool))
        logprobs = np.asarray(jax.nn.log_softmax(logits, axis=-1))[0, len(prompt) - 1 : -1]
        assert (completion.top_ids[:, 0] == np.asarray(completion.tokens)).all()  # greedy
        expected = np.take_along_axis(logprobs, completion.top_ids, axis=-1)
        np.testing.assert_allclose(completion.top_logprobs, expected, atol=1e-5)
        assert (np.argsort(-logprobs, axis=-1)[:, :4] == completion.top_ids).all()


def test_generate_cli_checks_its_input_before_any_allocation(tmp_path, capsys):
    """Bad arguments fail before the model loads; a prompt past the model's context fails
    after tokenising and before any cache exists: one ``error:`` line, exit 2."""
    from train.tiny import tiny_random_model
    from yoro_jax.checkpoint import write_model_dir
    from yoro_jax.generate_cli import main

    model = tiny_random_model(seed=3, num_layers=2)
    write_model_dir(
        tmp_path / "model", model.config, model.params, model.tokenizer.save_pretrained, "tiny"
    )
    missing = str(tmp_path / "nothing-here")  # never loaded: the checks come first
    for args, message in [
        (["--prompt", "hi", "--max-new-tokens", "0"], "--max-new-tokens must be >= 1, got 0"),
        (["--prompt", "  "], "--prompt is empty"),
        (["--prompt", "hi", "--speculative", "0", "--yoro", missing], "needs K >= 1"),
        # argv bytes that are not UTF-8 (Latin-1 \xe9) reach Python as lone surrogates
        (["--prompt", b"caf\xe9".decode("utf-8", "surrogateescape")], "byte 0xe9 at character 3"),
    ]:
        assert main(["--model", missing, *args]) == 2
        assert message in capsys.readouterr().err
    context = model.config.max_position_embeddings
    long = "a" * context
    assert main(["--model", str(tmp_path / "model"), "--prompt", long]) == 2
    err = capsys.readouterr().err
    assert f"passes the model's context of {context} tokens" in err
