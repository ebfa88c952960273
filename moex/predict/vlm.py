"""Routing traces of a VLM on MMBench-format prompts: the third trace domain ("vlm"), beside the
stdlib's code and prose.

    moex vlm trace runs/vlm/mini-hard/model --out runs/traces/vlm-dev.npz --split dev
    moex predictor train runs/traces/vlm-train.npz --out runs/rpp/vlm

Each request is one question: its compact prompt (image placeholders + question + options),
answered greedily by the all-resident offload engine, which records every token's routing, its
pre-gate prediction and its token id (`moex.offload.trace`). The trace's meta also names each
request's question category (`request_labels`), so predictors and caches can be scored per
category.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from tqdm import tqdm

from moex.checkpoint import load_model
from moex.data import SyntheticSpec, read_mmbench, write_synthetic
from moex.data.batching import batches, encode_batch
from moex.offload.forecast import reference_run
from moex.offload.store import ExpertStore
from moex.offload.trace import Trace


def vlm_prompts(cfg, tokenizer, questions: Sequence, style: str = "compact",
                mode: str = "crop", template: str = "{prompt}"):
    """(ids (B, T), mask (B, T), images (B, H, W, C)) of the questions' prompts, left-padded."""
    b = encode_batch(questions, tokenizer, cfg.vision, style, mode=mode, template=template)
    return b.ids, b.mask, b.images


def record_vlm_traces(cfg, params, tokenizer, questions: Sequence, new_tokens: int = 4,
                      batch: int = 8, progress: bool = True, style: str = "compact",
                      hidden: bool = False):
    """One Trace of greedy answers to `questions` (request i = question i), with
    `request_labels` = the questions' categories (and, with `hidden`, the hidden states)."""
    store = ExpertStore.from_params(cfg, params)
    traces = []
    groups = list(batches(questions, batch))
    start = 0
    for group in tqdm(groups, desc="trace vlm", disable=not progress):
        ids, mask, images = vlm_prompts(cfg, tokenizer, group, style)
        traces.append(reference_run(cfg, store, ids, mask, images, new_tokens=new_tokens,
                                    request_ids=np.arange(start, start + len(group)),
                                    record_hidden=hidden).trace())
        start += len(group)
    trace = Trace.concat(traces)
    trace.domain = "vlm"
    trace.request_labels = [q.category for q in questions]
    return trace


def trace_benchmark(model_dir, *, split: str = "dev", mmbench: str | None = None,
                    questions: int = 256, new_tokens: int = 4, batch: int = 16,
                    data: str = "runs/data/synthetic", seed: int = 0,
                    hidden: bool = False) -> tuple[Trace, int]:
    """(trace, questions traced) of a trained VLM checkpoint answering the first `questions`
    (0: all) of an MMBench-format TSV, or of the synthetic split `split` under `data`."""
    model = load_model(model_dir)
    if mmbench:
        qs = read_mmbench(mmbench)
    else:
        qs = read_mmbench(write_synthetic(data, SyntheticSpec(seed=seed))[f"mmbench/{split}"])
    qs = qs[:questions or None]
    return record_vlm_traces(model.cfg, model.params, model.tokenizer, qs, new_tokens=new_tokens,
                             batch=batch, hidden=hidden), len(qs)
