"""Frozen dataclasses for every stage's settings. Defaults live here and nowhere else."""

from __future__ import annotations

import typing
from dataclasses import dataclass, field, fields, is_dataclass, replace
from enum import Enum

from .errors import ConfigError

MIN_SEQLEN = 16  # tokens per calibration/eval window: below this a window says little about attention
MAX_SEED = 2**32 - 1  # numpy's seed range; torch's Generator takes it too


def check_bits(what: str, bits: int, allowed: tuple[int, ...], why: str) -> None:
    """The one bit-width rule, for every place that takes a width: `what` must be one of `allowed`, for the
    reason `why` (the grid's uint8 codes, the int32 packing, a format, what a loader takes)."""
    if bits not in allowed:
        words = ", ".join(map(str, allowed[:-1])) + " or " if len(allowed) > 1 else ""
        raise ConfigError(f"{what} must be {words}{allowed[-1]} ({why}), got {bits!r}")


def _check_group_size(section: str, group_size: int) -> None:
    if group_size != -1 and (group_size < 8 or group_size % 8):
        raise ConfigError(f"{section}.group_size must be -1 (per-channel) or a positive multiple of 8, got {group_size}")


def resolve_group_size(k: int, group_size: int, name: str = "linear") -> int:
    """Columns per group G for a layer with in_features k; group_size -1 means one group over all k.
    (Here, not in quant/, so pre-flight can check every layer before torch is imported.)"""
    if group_size == -1:
        return k
    if group_size < 1 or k % group_size:
        fits = [g for g in (16, 32, 64, 128, 256, 512, 1024) if k % g == 0]
        hint = f"use {', '.join(map(str, fits))} or -1" if fits else "use -1 (per-channel)"
        raise ConfigError(f"{name}: in_features={k} is not divisible by group_size={group_size}; {hint}")
    return group_size


class Order(Enum):
    """The order GPTQ solves a Linear's input columns in (it decides which columns absorb the others' error)."""

    NATURAL = "natural"          # 0..K-1 (the GPTQ paper's default)
    GROUP_AWARE = "group-aware"  # groups by max diag(H), columns by diag(H) inside each group; g_idx = i // G
    ACT = "act"                  # all columns by diag(H) (desc_act); g_idx unsorted unless static_groups


CLIP_NORM = 2.4  # gptq.clip_norm's default: the GPTQ reference's find_params(mse=True) exponent


class Smooth(Enum):
    """What GPTQ does to the layer before its solve."""

    NONE = "none"
    AWQ = "awq"  # AWQ's activation-aware scale search, folded into the previous norm/linear; output stays GPTQ v1
    AUTO = "auto"  # awq at 4 bits (measured: README, "Choosing GPTQ settings"), none at 8 (a tie with the peer already)


class SmoothLoss(Enum):
    """What gptq.smooth: awq scores each candidate scale by (its weights Q(W s)/s against W)."""

    DIAG = "diag"      # sum_j mean(x_j^2) (w_j - q_j)^2 over the group's linears: elementwise, no forward
    MODULE = "module"  # AutoAWQ's: MSE of the output of the module the group feeds (attention, MLP); ~5 x the CPU


