"""Our own dequantized reference of a GPTQ/AWQ checkpoint: the bf16 architecture with every quantized Linear
replaced by the weight its packed tensors encode. Tests compare what transformers' backend computes against it.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..core.config import Method
from ..quant.qformat import SUFFIXES, from_tensors
from ..read.load import hf_config, open_checkpoint


def load_dequantized(quant_dir: str | Path, dtype: torch.dtype = torch.float32):
    """A plain (unquantized) causal LM holding the dequantized weights of `quant_dir`."""
    from transformers import AutoModelForCausalLM

    ckpt = open_checkpoint(quant_dir)
    qcfg = ckpt.config["quantization_config"]
    method, bits = Method(qcfg["quant_method"]), int(qcfg["bits"])
    config = hf_config(ckpt)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    state = {}
    params = dict(model.named_parameters())
    quantized = {n.rsplit(".", 1)[0] for n in ckpt.weight_map if n.endswith(".qweight")}
    for name in params:
        module = name.rsplit(".", 1)[0]
        if module in quantized:
            t = ckpt.read([f"{module}.{s}" for s in SUFFIXES[method]])
            t = {k.rsplit(".", 1)[1]: v for k, v in t.items()}
            state[name] = from_tensors(t, method, bits, params[name].shape[1])
        else:
            state[name] = ckpt.read([name])[name]
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=True)
    return model
