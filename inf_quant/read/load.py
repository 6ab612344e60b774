"""Open a checkpoint directory and materialise it one piece at a time, straight from the shards.

Nothing here builds the full model in memory: `skeleton()` is a meta-device model (no storage), and
`load_block()` / `load_module()` read only the tensors of one decoder layer (or the embedding, final norm,
lm_head), so peak memory is O(one layer) whatever the depth. `LayerReader` hands the block loop its layers in
order, reading layer i + 1 on a background thread while layer i computes (one layer as stored held ahead).
Host reads are plain file reads at the header's offsets (`read_safetensors`): they release the GIL, so the
read-ahead overlaps the compute; reads to a GPU go through safetensors' `safe_open`. The headers are parsed once,
by checkpoint.check_checkpoint (pre-flight's, when the command ran it): a Checkpoint holds every tensor's dtype,
shape and byte range, and reads at those offsets without parsing a header again.
"""

from __future__ import annotations

import copy
import json
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from ..core.config import Layout
from ..core.errors import CheckpointError
from .checkpoint import PICKLES, CheckedCheckpoint, check_checkpoint
from .layermap import LayerMap, layer_map_for
from .layout import check_layout
from .shards import DTYPES, Tensor, read_header

# torch's side of shards.DTYPES: the dtypes this torch has (a name it lacks is refused by torch_dtype)
ST_NAMES = {getattr(torch, d.torch): name for name, d in DTYPES.items() if hasattr(torch, d.torch)}


