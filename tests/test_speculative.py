"""Self-speculative decoding: the full model's output, exactly, whatever the draft."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest
from scipy import stats as scipy_stats

from tests.conftest import params_from_hf, tiny_hf_model
from tests.test_generate import LetterTokenizer
from tests.test_yoro import perturb, randomise_biases
from yoro_jax import llama
from yoro_jax.decoders import LlamaDecoder, YoroDecoder, unscanned
from yoro_jax.generate import generate_tokens
from yoro_jax.sampling import SamplingConfig
from yoro_jax.speculative import SpeculativeDecoder
from yoro_jax.yoro import Yoro, YoroConfig, init_trainable

# on the 6-layer tiny base: E1 + 4 reasoning + C1; Lc1 skips three reasoning layers
EXACT = YoroConfig.preset("exact", embedding_layers=1, coherence_layers=1, compensation_layers=1)
DRAFTS = {
    "exact": (EXACT, None),  # exact context: caches shared with the verifier
    "reference": (YoroConfig(1, 1, 2, 2, 1), None),  # reference nets: own caches
    "exact, gated": (EXACT, (1, 0, 1, 1)),  # a reasoning layer gated off: own caches too
}
# Lc = all four reasoning layers, copied, residual nets at zero: the draft *is* the full model
PERFECT = YoroConfig.preset("exact", embedding_layers=1, coherence_layers=1, compensation_layers=4)


@pytest.fixture(scope="module")
def tiny_base():
    return params_from_hf(tiny_hf_model(seed=21, num_hidden_layers=6))


def make_spec(tiny_base, ycfg, keep=None, k=3, noise=0.05):
    cfg, frozen = tiny_base
    model = Yoro(cfg, ycfg)
    trainable = init_trainable(ycfg, cfg, jax.random.key(0), frozen)
    if noise:
        trainable = perturb(randomise_biases(trainable, jax.random.key(1)), jax.random.key(5))
    return SpeculativeDecoder(YoroDecoder(model, keep_layers=keep), k=k), (frozen, trainable)


def prompts_of(lengths, seed=0, vocab=256):
    rng = np.random.RandomState(seed)
    return [list(rng.randint(3, vocab, n)) for n in lengths]


def full_greedy(tiny_base, prompts, **opts):
    cfg, frozen = tiny_base
    return [c.tokens for c in generate_tokens(LlamaDecoder(cfg), frozen, prompts, **opts)]


@pytest.mark.parametrize(
    "draft, k", [("exact", 1), ("exact", 3), ("reference", 3), ("exact, gated", 2)]
)
def test_greedy_output_is_the_full_models(tiny_base, draft, k):
    """Untrained (perturbed) nets: the draft rarely agrees, the output is still exact."""
    ycfg, keep = DRAFTS[draft]
    spec, params = make_spec(tiny_base, ycfg, keep, k=k)
    prompts = prompts_of((7, 13, 3))
    opts = dict(max_new_tokens=19, eos_ids=[], pad_id=0)
    stats = {}
    out = generate_tokens(spec, params, prompts, stats=stats, **opts)
    assert [c.tokens for c in out] == full_greedy(tiny_base, prompts, **opts)
    assert all(c.finish_reason == "length" for c in out)
    assert stats["verify_passes"] >= 1 and 1 <= stats["tokens_per_verify"] <= k + 1


@pytest.mark.parametrize("layout", ["stacked", "unscanned"])
def test_a_perfect_draft_keeps_every_proposal(tiny_base, layout):
    """A draft equal to the full model: every cycle keeps k + 1 tokens, output unchanged."""
    spec, params = make_spec(tiny_base, PERFECT, k=3, noise=0)
    if layout == "unscanned":
        params = unscanned(params)
    prompts = prompts_of((9, 4))
    opts = dict(max_new_tokens=17, eos_ids=[], pad_id=0)
    stats = {}
    out = generate_tokens(spec, params, prompts, stats=stats, **opts)
    assert [c.tokens for c in out] == full_greedy(tiny_base, prompts, **opts)
    # 1 token from the prefill, then 4 per verify pass: 17 = 1 + 4 * 4
    assert stats["verify_passes"] == 4 and stats["tokens_per_verify"] == 4.0
    assert stats["acceptance_rate"] == 1.0


def test_batched_rows_accepting_differently_give_their_single_prompt_results(tiny_base):
    """Rows of a batch keep different numbers of proposals per pass (each its own slot):
    each row's tokens and acceptance equal that prompt's alone."""
    spec, params = make_spec(tiny_base, EXACT, k=4, noise=0)  # the step-0 floor: agrees often
    prompts = prompts_of((5, 14, 9, 2), seed=4)
    opts = dict(max_new_tokens=24, eos_ids=[], pad_id=0)
    stats = {}
    batch = [c.tokens for c in generate_tokens(spec, params, prompts, stats=stats, **opts)]
    alone, alone_stats = [], []
    for prompt in prompts:
        alone_stats.append({})
        alone += [generate_tokens(spec, params, [prompt], stats=alone_stats[-1], **opts)[0].tokens]
    assert batch == alone == full_greedy(tiny_base, prompts, **opts)
    assert len({st["verify_passes"] for st in alone_stats}) > 1  # rows really differ
    assert stats["row_passes"] == sum(st["verify_passes"] for st in alone_stats)
    assert stats["proposals_kept"] == sum(st["proposals_kept"] for st in alone_stats)
    assert stats["verify_passes"] == max(st["verify_passes"] for st in alone_stats)


def test_eos_and_stop_strings_behave_as_in_normal_generation(tiny_base):
    cfg, frozen = tiny_base
    spec, params = make_spec(tiny_base, DRAFTS["exact"][0], k=3, noise=0)
    prompts = prompts_of((6, 11), seed=2)
    free = full_greedy(tiny_base, prompts, max_new_tokens=20, eos_ids=[], pad_id=0)
    eos = [free[0][7]]  # a token row 0 makes mid-answer
    opts = dict(max_new_tokens=20, eos_ids=eos, pad_id=0)
    normal = generate_tokens(LlamaDecoder(cfg), frozen, prompts, **opts)
    spec_out = generate_tokens(spec, params, prompts, **opts)
    assert [(c.tokens, c.finish_reason) for c in spec_out] == [
        (c.tokens, c.finish_reason) for c in normal
    ]
    assert spec_out[0].finish_reason == "eos"

    tokenizer = LetterTokenizer()
    stop = [tokenizer.decode(free[1][9:11])]
    opts = dict(max_new_tokens=20, eos_ids=[], pad_id=0, tokenizer=tokenizer, stop=stop)
    normal = generate_tokens(LlamaDecoder(cfg), frozen, prompts, **opts)
    spec_out = generate_tokens(spec, params, prompts, **opts)
    assert [(c.tokens, c.text, c.finish_reason) for c in spec_out] == [
        (c.tokens, c.text, c.finish_reason) for c in normal
    ]
    assert spec_out[1].finish_reason == "stop"


# ------------------------------------------------------------------ speculative sampling
VOCAB = 8
SAMPLING = SamplingConfig(temperature=0.05, top_k=6)  # a peaked, truncated p on 8 tokens
P_MIN = 1e-3  # a correct sampler fails a test at this level once in a thousand seeds


@pytest.fixture(scope="module")
def tiny_vocab():
    return params_from_hf(tiny_hf_model(seed=3, num_hidden_layers=6, vocab_size=VOCAB))


def exact_pairs(cfg, frozen, prompt):
    """The full model's joint distributions of (t0, t1) and (t1, t2) under SAMPLING."""
    from yoro_jax.sampling import filtered_logits

    def probs(prefixes):
        tokens = np.asarray([prompt + list(p) for p in prefixes], np.int32)
        logits = llama.forward(cfg, frozen, tokens, np.ones_like(tokens, bool))[:, -1]
        return np.asarray(jax.nn.softmax(filtered_logits(logits, SAMPLING), axis=-1), np.float64)

    p0 = probs([()])[0]  # [V]
    p1 = probs([(a,) for a in range(VOCAB)])  # [V(t0), V(t1)]
    p2 = probs([(a, b) for a in range(VOCAB) for b in range(VOCAB)]).reshape(VOCAB, VOCAB, VOCAB)
    joint01 = p0[:, None] * p1
    joint12 = np.einsum("ab,abc->bc", joint01, p2)
    return joint01, joint12