@dataclass(frozen=True)
class GPTQConfig:
    bits: int = 4
    group_size: int = 128      # columns per (scale, zero); -1 = one group over all K (per-channel)
    sym: bool = True
    damp: float = 0.01         # fraction of mean(diag H) added to the diagonal
    damp_max_retries: int = 3  # on Cholesky failure: damp x10 at most this many times, then NumericalError
    block_size: int = 128      # columns per lazy batch update
    order: Order = Order.GROUP_AWARE  # NATURAL and GROUP_AWARE are Marlin-compatible; ACT is GPTQ's desc_act
    static_groups: bool = False  # with order act: fix all group qparams before the solve (keeps g_idx = i // G)
    clip_steps: int = 20         # per-group range shrink candidates searched for the least error; 0 = min/max
    clip_max_shrink: float = 0.2  # the smallest range tried is (1 - clip_max_shrink) x min/max
    # the range search's error per group: with clip_weight, sum_j diag(H)_j (w_j - q_j)^2 (each column's squared
    # error times its mean squared input: the diagonal of the output error |X(w - q)|^2); without, the GPTQ
    # reference's find_params(mse=True) sum_j |w_j - q_j|^clip_norm
    clip_weight: bool = True
    clip_norm: float = CLIP_NORM  # the unweighted search's exponent p (clip_weight: false only)
    lm_head: bool = False        # also GPTQ the lm_head (head.py; `lm_head: true` for GPTQModel and vLLM)
    smooth: Smooth = Smooth.AUTO  # awq: the AWQ scale search (recipe's awq: search keys) folded in before the solve
    smooth_loss: SmoothLoss = SmoothLoss.DIAG  # with smoothing: what each candidate scale is scored by
    smooth_tokens: int = 4096  # with smoothing: calibration tokens its search reads, max(1, this // T) whole samples

    def __post_init__(self):
        check_bits("gptq.bits", self.bits, (4, 8), "the bit widths Marlin/vLLM and gptqmodel load")
        _check_group_size("gptq", self.group_size)
        if not 0 < self.damp < 1:
            raise ConfigError(f"gptq.damp must be in (0, 1), got {self.damp}")
        if self.block_size < 1:
            raise ConfigError(f"gptq.block_size must be >= 1, got {self.block_size}")
        if self.static_groups and self.order is not Order.ACT:
            raise ConfigError("gptq.static_groups only applies with order: act")
        if self.clip_steps < 0 or not 0 <= self.clip_max_shrink < 1 or self.clip_norm <= 0:
            raise ConfigError("gptq: clip_steps must be >= 0, clip_max_shrink in [0, 1), clip_norm > 0")
        if self.clip_weight and self.clip_norm != CLIP_NORM:
            raise ConfigError(f"gptq.clip_norm (--clip-norm) is the unweighted range search's exponent; with "
                              f"clip_weight (the default) the error is sum diag(H) (w - q)^2; add --no-clip-weight "
                              f"(clip_weight: false) or drop it")
        if self.smooth_tokens < 1:
            raise ConfigError(f"gptq.smooth_tokens must be >= 1, got {self.smooth_tokens}")
        if self.smooth is Smooth.AWQ:
            check_bits("gptq.bits with smooth: awq (--smooth awq)", self.bits, (4,), "8-bit GPTQ loses ~0 already")

    @property
    def smooths(self) -> bool:
        """Whether AWQ's scales are folded in before the solve: smooth awq, or auto at 4 bits."""
        return self.smooth is Smooth.AWQ or (self.smooth is Smooth.AUTO and self.bits == 4)


class ScaleForms(Enum):
    """Which AWQ scale forms the search tries, each over the same exponent grid a in {0, 1/n, ..., (n-1)/n}."""

    PLAIN = "plain"  # s = x_mean ** a (Lin et al. 2023, Eq. 5)
    DUO = "duo"      # s = x_mean ** a / w_mean ** (1 - a) (AutoAWQ's duo_scaling, its default)
    BOTH = "both"    # both forms; the better one is kept per group


class WeightSolve(Enum):
    """How AWQ turns its scaled weights into codes."""

    RTN = "rtn"    # AutoAWQ: per-group clip search, then round to nearest
    GPTQ = "gptq"  # a GPTQ solve on the scaled weights (asymmetric, group-aware order, range search): same format


