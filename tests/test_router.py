"""Routers (docs/DESIGN.md §5): gates, estimators, real layer skipping, equivalences, training."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import QUIET_EVAL, SMOKE, kill_then_resume, reuse_teacher_data, smoke_config
from test_yoro import randomise_biases

from tests.conftest import cached_logits, params_from_hf, tiny_hf_model
from train.config import RouterTrainSection
from train.routing import router_objective, temperature_at
from train.trainer import train
from yoro_jax import llama
from yoro_jax.batch import prompt_response_layout
from yoro_jax.checkpoint import load_yoro, save_yoro
from yoro_jax.config import ConfigError
from yoro_jax.decoders import YoroDecoder
from yoro_jax.generate import generate_tokens
from yoro_jax.router import (
    ROUTERS,
    GumbelRouter,
    ReinforceRouter,
    RouterConfig,
    make_router,
    register_router,
)
from yoro_jax.yoro import Yoro, YoroConfig, init_trainable

YCFG = YoroConfig(1, 1, 1, 1, 1)  # 6 base layers: 4 reasoning layers


@pytest.fixture(scope="module")
def tiny_base():
    return params_from_hf(tiny_hf_model(seed=21, num_hidden_layers=6))


def routed(tiny_base, kind="gumbel", granularity="sequence", seed=0, **router):
    """A YORO model with a router whose (random) gates differ between prompts."""
    cfg, frozen = tiny_base
    ycfg = dataclasses.replace(YCFG, router=RouterConfig(kind, granularity, **router))
    model = Yoro(cfg, ycfg)
    trainable = init_trainable(ycfg, cfg, jax.random.key(seed))
    trainable = randomise_biases(trainable, jax.random.key(1))
    # random gate weights, biases that centre each layer's logit over probe prompts: mixed
    # keep/skip decisions that differ between prompts
    gate_layer = trainable["router"]["net"]["gates"]
    key = jax.random.key(seed + 5)
    gate_layer["kernel"] = 2.0 * jax.random.normal(key, gate_layer["kernel"].shape)
    gate_layer["bias"] = jnp.zeros_like(gate_layer["bias"])
    e, valid = _embedding_output(model, frozen, prompts_of((7, 13, 3, 9), seed=3))
    logits = make_router(ycfg.router).logits(trainable["router"], e, valid)
    gate_layer["bias"] = -jnp.median(logits.reshape(-1, logits.shape[-1]), axis=0)
    return model, frozen, trainable


def prompts_of(lengths, seed=0):
    rng = np.random.RandomState(seed)
    return [list(rng.randint(3, 256, n)) for n in lengths]


# ------------------------------------------------------------------------------ gates
def test_gumbel_gates_are_binary_with_straight_through_gradients():
    router = GumbelRouter(RouterConfig("gumbel"))
    params = router.init(jax.random.key(0), 16, 5)
    params["net"]["gates"]["kernel"] = jax.random.normal(jax.random.key(1), (4, 5))
    e = jax.random.normal(jax.random.key(2), (8, 7, 16))
    valid = jnp.ones((8, 7), bool).at[0, :3].set(False)
    weights = jax.random.normal(jax.random.key(3), (8, 5))

    def objective(params, temperature):
        out = router.sample(params, e, valid, key=jax.random.key(4), temperature=temperature)
        return jnp.sum(out.gates * weights), out.gates

    for temperature in (1.0, 0.3):
        (_, gates), grads = jax.jit(jax.value_and_grad(objective, has_aux=True))(
            params, temperature
        )
        assert set(np.unique(np.asarray(gates)).tolist()) == {0.0, 1.0}
        assert gates.dtype == jnp.float32
        for name in ("kernel", "bias"):
            assert float(jnp.abs(grads["net"]["gates"][name]).max()) > 1e-4
    assert float(jnp.abs(grads["net"]["hidden_0"]["kernel"]).max()) > 0  # reaches the MLP


def test_gumbel_sampling_matches_keep_probability():
    router = GumbelRouter(RouterConfig("gumbel"))
    params = router.init(jax.random.key(0), 8, 3)
    params["net"]["gates"]["bias"] = jnp.asarray([-1.0, 0.0, 2.0])
    e, valid = jnp.ones((20000, 1, 8)), jnp.ones((20000, 1), bool)
    out = router.sample(params, e, valid, key=jax.random.key(1), temperature=1.0)
    np.testing.assert_allclose(
        out.gates.mean(0), jax.nn.sigmoid(jnp.asarray([-1.0, 0, 2])), atol=0.015
    )


def test_reinforce_estimator_is_unbiased_on_a_toy_problem():
    """The policy gradient the training loss yields, -grad(router loss), estimates
    grad E[f(g)] without bias for Bernoulli gates (f known, gradient exact), with or
    without a baseline; the baseline lowers its variance."""
    num_layers, rows = 3, 40000
    router = ReinforceRouter(RouterConfig("reinforce"))
    params = router.init(jax.random.key(0), 4, num_layers)
    theta = jnp.asarray([0.3, -0.5, 1.2])  # zero kernel: logits = theta (the bias) per row
    e, valid = jnp.ones((rows, 1, 4)), jnp.ones((rows, 1), bool)
    c, d = jnp.asarray([1.0, -2.0, 0.5]), 3.0

    def reward(g):  # a non-linear function of the gates
        return g @ c + d * g[..., 0] * g[..., 1] + 2.0

    def expected_reward(theta):
        p = jax.nn.sigmoid(theta)
        return p @ c + d * p[0] * p[1] + 2.0

    def with_bias(bias):
        net = dict(params["net"], gates=dict(params["net"]["gates"], bias=bias))
        return dict(params, net=net)

    exact = np.asarray(jax.grad(expected_reward)(theta))
    gates = router.sample(with_bias(theta), e, valid, key=jax.random.key(1)).gates
    distill = -reward(gates)  # lambda = 0: reward = -distillation loss = f(g)
    rt = RouterTrainSection(compute_penalty=0.0)

    def router_loss(bias, baseline):
        out = router.sample(with_bias(bias), e, valid, key=jax.random.key(1))  # same gates
        return router_objective(out, distill, valid, rt, jnp.int32(1), jnp.float32(baseline))[0]

    spreads = []
    for baseline in (0.0, float(expected_reward(theta))):
        estimate = -np.asarray(jax.grad(router_loss)(theta, baseline))
        # per-row terms of the score-function estimator: (f - b) * d log pi / d theta
        terms = np.asarray((reward(gates) - baseline)[:, None] * (gates - jax.nn.sigmoid(theta)))
        np.testing.assert_allclose(estimate, terms.mean(0), atol=1e-4)  # f32 sums
        stderr = terms.std(0) / np.sqrt(rows)
        assert np.all(np.abs(estimate - exact) < 4 * stderr), (estimate, exact, stderr)
        spreads.append(terms.std(0))
    assert np.all(spreads[1] < spreads[0])


def test_ema_baseline_and_temperature_schedule():
    rt = RouterTrainSection(
        baseline_momentum=0.5, temperature=1.0, temperature_decay=0.5, min_temperature=0.2
    )
    out = ReinforceRouter(RouterConfig("reinforce")).sample(
        ReinforceRouter(RouterConfig("reinforce")).init(jax.random.key(0), 4, 2),
        jnp.ones((4, 1, 4)),
        jnp.ones((4, 1), bool),
        key=jax.random.key(0),
    )
    distill = jnp.asarray([1.0, 2.0, 3.0, 4.0])
    _, first = router_objective(out, distill, jnp.ones((4, 1), bool), rt, jnp.int32(0), 9.0)
    assert float(first["baseline"]) == pytest.approx(float(first["reward"]))  # starts at it
    _, later = router_objective(out, distill, jnp.ones((4, 1), bool), rt, jnp.int32(5), 1.0)
    assert float(later["baseline"]) == pytest.approx(0.5 * 1.0 + 0.5 * float(later["reward"]))
    assert [temperature_at(rt, s, 10) for s in (1, 10, 11, 21, 31, 41)] == [
        1,
        1,
        0.5,
        0.25,
        0.2,
        0.2,
    ]


# ---------------------------------------------------------------- model with a router
def test_all_gates_on_equals_the_routerless_model(tiny_base):
    cfg, frozen = tiny_base
    model, _, trainable = routed(tiny_base)
    gate_layer = trainable["router"]["net"]["gates"]
    gate_layer["kernel"] *= 0
    gate_layer["bias"] += 5.0  # p(keep) = sigmoid(5) for every prompt: all on
    plain = Yoro(cfg, YCFG)
    nets = {k: v for k, v in trainable.items() if k != "router"}
    prompts = prompts_of((7, 13, 3))
    gen = dict(max_new_tokens=12, eos_ids=[], pad_id=0)
    a = generate_tokens(YoroDecoder(model), (frozen, trainable), prompts, **gen)
    b = generate_tokens(YoroDecoder(plain), (frozen, nets), prompts, **gen)
    assert [c.tokens for c in a] == [c.tokens for c in b]
    assert [c.reasoning_layers for c in a] == [4, 4, 4] == [c.reasoning_layers for c in b]
    tokens, valid, _ = prompt_response_layout(prompts, [c.tokens for c in a], 13, 25, 0)
    forward = jax.jit(lambda m, t: m.forward(frozen, t, tokens, valid, 13), static_argnums=0)
    # two programs (one computes 1*Layer(h) + 0*h): equal up to float32 reassociation
    np.testing.assert_allclose(forward(model, trainable), forward(plain, nets), atol=1e-5)


@pytest.mark.parametrize("granularity", ["sequence", "token"])
def test_routed_generation_equals_teacher_forcing(tiny_base, granularity):
    """The core invariant holds with a router: its deterministic gates are the same in the
    parallel pass and in reason-once generation (which skips layers no prompt needs)."""
    model, frozen, trainable = routed(tiny_base, "reinforce", granularity, seed=2)
    prompts = prompts_of((7, 13, 3, 9), seed=3)
    completions = generate_tokens(
        YoroDecoder(model), (frozen, trainable), prompts, max_new_tokens=10, eos_ids=[], pad_id=0
    )
    responses = [c.tokens for c in completions]
    needed = [c.reasoning_layers for c in completions]
    if granularity == "sequence":
        assert len(set(needed)) > 1, needed  # prompts need different layers
    tokens, valid, _ = prompt_response_layout(prompts, responses, 13, 23, 0)
    tf = np.asarray(jax.jit(model.forward, static_argnums=4)(frozen, trainable, tokens, valid, 13))
    cached = cached_logits(
        YoroDecoder(model), (frozen, trainable), prompts, np.asarray(responses, np.int32), width=16
    )
    np.testing.assert_allclose(cached, tf[:, 12:-1], atol=1e-4)
    # and the gates really vary: some prompt skips some layer
    e = _embedding_output(model, frozen, prompts)
    gates = np.asarray(model.route(trainable, *e).gates)
    assert 0 < gates.mean() < 1


def _embedding_output(model, frozen, prompts):
    from yoro_jax.batch import left_pad

    tokens, valid = left_pad(prompts, 16, 0)
    cfg = model.base
    rope = llama.rope_tables(cfg, llama.positions_from_valid(valid))
    mask = llama.attention_mask(valid, 0, 16)
    x = llama.embed_tokens(frozen, tokens)
    return llama.run_layers(cfg, model.embedding_layers(frozen), x, rope, mask)[0], valid


def test_layer_gated_off_for_the_whole_batch_is_not_executed(tiny_base, monkeypatch):
    """Count executions of every reasoning layer at run time (a host callback inside each
    layer): layers no row needs never run; layers some row needs run once for the batch,
    and rows that skip them keep their hidden state exactly.

    "Exactly" is checked where it is exact by construction: inside one compiled program a
    skipped layer passes h through a ``where``, so a row with every gate off leaves ``e``
    bitwise unchanged. Rows that run layers are compared with eager calls of the same
    layers — a differently compiled program, whose float32 results may differ in the last
    bit on another CPU — so those comparisons carry a tolerance."""
    cfg, frozen = tiny_base
    model = Yoro(cfg, YCFG)
    layers = model.reasoning_layers(frozen)
    marks = np.asarray(layers["attn"]["wq"][:, 0, 0, 0])  # tells the layers apart
    assert len(set(marks.tolist())) == len(marks)
    executed: list[int] = []
    real = llama.apply_layer

    def counting(cfg_, layer, x, *args, **kwargs):
        def seen(mark):
            executed.append(int(np.argmin(np.abs(marks - mark))))

        jax.debug.callback(seen, layer["attn"]["wq"][0, 0, 0])
        return real(cfg_, layer, x, *args, **kwargs)

    monkeypatch.setattr(llama, "apply_layer", counting)
    jax.clear_caches()  # make sure the counting version is what gets traced
    e = jax.random.normal(jax.random.key(0), (4, 5, cfg.hidden_size))
    valid = jnp.ones((4, 5), bool)
    rope = llama.rope_tables(cfg, llama.positions_from_valid(valid))
    mask = llama.attention_mask(valid, 0, 5)
    reason = jax.jit(lambda g: model.reason(frozen, e, rope, mask, g, skip=True))
    gates = jnp.asarray([[1, 0, 0, 1], [1, 0, 0, 0], [0, 0, 0, 1], [0, 0, 0, 0]], jnp.float32)
    out, _ = reason(gates)
    jax.effects_barrier()
    assert sorted(executed) == [0, 3]  # layers 1 and 2: gated off for every row

    executed.clear()
    reason(jnp.zeros_like(gates))[0].block_until_ready()
    jax.effects_barrier()
    assert executed == []  # the same compiled program, nothing run
    monkeypatch.setattr(llama, "apply_layer", real)
    jax.clear_caches()

    def run(h, i):
        return real(cfg, jax.tree.map(lambda a: a[i], layers), h, rope, mask)[0]

    np.testing.assert_allclose(out[0], run(run(e, 0), 3)[0], atol=1e-5)
    np.testing.assert_allclose(out[1], run(e, 0)[1], atol=1e-5)
    np.testing.assert_allclose(out[2], run(e, 3)[2], atol=1e-5)  # layer 0 skipped
    np.testing.assert_array_equal(out[3], e[3])  # every layer skipped: e kept bitwise


# ------------------------------------------------------------------ protocol and I/O
def test_a_new_variant_plugs_in_without_touching_the_model(tiny_base):
    @register_router("always-first-half")
    @dataclasses.dataclass(frozen=True)
    class FirstHalf(GumbelRouter):
        def decide(self, params, e, valid):
            r = params["net"]["gates"]["bias"].shape[0]
            return jnp.broadcast_to((jnp.arange(r) < r // 2).astype(jnp.float32), (e.shape[0], r))

    try:
        model, frozen, trainable = routed(tiny_base, "always-first-half")
        out = generate_tokens(
            YoroDecoder(model),
            (frozen, trainable),
            prompts_of((5, 8)),
            max_new_tokens=4,
            eos_ids=[],
            pad_id=0,
        )
        assert [c.reasoning_layers for c in out] == [2, 2]
    finally:
        ROUTERS.pop("always-first-half")


def test_router_config_errors_and_round_trip(tiny_base, tmp_path):
    with pytest.raises(ConfigError, match="router.kind: 'dropout' is not one of none, gumbel"):
        make_router(RouterConfig("dropout"))
    with pytest.raises(ConfigError, match="router.granularity"):
        RouterConfig("gumbel", "layer").validate()
    from yoro_jax.checkpoint import Model

    model, frozen, trainable = routed(tiny_base, "reinforce", "token", baseline="learned")
    assert "value" in trainable["router"]
    base = Model(model.base, frozen, None, tmp_path / "base", "f" * 64)
    save_yoro(tmp_path / "nets", model.ycfg, trainable, base.path, base.fingerprint)
    ycfg, loaded, _ = load_yoro(tmp_path / "nets", base)
    assert ycfg == model.ycfg
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(trainable), strict=True):
        np.testing.assert_array_equal(a, b)
    meta = json.loads((tmp_path / "nets" / "yoro_config.json").read_text())
    del meta["yoro"]["router"]  # nets saved before routers existed still load
    assert YoroConfig.from_dict(meta["yoro"]).router.kind == "none"


# ----------------------------------------------------------------------------- training
@pytest.fixture(scope="module")
def stage1(smoke_run):
    """The shared smoke run: router-less nets that stage 2 starts from."""
    return smoke_run[0]


def stage2(run_dir, stage1_dir, kind, *extra):
    return [
        f"yoro.router.kind={kind}",
        "router_train.train_nets=false",
        f"router_train.init_nets={stage1_dir}",
        "router_train.compute_penalty=0.5",
        "optim.lr=3.0e-2",
        *QUIET_EVAL,
        *extra,
    ]


@pytest.mark.parametrize("kind", ["gumbel", "reinforce"])
def test_stage2_trains_only_the_router_and_logs_routing_metrics(tmp_path, stage1, kind):
    run_dir = tmp_path / "run"
    reuse_teacher_data(stage1, run_dir)
    result = train(
        smoke_config(
            run_dir, *stage2(run_dir, stage1, kind), "train.max_steps=8", "train.log_every=4"
        )
    )
    _, start, _ = load_yoro(stage1 / "export")
    final = result["state"]["trainable"]
    for name in ("compensation", "adaptation", "concatenation"):  # nets untouched
        for a, b in zip(jax.tree.leaves(final[name]), jax.tree.leaves(start[name]), strict=True):
            np.testing.assert_array_equal(a, b)
    fresh = init_trainable(
        smoke_config(run_dir, *stage2(run_dir, stage1, kind)).yoro,
        load_yoro(stage1 / "export")[2].config,
        jax.random.key(0),
    )
    pairs = zip(jax.tree.leaves(final["router"]), jax.tree.leaves(fresh["router"]), strict=True)
    moved = max(float(jnp.abs(a - b).max()) for a, b in pairs)
    assert moved > 1e-3
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if r["split"] == "train"]
    for key in ("active_layers", "skip_rate", "gate_entropy", "temperature", "baseline"):
        assert all(key in r for r in train_rows), key
    val = [r for r in rows if r["split"] == "val"][-1]
    assert 0 <= val["reasoning_layers"] <= 4 and "skip_rate/layer_03" in val
    # the compute penalty pushed every layer's keep logit down from its start (2.0)
    assert float(final["router"]["net"]["gates"]["bias"].max()) < 2.0
    ycfg, _, _ = load_yoro(run_dir / "export")
    assert ycfg.router.kind == kind


def test_stage2_config_errors(tmp_path, stage1):
    from train.config import load_config

    with pytest.raises(ConfigError, match="init_nets is not set"):
        load_config(SMOKE, ["yoro.router.kind=gumbel", "router_train.train_nets=false"])
    with pytest.raises(ConfigError, match="must match"):
        train(
            smoke_config(
                tmp_path / "r",
                *stage2(tmp_path / "r", stage1, "gumbel"),
                "yoro.adaptation_layers=2",
            )
        )


def test_killed_run_resumes_bitwise_equal(tmp_path, stage1):
    """A subprocess SIGKILLed mid-run (after its step-2 checkpoint, at step 3) and then
    resumed ends with exactly the params of an uninterrupted run of the same seed. Joint
    training with a REINFORCE router and gradient accumulation: the nets, the optimizer,
    the sampled gates and the moving-average baseline are all part of the resumed state."""
    overrides = [
        "yoro.router.kind=reinforce",
        "router_train.compute_penalty=0.5",
        "train.max_steps=5",
        "checkpoint.every_steps=2",
        "optim.grad_accum=2",
        "train.log_every=1",
        *QUIET_EVAL,
    ]
    reference, run_dir = kill_then_resume(stage1, tmp_path, overrides, kill_after=3, resumed_from=2)
    _, trainable, _ = load_yoro(run_dir / "export")
    for a, b in zip(
        jax.tree.leaves(trainable), jax.tree.leaves(reference["state"]["trainable"]), strict=True
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    def final(path):
        rows = [json.loads(x) for x in (path / "metrics.jsonl").read_text().splitlines()]
        return [r for r in rows if r["split"] == "train" and r["step"] == 5][-1]

    for key in ("loss", "baseline", "active_layers"):
        assert final(run_dir)[key] == final(tmp_path / "straight")[key], key
    # the killed run's rows after its checkpoint were dropped on resume, not repeated
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    logged = [(r["step"], r["split"]) for r in rows]
    assert len(logged) == len(set(logged)) and (3, "train") in logged