def chi2_pvalue(observed_pairs, expected_joint):
    counts = np.zeros_like(expected_joint)
    np.add.at(counts, tuple(observed_pairs.T), 1)
    expected = expected_joint * len(observed_pairs)
    keep = expected > 0
    if counts[~keep].sum():  # a pair the full model gives probability 0 (top-k cut it)
        return 0.0
    # pool cells expected < 5 into one (the chi-square approximation needs counts)
    small = keep & (expected < 5)
    obs = np.append(counts[keep & ~small], counts[small].sum())
    exp = np.append(expected[keep & ~small], expected[small].sum())
    if exp[-1] == 0:
        obs, exp = obs[:-1], exp[:-1]
    exp = exp * obs.sum() / exp.sum()  # float32 softmax: sums off by ~1e-7
    return scipy_stats.chisquare(obs, exp).pvalue


@pytest.mark.parametrize("draft", ["exact", "reference"])
def test_speculative_sampling_keeps_the_full_models_distribution(tiny_vocab, draft):
    """2048 rows sample 3 tokens each (k = 2: tokens 1 and 2 go through acceptance and
    residual resampling); chi-square of (t0, t1) and (t1, t2) against the full model's
    exact joint probabilities, p > 1e-3. The draft's own samples must fail the same test
    (the test has power), which also shows the draft's distribution differs."""
    cfg, frozen = tiny_vocab
    ycfg, _ = DRAFTS[draft]
    spec, params = make_spec(tiny_vocab, ycfg, k=2, noise=0.5)
    prompt = [3, 1, 4, 1, 5]
    joint01, joint12 = exact_pairs(cfg, frozen, prompt)
    opts = dict(max_new_tokens=3, eos_ids=[], pad_id=0, sampling=SAMPLING)
    rows = []
    for seed in range(2):
        out = generate_tokens(spec, params, [prompt] * 1024, seed=seed, **opts)
        rows += [c.tokens for c in out]
    samples = np.asarray(rows)
    assert samples.shape == (2048, 3)
    assert chi2_pvalue(samples[:, :2], joint01) > P_MIN
    assert chi2_pvalue(samples[:, 1:], joint12) > P_MIN

    drafted = generate_tokens(spec.draft, params, [prompt] * 2048, **opts)
    drafted = np.asarray([c.tokens for c in drafted])
    assert chi2_pvalue(drafted[:, 1:], joint12) < 1e-6


