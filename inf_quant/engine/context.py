"""The types a quantization run passes between its stages, low in the import graph so every stage can name them.

Context is resolved once by pipeline.prepare; gptq_block.gptq_block and awq_block.awq_block (the twins) take it
and return a BlockResult for one layer; the block loop (pipeline.py) records a LayerResult per layer, and
output.publish turns those into the QuantizeReport.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..core.config import Recipe
from ..read.layermap import LayerMap
from ..read.load import Checkpoint

if TYPE_CHECKING:  # transformers is imported by load.hf_config, when a run needs it
    from transformers import PretrainedConfig


@dataclass(frozen=True)
class Context:
    """Everything resolved before the first layer: validated inputs and calibration batches."""

    recipe: Recipe
    model_dir: Path
    ckpt: Checkpoint
    config: PretrainedConfig  # the transformers config of ckpt (load.hf_config)
    lmap: LayerMap
    device: torch.device
    dtype: torch.dtype
    ids: torch.Tensor        # [S, T] int64 calibration windows
    calib_sha256: str
    out_dir: Path
    skip: frozenset = frozenset()  # full names of linears left in bf16 (recipe.skip, resolved)


@dataclass(frozen=True)
class BlockResult:
    """One decoder layer quantized by gptq_block or awq_block; the block's weights are then their dequantized
    values (and AWQ's folded norms)."""

    tensors: dict[str, torch.Tensor]  # the layer's checkpoint tensors as written: packed linears, skipped
                                      # linears' weights, AWQ-folded norms
    losses: dict[str, float]          # per quantized linear (relative name): the GPTQ proxy loss (also AWQ's
                                      # solve=gptq) or AWQ's clip-search loss (solve=rtn)
    notes: tuple[str, ...]            # adjustments made in this layer (damping raised, folds skipped)
    output: torch.Tensor | None       # [S, T, D] the quantized layer's output for all windows; None: the caller
                                      # runs the layer (forward.forward_all)
    scales: dict[str, tuple[str, float]] = field(default_factory=dict)  # AWQ: group -> chosen (form, alpha)


@dataclass(frozen=True)
class LayerResult:
    """What the block loop records per layer (the progress line, the report's adjustments and peaks)."""

    index: int
    seconds: float
    losses: dict[str, float]  # proxy loss per quantized linear (GPTQ) or output MSE (AWQ)
    notes: tuple[str, ...]    # adjustments made in this layer (damping raised, folds skipped)
    peak_rss: int             # bytes, process peak so far
    peak_vram: int            # bytes, torch peak allocated so far (0 on CPU)
    expected: int             # bytes, the expected peak of that same figure (RSS on CPU, VRAM on CUDA)
    resumed: bool             # rebuilt from the work directory, not re-quantized
    scales: dict[str, tuple[str, float]] = field(default_factory=dict)  # AWQ: group -> chosen (form, alpha)


__all__ = ["Context", "BlockResult", "LayerResult"]