@dataclass(frozen=True)
class AWQConfig:
    bits: int = 4
    group_size: int = 128
    zero_point: bool = True
    grid_points: int = 20       # scale exponent alpha in {0, 1/n, ..., (n-1)/n}
    clip_grid: int = 20         # max-abs shrink ratios tried by the clip search
    clip_max_shrink: float = 0.5  # smallest ratio tried is 1 - clip_max_shrink
    clip_tokens: int = 512      # calibration tokens sampled for the clip search
    search_tokens: int = 16384  # tokens for the scale search: max(1, this // T) whole samples, evenly spaced
    scale_forms: ScaleForms = ScaleForms.PLAIN  # duo measured no better on SmolLM2-135M at 1.8x the cost
    coarse_step: int = 2        # per form: every k-th alpha, then the k-1 on each side of the best; 1 = all (AutoAWQ)
    solve: WeightSolve = WeightSolve.GPTQ  # after the scales: a GPTQ solve (measured best), or AutoAWQ's clip + round

    def gptq(self, solve: GPTQConfig) -> GPTQConfig:
        """The GPTQ settings of solve=gptq: this grid (these bits and group size, asymmetric: the AWQ gemm format)
        with the recipe's gptq: section for the rest of the solve (damp, order, block size, range search). Its range
        search is not weighed by diag(H) (clip_weight): measured for the symmetric GPTQ grid only (README,
        "Choosing GPTQ settings"), so AWQ's output is what it was before that default."""
        return replace(solve, bits=self.bits, group_size=self.group_size, sym=False, clip_weight=False)

    def __post_init__(self):
        check_bits("awq.bits", self.bits, (4,), "the AWQ gemm format")
        _check_group_size("awq", self.group_size)
        if not self.zero_point:
            raise ConfigError("awq.zero_point must be true: the AWQ gemm format stores a zero point per group")
        if min(self.grid_points, self.clip_grid, self.search_tokens, self.clip_tokens, self.coarse_step) < 1:
            raise ConfigError("awq.grid_points, clip_grid, search_tokens, clip_tokens and coarse_step must be >= 1")
        if not 0 <= self.clip_max_shrink < 1:
            raise ConfigError(f"awq.clip_max_shrink must be in [0, 1), got {self.clip_max_shrink}")


class Method(Enum):
    GPTQ = "gptq"
    AWQ = "awq"


class Layout(Enum):
    """How an INF-architecture output is laid out for loaders (see layout.py)."""

    INFLM = "inflm"        # model_type inflm + the shipped modeling files (trust_remote_code), as INF ships it
    STABLELM = "stablelm"  # model_type stablelm in INF's settings: transformers, vLLM, SGLang load it natively


class Device(Enum):
    AUTO = "auto"  # cuda if available, else cpu
    CPU = "cpu"
    CUDA = "cuda"


def parse_device(text: str) -> tuple[Device, int]:
    """'auto' | 'cpu' | 'cuda' | 'cuda:N' -> (Device, GPU index); the CLI's --device."""
    name, _, index = text.partition(":")
    try:
        dev = Device(name)
        if index and (dev is not Device.CUDA or not index.isdigit()):
            raise ValueError
    except ValueError:
        raise ConfigError(f"--device {text!r}: use auto, cpu, cuda or cuda:N (N = the GPU index)") from None
    return dev, int(index or 0)


class CudaPath(Enum):
    """CUDA-only paths that no GPU run of this project has compared with the eager path yet: off unless the recipe
    names them (run.unproven_cuda, --unproven-cuda); a CPU run refuses them."""
    BF16_HESSIAN = "bf16-hessian"    # Hessian GEMMs on bf16 activations with fp32 accumulation (torch.mm out_dtype)
    GRAPH_COLUMNS = "graph-columns"  # each 128-column block of the GPTQ column loop replayed as one CUDA graph


class DType(Enum):
    AUTO = "auto"  # bfloat16 on CUDA; float32 on CPU (exact upcast of bf16 weights; CPUs without bf16 units run it 6x faster)
    BF16 = "bfloat16"
    FP32 = "float32"


@dataclass(frozen=True)
class ModelConfig:
    path: str = "bundled"           # checkpoint directory; "bundled" = models/inf-tiny; "" = must be given (--model)
    trust_remote_code: bool = False  # run the checkpoint's own config/modeling code instead of inf-quant's
    allow_pickle: bool = False       # accept torch pickle (.bin/.pt) weights


