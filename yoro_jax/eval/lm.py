"""lm-eval backend ``yoro-jax``: the JAX model, full or YORO, driven in-process (docs/DESIGN.md §6).

    lm_eval --model yoro-jax --model_args model=DIR,yoro=RUN_OR_NETS,mode=yoro ...

``TemplateLM`` supplies lm-eval's own request tokenisation (context/continuation split,
empty contexts), so requests are tokenised exactly as the ``hf`` backend does; this
class only scores token pairs (:mod:`yoro_jax.eval.scoring`) and generates
(:func:`yoro_jax.generate.generate_tokens`). ``mode=full`` runs the unmodified base model
through the same code, so baseline and YORO are measured alike.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any

import numpy as np
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import (
    _add_special_kwargs,
    handle_stop_sequences,
    has_bos_prefix,
    normalize_gen_kwargs,
    postprocess_generated_text,
)
from tqdm import tqdm

from yoro_jax.checkpoint import CheckpointError, Model, resolve_nets
from yoro_jax.eval.scoring import score_pairs
from yoro_jax.generate import generate_tokens, special_ids
from yoro_jax.models import make_decoders, resolve_model
from yoro_jax.sampling import SamplingConfig
from yoro_jax.sharding import MeshConfig, make_mesh, shard_params
from yoro_jax.speculative import DEFAULT_K

MODES = ("full", "yoro", "speculative")
LM_EVAL_PASSES = {"device", "max_batch_size"}  # lm-eval's own, given to every backend
DEFAULT_MAX_GEN_TOKS = 256


def _flag(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes"):
        return True
    if text in ("0", "false", "no"):
        return False
    raise ValueError(f"expected a boolean (true/false), got {value!r}")


def _positive_int(name: str, value: Any) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        number = 0
    if number < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return number


def parse_mesh(text: str) -> MeshConfig:
    """``"4x2"`` -> MeshConfig(data=4, fsdp=2)."""
    try:
        data, fsdp = (int(part) for part in str(text).lower().split("x"))
    except ValueError:
        raise ValueError(f"mesh must look like DATAxFSDP (e.g. 4x2), got {text!r}") from None
    return MeshConfig(data, fsdp)


def load_base(model: str | None, nets: Path | None, dtype: str | None) -> Model:
    """Base model from ``model=`` (a model dir or ``smollm2``), else the one the nets record."""
    if model is None:
        if nets is None:
            raise ValueError("model_args need model=DIR (or yoro=NETS, which records its base)")
        from yoro_jax.checkpoint import recorded_base

        model = recorded_base(nets)
    return resolve_model(model, dtype)


class ModelArgsError(ValueError):
    """Bad ``--model_args`` for this backend (the CLI prints one ``error:`` line)."""


@register_model("yoro-jax")
class YoroJaxLM(TemplateLM):
    """model_args: ``model``, ``yoro``, ``mode`` (full|yoro|speculative), ``speculative_k``,
    ``batch_size``, ``max_length``, ``max_gen_toks``, ``dtype`` (float32|bfloat16),
    ``add_bos_token``, ``seed``, ``mesh`` (``DATAxFSDP``, e.g. ``4x2``: requests split over
    devices, weights FSDP-sharded).

    ``mode=speculative`` generates the full model's exact output with YORO drafting
    ``speculative_k`` tokens per verify pass (docs/DESIGN.md §7); its log-likelihoods are
    the full model's (what the speculative output is drawn from)."""

    def __init__(
        self,
        model: str | None = None,
        yoro: str | None = None,
        mode: str | None = None,
        batch_size: int | str | None = 8,
        max_length: int | str | None = None,
        max_gen_toks: int | str = DEFAULT_MAX_GEN_TOKS,
        dtype: str | None = None,
        add_bos_token: bool | str = False,
        seed: int | str = 0,
        mesh: str | None = None,
        speculative_k: int | str = DEFAULT_K,
        **unused: Any,  # lm-eval passes device / max_batch_size to every backend
    ) -> None:
        super().__init__()
        unknown = sorted(set(unused) - LM_EVAL_PASSES)
        if unknown:  # a typo must not silently score another model or mode
            known = inspect.signature(YoroJaxLM.__init__).parameters
            raise ValueError(
                f"unknown model_args {', '.join(unknown)}; this backend takes "
                f"{', '.join(k for k in known if k not in ('self', 'unused'))}"
            )
        if yoro in (None, "", "none", "None"):
            yoro = None
        mode = mode or ("yoro" if yoro else "full")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if mode in ("yoro", "speculative") and yoro is None:
            raise ValueError(f"mode={mode} needs yoro=NETS (a training run or exported nets)")
        try:
            nets = resolve_nets(yoro) if yoro else None
        except CheckpointError as err:
            raise ValueError(f"yoro={yoro}: {err}") from None
        self.base = load_base(model, nets, dtype)
        if self.base.tokenizer is None:
            raise ValueError(f"{self.base.path} has no tokenizer; lm-eval needs one")
        self.tokenizer = self.base.tokenizer
        self.mode = mode
        self.batch_size = _positive_int(
            "batch_size", 8 if batch_size in (None, "auto") else batch_size
        )
        cfg = self.base.config
        self.max_length = _positive_int("max_length", max_length or cfg.max_position_embeddings)
        self.max_gen_toks = _positive_int("max_gen_toks", max_gen_toks)
        self.add_bos_token = _flag(add_bos_token)
        self.seed = int(seed)
        self.reasoning_layers_per_prompt: list[int] = []
        self.eos_ids, self.pad_id = special_ids(cfg, self.tokenizer)
        # stacked layers: scoring dominates here, and compiles ~3x faster on a scan
        k = _positive_int("speculative_k", speculative_k) if mode == "speculative" else None
        decoders = make_decoders(self.base, nets, compare=True, unscan=False, speculative=k)
        self.decoder, params, self.layers_per_token = decoders[mode]
        self.speculative_stats: dict[str, float] = {"verify_passes": 0, "tokens_kept": 0}
        self.nets = nets
        self.mesh = make_mesh(parse_mesh(mesh)) if mesh else None
        self.params: Any = shard_params(params, self.mesh)
        # scoring: the speculative output is the full model's, so are its log-likelihoods
        self.score_decoder, self.score_params = (
            (self.decoder.full, self.params[0])
            if mode == "speculative"
            else (self.decoder, self.params)
        )

    # lm-eval's constructor paths: a bad argument becomes a ModelArgsError
    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None):
        try:
            return super().create_from_arg_string(arg_string, additional_config)
        except (ValueError, CheckpointError) as err:
            raise ModelArgsError(f"--model_args {arg_string!r}: {err}") from err

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None):
        try:
            return super().create_from_arg_obj(arg_dict, additional_config)
        except (ValueError, CheckpointError) as err:
            raise ModelArgsError(f"--model_args {arg_dict}: {err}") from err

    # ------------------------------------------------------------------ tokenisation
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    @property
    def tokenizer_name(self) -> str:
        return str(self.tokenizer.name_or_path).replace("/", "__")

    def tok_encode(
        self,
        string: str,
        add_special_tokens: bool | None = None,
        left_truncate_len: int | None = None,
        **kwargs: Any,
    ) -> list[int]:
        """Like the ``hf`` backend: the tokenizer's own special-token rule unless told."""
        special = _add_special_kwargs(add_special_tokens, self.add_bos_token)
        if add_special_tokens is None and has_bos_prefix(
            string, self.tokenizer.decode(self.prefix_token_id)
        ):
            special["add_special_tokens"] = False
        ids = self.tokenizer.encode(string, **special)
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def tok_decode(self, tokens: list[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(
        self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True
    ) -> str:
        return self.tokenizer.apply_chat_template(
            chat_history,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=not add_generation_prompt,
        )

    # ---------------------------------------------------------------------- scoring
    def _fit(self, context: list[int], continuation: list[int]) -> tuple[list[int], list[int]]:
        """Left-truncate the context so context + continuation fit ``max_length + 1`` tokens.

        The model then reads at most ``max_length`` tokens, as in the ``hf`` backend (the last
        continuation token is only a target).
        """
        keep = self.max_length + 1 - len(continuation)
        if keep < 1:
            raise ValueError(
                f"a continuation of {len(continuation)} tokens does not fit max_length "
                f"{self.max_length}"
            )
        return context[-keep:], continuation

    def _loglikelihood_tokens(
        self,
        requests: list[tuple[Any, list[int], list[int]]],
        disable_tqdm: bool = False,
        **kwargs: Any,
    ) -> list[tuple[float, bool]]:
        pairs = [self._fit(list(ctx), list(cont)) for _, ctx, cont in requests]
        with tqdm(
            total=len(pairs), disable=disable_tqdm, desc=f"loglikelihood ({self.mode})"
        ) as bar:
            results = score_pairs(
                self.score_decoder,
                self.score_params,
                pairs,
                batch_size=self.batch_size,
                pad_id=self.pad_id,
                progress=bar,
                mesh=self.mesh,
                reasoning_layers=self.reasoning_layers_per_prompt,
            )
        for (cache_key, _, _), result in zip(requests, results, strict=True):
            if cache_key is not None:
                self.cache_hook.add_partial("loglikelihood", cache_key, result)
        return results

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """Perplexity windows as in the ``hf`` backend; each window's context is its prompt."""
        windows, owners = [], []
        for index, (text,) in enumerate(req.args for req in requests):
            rolling = lm_utils.get_rolling_token_windows(
                token_list=self.tok_encode(text),
                prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length,
                context_len=1,
            )
            for context, continuation in map(lm_utils.make_disjoint_window, rolling):
                windows.append((None, context, continuation))
                owners.append(index)
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
        totals = [0.0] * len(requests)
        for owner, (logprob, _) in zip(owners, scores, strict=True):
            totals[owner] += logprob
        for req, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # ------------------------------------------------------------------- generation
    def _sampling(self, kwargs: dict[str, Any]) -> SamplingConfig:
        if not kwargs.pop("do_sample", False) or not kwargs.get("temperature"):
            return SamplingConfig()
        return SamplingConfig(
            temperature=float(kwargs["temperature"]),
            top_k=int(kwargs.get("top_k") or 0),
            top_p=float(kwargs.get("top_p") or 1.0),
        )

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """Batched KV-cached generation (YORO: reason once per prompt) with stop sequences."""
        groups: dict[str, list[int]] = {}
        for index, req in enumerate(requests):
            key = json.dumps(req.args[1], sort_keys=True, default=str)
            groups.setdefault(key, []).append(index)
        eos_text = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
        outputs: list[str | None] = [None] * len(requests)
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc=f"generate_until ({self.mode})")
        for indices in groups.values():
            kwargs = normalize_gen_kwargs(dict(requests[indices[0]].args[1]), self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos_text)
            max_new = int(kwargs.pop("max_gen_toks"))
            if max_new >= self.max_length:
                raise ValueError(
                    f"max_gen_toks {max_new} must be below max_length {self.max_length}"
                )
            sampling = self._sampling(kwargs)
            prompts = {
                i: self.tok_encode(requests[i].args[0], left_truncate_len=self.max_length - max_new)
                for i in indices
            }
            order = sorted(indices, key=lambda i: len(prompts[i]), reverse=True)
            for start in range(0, len(order), self.batch_size):
                batch = order[start : start + self.batch_size]
                rows = [prompts[i] for i in batch]
                rows += [rows[0]] * (self.batch_size - len(rows))  # one compiled batch shape
                stats: dict[str, Any] = {}
                completions = generate_tokens(
                    self.decoder,
                    self.params,
                    rows,
                    max_new_tokens=max_new,
                    eos_ids=self.eos_ids,
                    pad_id=self.pad_id,
                    sampling=sampling,
                    seed=self.seed + start,
                    tokenizer=self.tokenizer,
                    stop=until,
                    mesh=self.mesh,
                    stats=stats,
                )
                if stats:
                    self.speculative_stats["verify_passes"] += stats["verify_passes"]
                    self.speculative_stats["tokens_kept"] += (
                        stats["tokens_per_verify"] * stats["verify_passes"]
                    )
                for i, completion in zip(batch, completions, strict=False):
                    if completion.reasoning_layers is not None:
                        self.reasoning_layers_per_prompt.append(completion.reasoning_layers)
                    text = self.tok_decode(completion.tokens)
                    outputs[i] = postprocess_generated_text(text, until, None)
                    self.cache_hook.add_partial("generate_until", requests[i].args, outputs[i])
                bar.update(len(batch))
        bar.close()
        return outputs  # type: ignore[return-value]

    def reasoning_summary(self) -> dict[str, float] | None:
        """Reasoning layers run per prompt so far (YORO; a router makes this vary)."""
        counts = [c for c in self.reasoning_layers_per_prompt if c >= 0]
        if not counts:
            return None
        return {
            "prompts": len(counts),
            "mean": float(np.mean(counts)),
            "min": int(min(counts)),
            "max": int(max(counts)),
        }

    def get_model_info(self) -> dict[str, Any]:
        return {
            "reasoning_layers_per_prompt": self.reasoning_summary(),
            "model": str(self.base.path),
            "fingerprint": self.base.fingerprint,
            "mode": self.mode,
            "yoro_nets": str(self.nets) if self.nets else None,
            "decoder_layers_per_generated_token": self.layers_per_token,
            "speculative": self.speculative_summary(),
        }

    def speculative_summary(self) -> dict[str, float] | None:
        """Verify passes and tokens kept per pass over every generate_until call so far."""
        passes = self.speculative_stats["verify_passes"]
        if self.mode != "speculative" or not passes:
            return None
        return {
            "k": self.decoder.k,
            "verify_passes": int(passes),
            "tokens_per_verify": self.speculative_stats["tokens_kept"] / passes,
        }