@dataclass(frozen=True)
class Checkpoint:
    path: Path                            # as given
    config: dict                          # config.json as written
    weight_map: dict[str, str]            # tensor name -> file name in `path`
    tensors: dict[str, Tensor] = field(default_factory=dict, compare=False, repr=False)  # from the headers
    pickle: bool = False                  # weights in torch pickle files (only with allow_pickle)

    @property
    def model_type(self) -> str:
        return self.config.get("model_type", "")

    @property
    def layer_map(self) -> LayerMap:
        return layer_map_for(self.model_type)

    @property
    def num_layers(self) -> int:
        return int(self.config["num_hidden_layers"])

    @property
    def files(self) -> list[str]:
        return sorted(set(self.weight_map.values()))

    def names(self, prefix: str) -> list[str]:
        return sorted(n for n in self.weight_map if n.startswith(prefix))

    def read(self, names: list[str], device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
        """Read exactly these tensors, one shard file open at a time."""
        missing = [n for n in names if n not in self.weight_map]
        if missing:
            raise CheckpointError(f"{self.path}: tensors missing from the checkpoint: {', '.join(missing[:5])}")
        by_file: dict[str, list[str]] = {}
        for n in names:
            by_file.setdefault(self.weight_map[n], []).append(n)
        out: dict[str, torch.Tensor] = {}
        for fname, keys in sorted(by_file.items()):
            if self.pickle:
                sd = torch.load(self.path / fname, map_location="cpu", mmap=True, weights_only=True)
                got = {k: sd[k].to(device, copy=True) for k in keys}
                del sd
            elif torch.device(device).type == "cpu":
                got = read_safetensors(self.path / fname, keys, self.tensors)
            else:
                with safe_open(str(self.path / fname), framework="pt", device=str(device)) as f:
                    got = {k: f.get_tensor(k) for k in keys}
            for k, t in got.items():
                check_finite(k, t, self.path / fname)
            out.update(got)
        return {n: out[n] for n in names}

    def read_prefix(self, prefix: str, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
        """All tensors under `prefix`, keyed by their name relative to it."""
        names = self.names(prefix)
        if not names:
            raise CheckpointError(f"{self.path}: no tensors under {prefix!r}")
        return {n[len(prefix):]: t for n, t in self.read(names, device).items()}

    def info(self, name: str) -> Tensor:
        """dtype (a shards.DTYPES name), shape and bytes of one tensor as its header gives them."""
        return self.tensors[name]

    def dtype(self, name: str) -> torch.dtype:
        """The torch dtype one tensor is stored in."""
        return torch_dtype(self.tensors[name].dtype, self.path / self.weight_map[name])


def torch_dtype(name: str, path: Path) -> torch.dtype:
    """The torch dtype of a shards.DTYPES name."""
    if name in DTYPES and hasattr(torch, DTYPES[name].torch):
        return getattr(torch, DTYPES[name].torch)
    raise CheckpointError(f"{path}: holds {name} tensors, which inf-quant does not read with this torch (it reads "
                          f"{', '.join(ST_NAMES.values())}); convert the checkpoint to bf16")


def check_finite(name: str, t: torch.Tensor, path: Path) -> None:
    """A floating-point tensor read from a checkpoint holds no NaN/inf, so a damaged weight is named when its
    layer is read instead of when it is solved. One aminmax pass (NaN propagates into it, inf is its min or max):
    no mask is allocated, ~12 ms for 67M bf16 weights on this CPU (isfinite().all(): 0.5 s and one byte per weight)."""
    if not t.is_floating_point() or not t.numel():
        return
    lo, hi = torch.aminmax(t)
    if bool(torch.isfinite(lo)) and bool(torch.isfinite(hi)):
        return
    first = [int(i) for i in (~torch.isfinite(t)).nonzero()[0]]
    raise CheckpointError(f"{path}: tensor {name} holds NaN or inf values (first at index {first}); the checkpoint "
                          "is damaged: re-download or restore it")


def read_safetensors(path: Path, keys: list[str], header: dict[str, Tensor] | None = None) -> dict[str, torch.Tensor]:
    """These tensors of one safetensors file as fresh host tensors (the same bytes safe_open gives), each read
    with readinto at its header offsets: a read releases the GIL, so another thread's compute goes on meanwhile.
    header: the file's tensors as shards.read_header gave them (a Checkpoint's, parsed when it was checked); None
    parses it here."""
    out, header = {}, read_header(path) if header is None else header
    with open(path, "rb", buffering=0) as f:
        for k in keys:
            h = header[k]
            buf = torch.empty(h.stop - h.start, dtype=torch.uint8)
            view, got = memoryview(buf.numpy()), 0
            f.seek(h.start)
            while got < len(view):
                r = f.readinto(view[got:])
                if not r:
                    raise CheckpointError(f"{path}: ends inside tensor {k} (bytes {h.start}..{h.stop}); "
                                          "the file is truncated, download it again")
                got += r
            out[k] = buf.view(torch_dtype(h.dtype, path)).reshape(h.shape)
    return out


def open_checkpoint(path: str | Path, allow_pickle: bool = False,
                    checked: CheckedCheckpoint | None = None) -> Checkpoint:
    """Open a checkpoint directory: config.json plus an index + shards, or a single safetensors file.

    checked: pre-flight's check_checkpoint of this same directory; its parsed config and headers are used as they
    are, nothing is read or checked again. None: the config, index and every shard header are checked here."""
    checked = checked or check_checkpoint(path, allow_pickle, bf16_input=False)
    path = Path(path)
    if not checked.pickle:
        return Checkpoint(path, checked.config, checked.weight_map, checked.tensors)
    return Checkpoint(path, checked.config, *_pickle_tensors(path), pickle=True)  # allowed, headers not checked


def _pickle_tensors(path: Path) -> tuple[dict[str, str], dict[str, Tensor]]:
    """(weight map, every tensor's dtype and shape) of a pickle checkpoint, its files loaded on the meta device."""
    index, *singles = PICKLES
    if (path / index).is_file():
        weight_map, single = dict(json.loads((path / index).read_text())["weight_map"]), None
    else:
        weight_map, single = {}, next(p for p in singles if (path / p).is_file())
    tensors = {}
    for fname in sorted(set(weight_map.values())) if single is None else [single]:
        sd = torch.load(path / fname, map_location="meta", mmap=True, weights_only=True)
        for k, v in sd.items():
            if v.dtype not in ST_NAMES:
                raise CheckpointError(f"{path / fname}: tensor {k} is {v.dtype}, which inf-quant does not read; "
                                      "convert the checkpoint to bf16")
            tensors[k] = Tensor(ST_NAMES[v.dtype], tuple(v.shape))
            if single is not None:
                weight_map[k] = single
    return weight_map, tensors


def hf_config(ckpt: Checkpoint, trust_remote_code: bool = False):
    """The transformers config object. INF's `auto_map` (remote code) is ignored unless trust_remote_code."""
    if trust_remote_code:
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(str(ckpt.path), trust_remote_code=True)
    from transformers.models.llama.configuration_llama import LlamaConfig
    from transformers.models.stablelm.configuration_stablelm import StableLmConfig

    from ..models.configuration_inflm import INFLMConfig

    classes = {"inflm": INFLMConfig, "llama": LlamaConfig, "stablelm": StableLmConfig}
    ckpt.layer_map  # noqa: B018 - raises a clear CheckpointError for unsupported model types
    if ckpt.model_type == "stablelm":
        check_layout(ckpt.config, Layout.STABLELM, str(ckpt.path))  # only INF's settings compute the inflm block
    cfg = {k: v for k, v in ckpt.config.items() if k not in ("auto_map", "quantization_config")}
    return classes[ckpt.model_type].from_dict(cfg)


def skeleton(config) -> nn.Module:
    """The whole causal LM on the meta device: module structure and shapes, no storage."""
    from transformers import AutoModelForCausalLM

    config._attn_implementation = "sdpa"
    with torch.device("meta"):
        if config.model_type == "inflm":
            from ..models.modeling_inflm import INFLMForCausalLM

            return INFLMForCausalLM(config)
        return AutoModelForCausalLM.from_config(config)


def load_module(ckpt: Checkpoint, meta_module: nn.Module, prefix: str, device, dtype: torch.dtype,
                tensors: dict[str, torch.Tensor] | None = None) -> nn.Module:
    """A real copy of `meta_module` with its tensors read from the checkpoint names under `prefix` (or given:
    `tensors`, as read_prefix(prefix) returns them)."""
    module = copy.deepcopy(meta_module)
    tensors = ckpt.read_prefix(prefix) if tensors is None else tensors
    expected = set(module.state_dict())
    if set(tensors) != expected:
        raise CheckpointError(
            f"{ckpt.path}: tensors under {prefix!r} do not match the architecture: "
            f"missing {sorted(expected - set(tensors))[:4]}, unexpected {sorted(set(tensors) - expected)[:4]}"
        )
    for name, t in tensors.items():
        shape = tuple(module.get_parameter(name).shape)
        if tuple(t.shape) != shape:
            raise CheckpointError(f"{ckpt.path}: {prefix}{name} has shape {tuple(t.shape)}, config implies {shape}")
    module.load_state_dict({k: v.to(device=device, dtype=dtype) for k, v in tensors.items()}, assign=True)
    return module.eval().requires_grad_(False)


def load_block(ckpt: Checkpoint, skel: nn.Module, i: int, device, dtype: torch.dtype) -> nn.Module:
    """Decoder layer i, materialised alone."""
    lm = ckpt.layer_map
    return load_module(ckpt, skel.get_submodule(lm.blocks)[i], lm.block_prefix(i), device, dtype)


class LayerReader:
    """The decoder layers in order (load_block's modules), each read ahead on one background thread: asking for
    layer i starts the read of layer i + 1, so it overlaps layer i's compute. Holds one layer as stored (host
    memory) beyond the one being computed. Use as a context manager; a failed read raises where its layer is
    asked for. Asking out of order reads that layer in the caller's thread."""

    def __init__(self, ckpt: Checkpoint, skel: nn.Module, device, dtype: torch.dtype):
        self.ckpt, self.skel, self.device, self.dtype = ckpt, skel, device, dtype
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="inf-quant-read")
        self._ahead: tuple[int, Future] | None = None

    def _read(self, i: int) -> dict[str, torch.Tensor]:
        return self.ckpt.read_prefix(self.ckpt.layer_map.block_prefix(i))

    def block(self, i: int) -> nn.Module:
        if self._ahead is not None and self._ahead[0] == i:
            tensors = self._ahead[1].result()
        else:
            self._drop_ahead()
            tensors = self._read(i)
        self._ahead = None
        if i + 1 < self.ckpt.num_layers:
            self._ahead = (i + 1, self._pool.submit(self._read, i + 1))
        lm = self.ckpt.layer_map
        return load_module(self.ckpt, self.skel.get_submodule(lm.blocks)[i], lm.block_prefix(i), self.device,
                           self.dtype, tensors)

    def _drop_ahead(self) -> None:
        if self._ahead is not None:
            if not self._ahead[1].cancel():  # running: wait; its error belongs to a layer nobody asked for
                self._ahead[1].exception()
            self._ahead = None

    def close(self) -> None:
        self._drop_ahead()
        self._pool.shutdown(wait=True)

    def __enter__(self) -> "LayerReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def load_named(ckpt: Checkpoint, skel: nn.Module, name: str, device, dtype: torch.dtype) -> nn.Module:
    """Embedding, final norm or lm_head (by their layer-map names)."""
    return load_module(ckpt, skel.get_submodule(name), name + ".", device, dtype)


def embed_ids(ckpt: Checkpoint, ids: torch.Tensor, device, dtype: torch.dtype) -> torch.Tensor:
    """The embedding rows of ids [S, T] in the compute dtype: [S, T, D]. The table stays in its stored dtype and
    only the gathered rows are converted, so no compute-dtype copy of the table is made (fp32 on CPU: 3.2 GB for
    INF-34B); the same values as the embedding module in that dtype (a gather, then an exact bf16 upcast)."""
    name = ckpt.layer_map.embed + "."
    tensors = ckpt.read_prefix(name, device)
    w = tensors.get("weight")
    if set(tensors) != {"weight"} or w.dim() != 2:
        raise CheckpointError(f"{ckpt.path}: expected one 2-D tensor {name}weight, found {sorted(tensors)}")
    return w[ids.to(device)].to(dtype)


def rotary(config, device) -> nn.Module:
    """The rope module on a real device (the skeleton's buffers are on meta)."""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    with torch.device(device):
        return LlamaRotaryEmbedding(config)
