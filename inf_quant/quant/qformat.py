"""A quantized Linear as checkpoint tensors, and back: GPTQ v1 and AWQ gemm.

`to_tensors` turns a QuantizedWeight into the tensors written under `<module>.` and `from_tensors` rebuilds the
weight the loaders will compute from them. The pipeline propagates calibration activations through exactly
`from_tensors(to_tensors(q))`, so a resumed run (which rebuilds finished layers from disk) is bit-identical.
Both run on the device the codes are on (packing, unpacking and the dequantized weight: no round trip through the
host); the checkpoint tensors go to the host once, when the layer is handed to output.LayerWriter.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..core.config import Method
from ..core.errors import NumericalError
from .grid import QuantizedWeight
from .pack import (fp16_checked, pack_awq, pack_gptq, unpack_awq_qweight, unpack_awq_qzeros, unpack_gptq_qweight,
                   unpack_gptq_qzeros)

SUFFIXES = {Method.GPTQ: ("qweight", "qzeros", "scales", "g_idx"), Method.AWQ: ("qweight", "qzeros", "scales")}


def to_tensors(q: QuantizedWeight, method: Method, name: str) -> dict[str, Tensor]:
    """Checkpoint tensors of one Linear (keys are the SUFFIXES), on q's device; scales checked against fp16's
    range."""
    scales = fp16_checked(q.scale.t().contiguous(), f"{name}.scales")  # [n_groups, N] fp16
    codes, zero = q.codes, q.zero
    if method is Method.GPTQ:
        if bool((zero == 0).any()):
            raise NumericalError(
                f"{name}: a zero point of 0 (an asymmetric group with no negative weights) is stored as 2**bits-1 in "
                "GPTQ v1, and gptqmodel's v1->v2 load conversion carries it into the next field; use --sym "
                "(the default) for this checkpoint")
        qweight, qzeros = pack_gptq(codes, zero, q.bits)
        return {"qweight": qweight, "qzeros": qzeros, "scales": scales, "g_idx": q.g_idx.to(torch.int32)}
    natural = torch.arange(codes.shape[1], device=q.g_idx.device) // (codes.shape[1] // zero.shape[1])
    if not torch.equal(q.g_idx, natural):
        raise ValueError(f"{name}: the AWQ gemm format has no g_idx; groups must be i // G")
    qweight, qzeros = pack_awq(codes, zero)
    return {"qweight": qweight, "qzeros": qzeros, "scales": scales}


def from_tensors(t: dict[str, Tensor], method: Method, bits: int, in_features: int) -> Tensor:
    """The dequantized weight [N, K] fp32 that `t` encodes: scale * (code - zero), per column's group; on t's device.

    Elementwise the same float operations as (codes - zero[:, g_idx]) * scale[:, g_idx], done in place on one
    [N, K] fp32 tensor; groups i // G (every AWQ and non-act-order GPTQ layer) broadcast a [N, n_groups, 1] view
    instead of gathering [N, K] copies of zero and scale.
    """
    if method is Method.GPTQ:
        codes = unpack_gptq_qweight(t["qweight"], bits, in_features)          # [N, K]
        zero = unpack_gptq_qzeros(t["qzeros"], bits, codes.shape[0])          # [N, n_groups]
        g_idx = t["g_idx"].long()
    else:
        codes = unpack_awq_qweight(t["qweight"])                             # [N, K]
        zero = unpack_awq_qzeros(t["qzeros"])
        g_idx = None
    scale = t["scales"].float().t()                                           # [N, n_groups]
    n, n_groups = zero.shape
    w = codes.float()
    natural = g_idx is None or torch.equal(
        g_idx, torch.arange(in_features, device=g_idx.device) // (in_features // n_groups))
    if natural:
        view = w.view(n, n_groups, in_features // n_groups)
        view.sub_(zero.unsqueeze(-1)).mul_(scale.unsqueeze(-1))
        return w
    return w.sub_(zero[:, g_idx]).mul_(scale[:, g_idx])