@dataclass(frozen=True)
class CalibConfig:
    source: str = "bundled"  # bundled (plain text), bundled-chat, bundled-mix (both), or a .jsonl / .txt path
    samples: int = 128
    seqlen: int = 0          # 0 = min(2048, the model's max_position_embeddings)
    seed: int = 0
    sha256: str = ""         # if set, the calibration files (concatenated, in mix order) must hash to this

    def __post_init__(self):
        if self.samples < 1:
            raise ConfigError(f"calibration.samples must be >= 1, got {self.samples}")
        if not 0 <= self.seed <= MAX_SEED:
            raise ConfigError(f"calibration.seed (--seed) must be in 0..{MAX_SEED} (what torch and numpy generators "
                              f"accept), got {self.seed}")
        if self.seqlen and self.seqlen < MIN_SEQLEN or self.seqlen < 0:
            raise ConfigError(f"calibration.seqlen (--seqlen) must be >= {MIN_SEQLEN} tokens (or 0 for the model "
                              f"default), got {self.seqlen}")


@dataclass(frozen=True)
class RunConfig:
    device: Device = Device.AUTO
    gpu: int = 0               # CUDA device index (--device cuda:N)
    dtype: DType = DType.AUTO  # forward-pass compute dtype; Hessians and solves are always fp32
    forward_batch: int = 4     # calibration samples per forward chunk
    unproven_cuda: tuple[CudaPath, ...] = ()  # opt-in CUDA paths not yet proven on a GPU (CudaPath)

    def __post_init__(self):
        if self.forward_batch < 1:
            raise ConfigError(f"run.forward_batch must be >= 1, got {self.forward_batch}")
        # one spelling per set of paths: the recipe (and a resume's fingerprint) does not depend on their order
        object.__setattr__(self, "unproven_cuda", tuple(sorted(set(self.unproven_cuda), key=lambda c: c.value)))


@dataclass(frozen=True)
class OutputConfig:
    dir: str = ""             # "" = out/<model>-<method>-w<bits>g<group>
    shard_gb: float = 5.0     # max bytes per safetensors shard, in 1e9 bytes
    force: bool = False       # replace an existing output directory
    resume: bool = False      # continue an interrupted run from its last finished layer
    serve_as: Layout = Layout.INFLM  # layout of an INF-architecture output (llama inputs stay llama)

    def __post_init__(self):
        if self.shard_gb <= 0:
            raise ConfigError(f"output.shard_gb must be > 0, got {self.shard_gb}")


def to_dict(obj) -> dict:
    """Dataclass -> plain dict (enums as values), for JSON/YAML."""
    out = {}
    for f in fields(obj):
        v = getattr(obj, f.name)
        out[f.name] = (to_dict(v) if is_dataclass(v) else v.value if isinstance(v, Enum) else
                       [x.value if isinstance(x, Enum) else x for x in v] if isinstance(v, tuple) else v)
    return out


@dataclass(frozen=True)
class Gates:
    """Pass/fail thresholds of `verify`, applied to every domain (en/zh/code/math) and to all tokens."""

    max_ppl_increase_pct: float = 3.0  # quantized perplexity at most this % above bf16's
    max_kl: float = 0.05               # mean per-token KL(bf16 || quantized), nats
    min_top1_agreement: float = 0.90   # fraction of positions whose argmax token matches bf16's
    min_domain_tokens: int = 256       # domains with fewer eval tokens are reported but not gated
    require_fit: bool = True           # the analytic VRAM total at verify.context must fit verify.vram_gib

    def __post_init__(self):
        if self.max_ppl_increase_pct < 0 or self.max_kl < 0 or not 0 <= self.min_top1_agreement <= 1:
            raise ConfigError("gates: max_ppl_increase_pct and max_kl must be >= 0, min_top1_agreement in [0, 1]")


