"""Batch layouts with static shapes: left-padded prompts, and prompt|response pairs.

The prompt|response layout (docs/DESIGN.md §3.1) right-aligns every prompt to a common
boundary P and left-aligns every response after it, so one static P serves the whole
batch while each sequence keeps its own exact prompt boundary::

    row 0:  [pad pad  p0  p1  p2 | r0  r1  pad pad]
    row 1:  [ p0  p1  p2  p3  p4 | r0  r1  r2  r3 ]
                                 ^ P
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def left_pad(
    prompts: Sequence[Sequence[int]], length: int, pad_id: int
) -> tuple[np.ndarray, np.ndarray]:
    """Right-align prompts in a [B, length] array; returns (tokens, valid)."""
    tokens = np.full((len(prompts), length), pad_id, np.int32)
    valid = np.zeros((len(prompts), length), bool)
    for row, prompt in enumerate(prompts):
        if len(prompt) > length:
            raise ValueError(f"prompt of {len(prompt)} tokens does not fit in {length}")
        if len(prompt):
            tokens[row, length - len(prompt) :] = prompt
            valid[row, length - len(prompt) :] = True
    return tokens, valid


def prompt_response_layout(
    prompts: Sequence[Sequence[int]],
    responses: Sequence[Sequence[int]],
    prompt_len: int,
    total_len: int,
    pad_id: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """[B, total_len] (tokens, valid, response_mask) with the boundary at ``prompt_len``.

    ``response_mask[b, t]`` marks the response tokens (t >= prompt_len, real).
    """
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    tokens, valid = left_pad(prompts, prompt_len, pad_id)
    width = total_len - prompt_len
    resp_tokens = np.full((len(prompts), width), pad_id, np.int32)
    resp_valid = np.zeros((len(prompts), width), bool)
    for row, response in enumerate(responses):
        if len(response) > width:
            raise ValueError(f"response of {len(response)} tokens does not fit in {width}")
        resp_tokens[row, : len(response)] = response
        resp_valid[row, : len(response)] = True
    response_mask = np.concatenate([np.zeros_like(valid), resp_valid], axis=1)
    return (
        np.concatenate([tokens, resp_tokens], axis=1),
        np.concatenate([valid, resp_valid], axis=1),
        response_mask,
    )