def test_generate_cli_speculative_prints_the_full_models_answer(tmp_path, capsys):
    from train.tiny import tiny_random_model
    from yoro_jax.checkpoint import save_yoro, write_model_dir
    from yoro_jax.generate_cli import main

    model = tiny_random_model(seed=3, num_layers=4)
    fingerprint = write_model_dir(
        tmp_path / "model", model.config, model.params, model.tokenizer.save_pretrained, "tiny"
    )
    ycfg = dataclasses.replace(EXACT, embedding_layers=1)
    trainable = init_trainable(ycfg, model.config, jax.random.key(1), model.params)
    save_yoro(tmp_path / "run" / "export", ycfg, trainable, tmp_path / "model", fingerprint)
    # a training run dir stands for its export/, as in lm-eval
    args = ["--yoro", str(tmp_path / "run"), "--prompt", "Hello", "--max-new-tokens", "10"]
    assert main([*args, "--speculative", "2", "--compare", "--no-stream"]) == 0
    captured = capsys.readouterr()
    full = captured.out.split("[full] ")[1].split("\n")[0]
    assert captured.out.split("[speculative] ")[1].split("\n")[0] == full
    assert "[speculative: per verify pass: 2 drafts x 3 layers + 4]" in captured.err
    assert "tokens per verify pass" in captured.err
    assert main(["--model", str(tmp_path / "model"), "--prompt", "x", "--speculative"]) == 2
    assert "--speculative needs --yoro" in capsys.readouterr().err


def test_bad_speculative_settings(tiny_base):
    ycfg, _ = DRAFTS["exact"]
    with pytest.raises(ValueError, match="k must be an integer >= 1"):
        make_spec(tiny_base, ycfg, k=0)
    spec, params = make_spec(tiny_base, ycfg)
    with pytest.raises(ValueError, match="does not record top-k"):
        generate_tokens(
            spec, params, [[4, 5]], max_new_tokens=2, eos_ids=[], pad_id=0, record_top_k=2
        )