@dataclass(frozen=True)
class VerifyConfig:
    quantized: str = ""           # the quantized checkpoint directory
    baseline: str = "bundled"     # its bf16 source; "bundled" = models/inf-tiny
    eval: str = "bundled-eval"    # 'bundled-eval' or a .jsonl ({'text', 'lang'}) / .txt file
    seqlen: int = 512             # tokens per eval window (clipped to max_position_embeddings)
    max_windows: int = 0          # 0 = every window of the eval set
    top_k: int = 32               # baseline log-probs cached per position (KL support)
    baseline_gib: float = 2.0     # hidden states per pass of the layer-streamed baseline (memory.windows_per_pass)
    gates: Gates = field(default_factory=Gates)
    device: Device = Device.AUTO
    gpu: int = 0                  # CUDA device index (--device cuda:N)
    vram_gib: float = 24.0
    context: int = 0              # 0 = the model's max_position_embeddings
    kv_dtype: str = "fp16"
    measure_context: int = 0      # CUDA measurement prefill length; 0 = min(context, 4096)
    report_dir: str = ""          # "" = write verify.json/report.md into the quantized directory
    cache_dir: str = ""           # "" = ~/.cache/inf-quant (baseline results, file hashes)
    trust_remote_code: bool = False

    def __post_init__(self):
        if self.seqlen < MIN_SEQLEN:
            raise ConfigError(f"verify.seqlen (--seqlen) must be >= {MIN_SEQLEN} tokens, got {self.seqlen}")
        for flag, value, ok, rule in (("--top-k", self.top_k, self.top_k >= 1, ">= 1"),
                                      ("--max-windows", self.max_windows, self.max_windows >= 0, ">= 0"),
                                      ("--vram-gib", self.vram_gib, self.vram_gib > 0, "> 0"),
                                      ("--context", self.context, self.context >= 0, ">= 0"),
                                      ("--baseline-gib", self.baseline_gib, self.baseline_gib > 0, "> 0")):
            if not ok:
                raise ConfigError(f"verify {flag} must be {rule}, got {value:g}")


