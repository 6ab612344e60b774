"""The bf16 baseline of `verify`, computed layer-streamed (a 34B baseline never has to fit the card) and cached.

The cache key is the sha256 of the baseline's files (config + shards) and of the eval token windows, plus
everything else that changes the numbers (top-k, compute device type and dtype). Verifying the next variant
against the same baseline reads the cache instead of recomputing.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass

import torch

from .. import __version__
from ..core.hashing import cache_root, checkpoint_sha256, write_cache
from ..engine.forward import forward_all
from ..engine.memory import BASELINE_GIB, windows_per_pass
from ..read.load import Checkpoint, LayerReader, embed_ids, hf_config, load_named, rotary, skeleton
from .metrics import topk_logprobs

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BaselineStats:
    target_logp: torch.Tensor  # [S, T-1] fp32  log p(next token) under bf16
    topk_logp: torch.Tensor    # [S, T-1, k] fp32
    topk_idx: torch.Tensor     # [S, T-1, k] int32
    key: str                   # cache key (sha256)
    cached: bool               # read from the cache rather than computed


def cache_key(model_sha: str, windows: torch.Tensor, top_k: int, device: torch.device, dtype: torch.dtype) -> str:
    h = hashlib.sha256()
    h.update(json.dumps({"model": model_sha, "top_k": top_k, "device": device.type, "dtype": str(dtype),
                         "shape": list(windows.shape), "format": 1}, sort_keys=True).encode())
    h.update(windows.to(torch.int64).contiguous().numpy().tobytes())
    return h.hexdigest()


@torch.no_grad()
def streamed_logprobs(ckpt: Checkpoint, windows: torch.Tensor, top_k: int, device: torch.device,
                      dtype: torch.dtype, batch: int = 4, trust_remote_code: bool = False,
                      budget_gib: float = BASELINE_GIB, progress=None):
    """Run the checkpoint one decoder layer at a time over windows [S, T]: (target [S, T-1], topk_logp
    [S, T-1, k], topk_idx [S, T-1, k]), on the host.

    The windows go in passes of windows_per_pass (budget_gib of hidden states); each pass streams every layer
    (load.LayerReader: the next layer read on a background thread), so the device holds one layer + one pass's
    hidden states [S', T, D] (written in place) + one window's logits [T, V] fp32, whatever the eval set's size;
    passes beyond the first re-read the checkpoint. progress("baseline", done, total), if given, after each layer
    of each pass.
    """
    config = hf_config(ckpt, trust_remote_code)
    lm, skel = ckpt.layer_map, skeleton(config)
    per = windows_per_pass(windows.shape[1], int(config.hidden_size), dtype.itemsize, budget_gib)
    norm = load_named(ckpt, skel, lm.final_norm, device, dtype)
    head = load_named(ckpt, skel, lm.lm_head, device, dtype)
    # the results are allocated once, up front (as verify.quantized_stats does): small tensors kept per window
    # would pin glibc's heap above each window's freed logits [T, V] fp32, and the host RSS would grow with the
    # eval set (measured: 0.48 / 1.07 / 3.12 GiB for 20 / 60 / 180 windows of the bundled model)
    n, t = windows.shape
    k = min(top_k, int(config.vocab_size))
    target = torch.empty(n, t - 1, dtype=torch.float32)        # [S, T-1] fp32
    topk_logp = torch.empty(n, t - 1, k, dtype=torch.float32)  # [S, T-1, k] fp32
    topk_idx = torch.empty(n, t - 1, k, dtype=torch.int32)     # [S, T-1, k] int32
    rope, done, total = None, 0, -(-n // per) * ckpt.num_layers
    with LayerReader(ckpt, skel, device, dtype) as reader:
        for p0 in range(0, n, per):
            part = windows[p0: p0 + per].to(device)
            hidden = embed_ids(ckpt, part, device, dtype)
            if rope is None:   # the same for every pass: it depends on T and the dtype only
                rope = rotary(config, device)(hidden[:1], torch.arange(hidden.shape[1], device=device)[None])
            for i in range(ckpt.num_layers):
                hidden = forward_all(reader.block(i), hidden, rope, batch, in_place=True)
                done += 1
                if progress:
                    progress("baseline", done, total)
            for s in range(len(hidden)):
                tgt, lp, idx = topk_logprobs(head(norm(hidden[s, :-1])), part[s, 1:], top_k)
                target[p0 + s], topk_logp[p0 + s], topk_idx[p0 + s] = tgt, lp, idx
                del tgt, lp, idx
            del hidden
    return target, topk_logp, topk_idx


def baseline_stats(ckpt: Checkpoint, windows: torch.Tensor, top_k: int, device: torch.device, dtype: torch.dtype,
                   cache_dir: str = "", batch: int = 4, trust_remote_code: bool = False,
                   budget_gib: float = BASELINE_GIB, progress=None) -> BaselineStats:
    root = cache_root(cache_dir)
    key = cache_key(checkpoint_sha256(ckpt.path, ckpt.files, root), windows, top_k, device, dtype)
    f = root / f"baseline-{key[:32]}.pt"
    if f.is_file():
        d = torch.load(f, weights_only=True)
        if d.get("key") == key:
            log.info("baseline: cached results %s", f)
            return BaselineStats(d["target"], d["topk_logp"], d["topk_idx"], key, True)
    log.info("baseline: streaming %s layer by layer over %d windows", ckpt.path, len(windows))
    target, topk_logp, topk_idx = streamed_logprobs(ckpt, windows, top_k, device, dtype, batch, trust_remote_code,
                                                    budget_gib, progress)
    write_cache(f, lambda tmp: torch.save({"key": key, "target": target, "topk_logp": topk_logp,
                                           "topk_idx": topk_idx, "inf_quant": __version__}, tmp),
                "the baseline cache", "the next verify against this baseline recomputes it")
    return BaselineStats(target, topk_logp, topk_idx, key, False)