@dataclass(frozen=True)
class Recipe:
    name: str = ""
    method: Method = Method.GPTQ
    model: ModelConfig = field(default_factory=ModelConfig)
    calibration: CalibConfig = field(default_factory=CalibConfig)
    gptq: GPTQConfig = field(default_factory=GPTQConfig)
    awq: AWQConfig = field(default_factory=AWQConfig)
    run: RunConfig = field(default_factory=RunConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    verify: VerifyConfig = field(default_factory=VerifyConfig)  # gates and VRAM budget used by `release`
    # linears left in bf16: a layer-relative name ("mlp.down_proj": in every layer) or, AWQ only, one layer's
    # ("model.layers.0.mlp.down_proj"); resolved and checked against the layer map by preflight.resolve_skip
    skip: tuple[str, ...] = ()

    def __post_init__(self):
        bad = [s for s in self.skip if not isinstance(s, str) or not s.strip() or s != s.strip()]
        if bad:
            raise ConfigError(f"skip: entries must be module names, got {bad[0]!r}")
        self._check_sections_read()

    def _check_sections_read(self) -> None:
        """Every key set is read: awq reads gptq: only for its GPTQ solve (and not the grid keys, which come from
        awq:) and its clip keys only for solve rtn; gptq reads awq:'s scale search keys (and its own smooth_loss and
        smooth_tokens) only when it smooths (smooth: awq, or auto at 4 bits). A key that would be ignored is an error
        naming it."""
        g, a = _changed(self.gptq), _changed(self.awq)
        if self.method is Method.GPTQ:
            unread = [k for k in g if k in ("smooth_loss", "smooth_tokens")]
            if unread and not self.gptq.smooths:
                raise ConfigError(f"gptq.{unread[0]}: read only when GPTQ smooths (smooth: awq, or auto at 4 bits), "
                                  f"and this recipe's smooth is {self.gptq.smooth.value} at {self.gptq.bits} bits; "
                                  "remove it")
            search = ("grid_points", "scale_forms", "coarse_step")  # what GPTQ's smoothing reads from awq:
            unread = [k for k in a if not self.gptq.smooths or k not in search]
            if unread:
                raise ConfigError(f"awq.{unread[0]}: method gptq reads from the awq: section only the scale search "
                                  f"keys ({', '.join(search)}) and only when it smooths (smooth: awq, or auto at 4 "
                                  "bits); remove it, or run the recipe with `inf-quant awq` (method: awq)")
            return
        unmeasured = [k for k in g if k in ("clip_weight", "smooth", "smooth_loss", "smooth_tokens")]
        if unmeasured:
            raise ConfigError(f"gptq.{unmeasured[0]}: method awq's GPTQ solve does not read it (its range search is "
                              "not weighed by diag(H), and it has its own scales); remove it from gptq:")
        grid = [k for k in g if k in ("bits", "group_size", "sym", "lm_head")]
        if grid:
            raise ConfigError(f"gptq.{grid[0]}: method awq takes bits and group_size from awq: (its GPTQ solve is "
                              "asymmetric, the AWQ gemm format, and has no lm_head); remove it from gptq:")
        if g and self.awq.solve is WeightSolve.RTN:
            raise ConfigError(f"gptq.{g[0]}: the gptq: section is read by awq only with solve: gptq (--solve "
                              "gptq); remove it, or drop solve: rtn")
        clip = [k for k in a if k in ("clip_grid", "clip_max_shrink", "clip_tokens")]
        if clip and self.awq.solve is WeightSolve.GPTQ:
            raise ConfigError(f"awq.{clip[0]}: the clip search runs only with solve: rtn (--solve rtn; solve: gptq "
                              "searches ranges with gptq.clip_steps); remove it, or set solve: rtn")
        if self.gptq.order is Order.ACT and not self.gptq.static_groups:
            raise ConfigError("gptq.order: act (--order act) unsorts g_idx, which the AWQ gemm format cannot store; "
                              "add static_groups: true (--static-groups) or use group-aware or natural")

    def with_overrides(self, over: dict) -> Recipe:
        """This recipe with `over` applied: {section: {key: value}} and top-level {key: value}, values spelled as in
        a recipe file (enums by value, lists for tuples); checked like a loaded recipe. The CLI's flags, `release
        --model`."""
        return _override(self, over, "")

    @property
    def bits(self) -> int:
        return self.gptq.bits if self.method is Method.GPTQ else self.awq.bits

    @property
    def group_size(self) -> int:
        return self.gptq.group_size if self.method is Method.GPTQ else self.awq.group_size

    def fingerprint_dict(self) -> dict:
        """What determines the output bytes (everything but where it goes and how the run is resumed)."""
        d = to_dict(self)
        d["output"] = {"shard_gb": self.output.shard_gb, "serve_as": self.output.serve_as.value}
        del d["verify"]
        return d


def _changed(section) -> list[str]:
    """The keys of a recipe section (a dataclass without nested ones) that differ from their defaults."""
    return [f.name for f in fields(section) if getattr(section, f.name) != f.default]


def _override(obj, over: dict, where: str):
    hints = typing.get_type_hints(type(obj))
    kw = {k: _override(getattr(obj, k), v, f"{where}{k}.") if isinstance(v, dict) else _coerce(hints[k], v, where + k)
          for k, v in over.items()}
    return replace(obj, **kw)


def _coerce(t, v, where: str):
    if is_dataclass(t):
        return from_dict(t, v, where)
    if isinstance(t, type) and issubclass(t, Enum):
        try:
            return t(v)
        except ValueError:
            raise ConfigError(f"{where}: {v!r} is not one of {', '.join(repr(m.value) for m in t)}") from None
    if typing.get_origin(t) is tuple:
        if not isinstance(v, (list, tuple)) or not all(isinstance(x, str) for x in v):
            raise ConfigError(f"{where}: expected a list of strings, got {v!r}")
        item = typing.get_args(t)[0]
        return tuple(_coerce(item, x, where) for x in v) if isinstance(item, type) and issubclass(item, Enum) \
            else tuple(v)
    ok = {bool: lambda x: isinstance(x, bool), int: lambda x: isinstance(x, int) and not isinstance(x, bool),
          float: lambda x: isinstance(x, (int, float)) and not isinstance(x, bool), str: lambda x: isinstance(x, str)}
    if t in ok and not ok[t](v):
        raise ConfigError(f"{where}: expected {t.__name__}, got {v!r}")
    return float(v) if t is float else v


def from_dict(cls, data, where: str):
    """Build dataclass `cls` from a mapping: unknown keys and wrongly typed values are errors naming the key."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in fields(cls)]
    for k in data:
        if k not in names:
            raise ConfigError(f"{where}.{k}: unknown key; known keys: {', '.join(names)}")
    kw = {k: _coerce(hints[k], v, f"{where}.{k}") for k, v in data.items()}
    try:
        return cls(**kw)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
