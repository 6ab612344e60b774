"""GPTQ (Frantar et al. 2022, "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers", Algorithm 1): Hessian accumulation and the blocked column solve.

Pure functions: arguments are never modified; all math runs in fp32 on the device of the weight.

Memory: H is [K, K] fp32, 1.8 GiB (1.94 GB) for down_proj at K=22016. gptq_quantize holds a
private copy of H plus, briefly, its Cholesky factor and inverse: at most 3 x K^2 fp32 of its own
at peak (5.4 GiB at K=22016), on top of the caller's H and [N, K] fp32 copies of W.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor

from ..core.config import GPTQConfig, Order
from ..core.errors import ConfigError, NumericalError
from .grid import QuantizedWeight, resolve_group_size, search_qparams

log = logging.getLogger(__name__)

SUB = 16  # columns per run inside a block of the column loop (_solve)


HESSIAN_BLOCKS = 8  # column blocks of the lower-triangle Hessian update (hessian_add_)


def _hessian_block(k: int) -> int:
    """Columns per block of hessian_add_ / hessian_finish_: K / HESSIAN_BLOCKS, at least 64."""
    return max(64, -(-k // HESSIAN_BLOCKS))


def hessian_add_(acc: Tensor, x: Tensor, bf16_gemm: bool = False) -> int:
    """Fold a batch of layer inputs into a running Hessian sum, in place: acc += X^T X on its lower triangle.

    acc: [K, K] fp32   the unscaled sum so far (zeros to start); only its lower triangle (with the diagonal) is
                       written and meaningful until hessian_finish_
    x: [M, K] float    layer inputs (leading dims are flattened: [S, T, K] works too); not modified
    bf16_gemm: on CUDA with bf16 x, multiply in bf16 with fp32 accumulation (torch.mm out_dtype): the products
               of bf16 values are exact in fp32, so only the summation order differs from the fp32 GEMM.
               Opt-in (run.unproven_cuda: bf16-hessian) until a GPU run has compared it.
    returns M, the rows folded in
    The update runs in HESSIAN_BLOCKS column blocks, acc[j0:, j0:j1] += X[:, j0:]^T X[:, j0:j1]: about half the
    FLOPs of the full product and no new [K, K] (the temporaries are one block: [K, K / HESSIAN_BLOCKS]).
    """
    x = x.reshape(-1, x.shape[-1])
    m, k = x.shape
    if acc.shape != (k, k) or acc.dtype != torch.float32:
        raise ConfigError(f"hessian_add_: the sum is {tuple(acc.shape)} {acc.dtype} but x has K={k} columns; "
                          f"start from torch.zeros(K, K) fp32")
    low = bf16_gemm and x.is_cuda and x.dtype == torch.bfloat16
    x = x.to(acc.device) if low else x.to(device=acc.device, dtype=torch.float32)
    b = _hessian_block(k)
    for j0 in range(0, k, b):
        j1 = min(k, j0 + b)
        if low:
            acc[j0:, j0:j1] += torch.mm(x[:, j0:].T, x[:, j0:j1], out_dtype=torch.float32)
        else:
            acc[j0:, j0:j1].addmm_(x[:, j0:].T, x[:, j0:j1])
    return m


def hessian_finish_(acc: Tensor, n: int) -> Tensor:
    """The GPTQ Hessian H = 2/n * X^T X from hessian_add_'s sum over n rows, in place: the lower triangle is
    mirrored to the upper one (H is exactly symmetric) and scaled once. acc: [K, K] fp32; returns acc."""
    if n <= 0:
        raise ConfigError("hessian_finish_: no rows were folded in (n=0); the calibration set reached no input")
    k = acc.shape[0]
    b = _hessian_block(k)
    for j0 in range(0, k, b):
        j1 = min(k, j0 + b)
        acc[j0:j1, j1:] = acc[j1:, j0:j1].T
        acc[j0:j1, j0:j1] = acc[j0:j1, j0:j1].tril() + acc[j0:j1, j0:j1].tril(-1).T
    return acc.mul_(2 / n)


def _cholesky_inverse_upper(h: Tensor) -> Tensor | None:
    """Upper Cholesky factor of H^-1 (the reference's Hinv), or None where H is not PD.

    h: [K, K] fp32, damped. Peak memory 2 x K^2 fp32 beyond h.
    """
    chol, info = torch.linalg.cholesky_ex(h)
    if info.item() != 0:
        return None
    hinv = torch.cholesky_inverse(chol)
    del chol
    hinv, info = torch.linalg.cholesky_ex(hinv, upper=True)
    if info.item() != 0 or not torch.isfinite(hinv).all():
        return None
    return hinv


def _damped_hinv_(H: Tensor, cfg: GPTQConfig, name: str) -> tuple[Tensor, float]:
    """Hinv of H + damp * mean(diag H) * I, raising damp x10 on failure at most cfg.damp_max_retries times.

    H: [K, K] fp32, the caller's private copy; the damping is added to its diagonal in place.
    Returns (Hinv: [K, K] fp32 upper triangular, damp used).
    """
    mean_diag = H.diagonal().mean()
    damp, added = cfg.damp, 0.0
    for attempt in range(cfg.damp_max_retries + 1):
        H.diagonal().add_((damp - added) * mean_diag)
        added = damp
        hinv = _cholesky_inverse_upper(H)
        if hinv is not None:
            return hinv, damp
        if attempt < cfg.damp_max_retries:
            log.warning("%s: Cholesky of H failed with damp=%g; retrying with damp=%g (retry %d of %d)",
                        name, damp, damp * 10, attempt + 1, cfg.damp_max_retries)
            damp *= 10
    raise NumericalError(
        f"{name}: H is not positive definite even with damp={damp:g} after {cfg.damp_max_retries} "
        f"retries (x10 each); use a larger --damp or more calibration samples"
    )


def solve_order(diag: Tensor, G: int, order: Order) -> Tensor | None:
    """The order the columns are solved in: a [K] int64 permutation, or None for 0..K-1 (Order.NATURAL).

    diag: [K] fp32, diag(H) with dead columns already set to 1
    ACT: all columns by descending diag(H) (GPTQ's act-order, the format's desc_act).
    GROUP_AWARE: the K // G groups of consecutive columns by descending max diag(H), and inside each group
        its columns by descending diag(H) (group-aware reordering, Gafni et al. 2025; GPTQModel's
        act_group_aware). Every group is still solved as one run of G columns, so its qparams are fixed at
        its first solved column from weights that already carry the error of the groups solved before it,
        and g_idx stays i // G (Marlin-compatible).
    Ties keep the lower column first (stable sorts), so the order is deterministic.
    """
    if order is Order.NATURAL:
        return None
    if order is Order.ACT:
        return torch.argsort(diag, descending=True, stable=True)
    d = diag.reshape(-1, G)                                                  # [K // G, G]
    local = torch.argsort(d, dim=1, descending=True, stable=True)            # [K // G, G]
    groups = torch.argsort(d.amax(dim=1), descending=True, stable=True)      # [K // G]
    return (groups.unsqueeze(1) * G + local[groups]).reshape(-1)


def _group_qparams(w: Tensor, cfg: GPTQConfig, hdiag: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Qparams of each row of w: [..., G] -> scale, zero [...]; min/max, or the clip search if cfg asks.
    hdiag: [G] fp32 diag(H) of the group's columns (in w's column order), given where cfg.clip_weight (gptq_quantize
    decides): the search's error is sum_j hdiag_j (w_j - q_j)^2 (an input channel's error costs its mean squared
    activation); None: sum_j |w_j - q_j|^cfg.clip_norm."""
    norm = cfg.clip_norm if hdiag is None else 2.0   # weighted: sum diag(H) (w - q)^2 (config.GPTQConfig)
    return search_qparams(w, cfg.bits, cfg.sym, cfg.clip_steps, cfg.clip_max_shrink, norm, hdiag)


def _current_group(W: Tensor, W1: Tensor, Err1: Tensor, Hinv: Tensor, i1: int, i: int, G: int) -> Tensor:
    """Up-to-date weights of the group starting at column j = i1 + i: [N, G] fp32.

    Columns inside the current block are current in W1; columns past the block (i2 on) have not yet
    received this block's lazy update, so it is applied here to a copy. This makes the blocked solve
    equal to the column-by-column one (the reference reads stale W past column j for mid-block groups).
    """
    i2 = i1 + W1.shape[1]
    end = i1 + i + G
    inside = W1[:, i:end - i1]
    if end <= i2:
        return inside
    outside = W[:, i2:end] - Err1[:, :i] @ Hinv[i1:i1 + i, i2:end]
    return torch.cat([inside, outside], dim=1)


def _column_(W1: Tensor, Err1: Tensor, Hinv1: Tensor, loss: Tensor, i: int, e: int, sc: Tensor, zf: Tensor,
             d, maxq: int) -> Tensor:
    """Quantize column i of a block and spread its error over the rest of its run (columns i+1..e-1), in place.

    W1, Err1: [N, B] fp32 the block's weights and scaled errors; Hinv1: [B, B] fp32; loss: [N] fp32 (+= the
    column's loss); sc, zf: [N] fp32 the column's group's scale and zero point; d: Hinv1[i, i] (a float, or a
    0-d tensor where no host synchronisation is allowed). Returns the column's codes [N] uint8.
    """
    w = W1[:, i]
    qf = torch.round(w / sc).add_(zf).clamp_(0, maxq)       # grid.quantize, kept in fp32
    err = (w - sc * (qf - zf)).div_(d)                      # (w - grid.dequantize) / d, [N]
    loss.addcmul_(err, err, value=0.5)                      # (w - q)^2 / d^2 / 2
    Err1[:, i] = err
    if i + 1 < e:
        W1[:, i + 1:e] -= err.unsqueeze(1) * Hinv1[i, i + 1:e].unsqueeze(0)
    return qf.to(torch.uint8)


def _solve(W: Tensor, Hinv: Tensor, G: int, cfg: GPTQConfig, col_group: list[int],
           static: tuple[Tensor, Tensor] | None, hdiag: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The blocked GPTQ column loop (Alg. 1 with lazy batch updates) over columns in solve order.

    W:    [N, K] fp32  weights in solve order; private working copy, modified in place
    Hinv: [K, K] fp32  upper Cholesky factor of the damped H^-1, in solve order
    col_group: the group (index into scale/zero) of each solve position
    static: (scale, zero [N, n_groups]) fixed before the solve, or None: the qparams of each group are fixed
            at its first solve position (j % G == 0; each group's G columns are consecutive in solve order)
            from the current weights of the G columns starting there.
    hdiag: [K] fp32 diag(H) in solve order (undamped), for cfg.clip_weight; None otherwise
    returns codes [N, K] uint8 (solve order), scale and zero [N, n_groups], the proxy loss per row [N].

    Two levels of lazy updates: columns go in blocks of cfg.block_size (B) whose error reaches the later columns
    in one GEMM, and inside a block in runs of SUB columns whose error reaches the rest of the block in one GEMM;
    a column's rank-1 update touches only its run. A run is cut short where a group's qparams are fixed, so the
    weights they are fixed from are current. Same math as the column-by-column update (tested against it); only
    the float summation order of the updates differs.
    """
    N, K = W.shape
    codes = torch.zeros(N, K, dtype=torch.uint8, device=W.device)
    if static is not None:
        scale, zero = static
    else:
        scale = torch.empty(N, K // G, dtype=torch.float32, device=W.device)
        zero = torch.empty(N, K // G, dtype=torch.int32, device=W.device)
    maxq = 2**cfg.bits - 1
    loss = torch.zeros(N, dtype=torch.float32, device=W.device)  # per row: rows are independent problems
    for i1 in range(0, K, cfg.block_size):
        i2 = min(i1 + cfg.block_size, K)
        B = i2 - i1
        W1 = W[:, i1:i2].clone()                     # [N, B]
        Err1 = torch.zeros_like(W1)                  # [N, B]
        Hinv1 = Hinv[i1:i2, i1:i2]                   # [B, B]
        d1 = Hinv1.diagonal().tolist()
        s1, g_cur = 0, None                          # start of the pending run; the group whose qparams are held
        for i in range(B):
            j = i1 + i
            if i % SUB == 0 and i > s1:              # end of a run: its error to the rest of the block
                W1[:, i:] -= Err1[:, s1:i] @ Hinv1[s1:i, i:]
                s1 = i
            g = col_group[j]
            e = min((i // SUB + 1) * SUB, B)           # end of this column's run
            if static is None and j % G == 0:
                if i > s1 and e < B:                 # the group's columns must be current: flush the run so far
                    W1[:, e:] -= Err1[:, s1:i] @ Hinv1[s1:i, e:]  # (the run's own columns already are)
                    s1 = i
                scale[:, g], zero[:, g] = _group_qparams(_current_group(W, W1, Err1, Hinv, i1, i, G), cfg,
                                                         None if hdiag is None else hdiag[j:j + G])
            if g != g_cur:
                sc, zf, g_cur = scale[:, g], zero[:, g].to(torch.float32), g
            codes[:, j] = _column_(W1, Err1, Hinv1, loss, i, e, sc, zf, d1[i], maxq)
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]         # lazy batch update of all later columns
    return codes, scale, zero, loss


def _aligned_block(W1: Tensor, Hinv1: Tensor, cfg: GPTQConfig,
                   hdiag1: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """One block of the column loop where the block is exactly one group (G == cfg.block_size, qparams not
    static, groups i // G in solve order): the same operations, in the same order, as _solve does for such a block,
    with no host synchronisation and no shape that depends on data, so a CUDA graph can capture it once and
    replay it for every block (_solve_graphed).

    W1: [N, B] fp32 the block's current weights; Hinv1: [B, B] fp32 its part of the upper Cholesky factor;
    hdiag1: [B] fp32 its columns' diag(H) (weighted search) or None; none is modified. Returns codes [N, B] uint8,
    Err1 [N, B] fp32 (the scaled errors the later columns are updated with), scale, zero [N] (the group's qparams)
    and the block's loss per row [N].
    """
    W1 = W1.clone()
    Err1 = torch.zeros_like(W1)
    codes = torch.empty(W1.shape, dtype=torch.uint8, device=W1.device)
    loss = torch.zeros(W1.shape[0], dtype=torch.float32, device=W1.device)
    d1 = Hinv1.diagonal()
    B, maxq = W1.shape[1], 2**cfg.bits - 1
    sc, zero = _group_qparams(W1, cfg, hdiag1)
    zf = zero.to(torch.float32)
    s1 = 0
    for i in range(B):
        if i % SUB == 0 and i > s1:
            W1[:, i:] -= Err1[:, s1:i] @ Hinv1[s1:i, i:]
            s1 = i
        e = min((i // SUB + 1) * SUB, B)
        codes[:, i] = _column_(W1, Err1, Hinv1, loss, i, e, sc, zf, d1[i], maxq)
    return codes, Err1, sc, zero, loss


def graphable(K: int, G: int, cfg: GPTQConfig) -> bool:
    """Whether _solve_graphed applies: every block is one whole group with its qparams fixed at its start."""
    return G == cfg.block_size and K % G == 0 and not cfg.static_groups and cfg.order is not Order.ACT


def _solve_graphed(W: Tensor, Hinv: Tensor, G: int, cfg: GPTQConfig, col_group: list[int], capture: bool = True,
                   hdiag: Tensor | None = None):
    """_solve's result (graphable cases) with each block computed by _aligned_block; capture (CUDA): the block is
    captured once as a CUDA graph on static buffers and replayed for every block, one launch instead of ~23 ops
    per column. Opt-in (run.unproven_cuda: graph-columns) until a GPU run has compared its codes with the eager
    path's; capture=False runs the same blocks eagerly (what the CPU tests compare with _solve).
    W: [N, K] fp32 in solve order, modified in place; Hinv: [K, K] fp32; col_group as for _solve (block b holds
    group col_group[b * B]); hdiag: [K] fp32 diag(H) in solve order (cfg.clip_weight) or None. Returns (codes,
    scale, zero, loss)."""
    N, K = W.shape
    B = cfg.block_size
    codes = torch.empty(N, K, dtype=torch.uint8, device=W.device)
    scale = torch.empty(N, K // G, dtype=torch.float32, device=W.device)
    zero = torch.empty(N, K // G, dtype=torch.int32, device=W.device)
    loss = torch.zeros(N, dtype=torch.float32, device=W.device)
    step = (_captured_block(N, B, cfg, W.device, weighted=hdiag is not None) if capture else
            (lambda w1, h1, d1: _aligned_block(w1, h1, cfg, d1)))
    for i1 in range(0, K, B):
        i2, g = i1 + B, col_group[i1]
        c1, e1, sc, zr, l1 = step(W[:, i1:i2], Hinv[i1:i2, i1:i2], None if hdiag is None else hdiag[i1:i2])
        codes[:, i1:i2], scale[:, g], zero[:, g] = c1, sc, zr
        loss += l1
        W[:, i2:] -= e1 @ Hinv[i1:i2, i2:]
    return codes, scale, zero, loss


def _captured_block(N: int, B: int, cfg: GPTQConfig, device: torch.device, weighted: bool = False):
    """_aligned_block captured once as a CUDA graph on static [N, B] / [B, B] / [B] buffers: a callable (W1, Hinv1,
    hdiag1: [B] where weighted, else None) -> its outputs (the graph's own buffers, overwritten by the next call),
    each call a copy in and one replay."""
    w_in = torch.zeros(N, B, dtype=torch.float32, device=device)
    h_in = torch.eye(B, dtype=torch.float32, device=device)
    d_in = torch.ones(B, dtype=torch.float32, device=device) if weighted else None
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):             # warm-up off the capture (allocations, kernel selection)
        _aligned_block(w_in, h_in, cfg, d_in)
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = _aligned_block(w_in, h_in, cfg, d_in)

    def step(w1: Tensor, h1: Tensor, d1: Tensor | None):
        w_in.copy_(w1)
        h_in.copy_(h1)
        if d_in is not None:
            d_in.copy_(d1)
        graph.replay()
        return out

    return step


@torch.no_grad()
def gptq_quantize(w: Tensor, h: Tensor, cfg: GPTQConfig, name: str = "linear",
                  cuda_graphs: bool = False) -> QuantizedWeight:
    """GPTQ for one Linear (Frantar et al. 2022, Alg. 1).

    w: [N, K] float  weight; rows are output channels; not modified
    h: [K, K] fp32   2/(S*T) * X^T X from calibration tokens (hessian_add_, hessian_finish_); not modified
    name: the layer's name, used in log lines and errors
    Dead columns (diag H == 0) get H[i, i] = 1 and w[:, i] = 0. Columns are solved in `solve_order`
    (cfg.order); with Order.ACT g_idx maps each original column to its group, with static_groups all
    qparams come from the unpermuted weight first, so g_idx = i // G (as for NATURAL and GROUP_AWARE).
    Columns go in blocks of cfg.block_size; qparams are fixed at each group's first column (min/max, or
    the cfg.clip_steps range search of grid.search_qparams).
    Rows are independent problems given H (the order depends on H only), so linears sharing one H may be solved
    stacked along N and split with QuantizedWeight.split_rows: the same codes as solving each alone (tested).
    Returns codes in original column order, scale/zero [N, K // G], proxy_loss (and per row) and the damp used.
    cuda_graphs: on CUDA, where `graphable`, each 128-column block is one replayed CUDA graph (_solve_graphed);
    unproven, so off unless the recipe asks for it (run.unproven_cuda: graph-columns; gptq_block).
    """
    if w.dim() != 2 or h.shape != (w.shape[1], w.shape[1]):
        raise ConfigError(f"{name}: GPTQ needs w [N, K] and h [K, K], "
                          f"got w {tuple(w.shape)} and h {tuple(h.shape)}")
    N, K = w.shape
    G = resolve_group_size(K, cfg.group_size, name)
    if not (torch.isfinite(w).all() and torch.isfinite(h).all()):
        raise NumericalError(f"{name}: weight or H has NaN/inf values; check the checkpoint and the calibration "
                             f"activations (try more calibration samples or fp32 calibration)")
    W = w.to(dtype=torch.float32, copy=True)                        # [N, K] fp32, private
    H = h.to(device=w.device, dtype=torch.float32, copy=True)       # [K, K] fp32, private
    dead = H.diagonal() == 0
    H.diagonal()[dead] = 1
    W[:, dead] = 0
    perm = solve_order(H.diagonal(), G, cfg.order)
    col = torch.arange(K, device=w.device) if perm is None else perm
    static = _group_qparams(W.reshape(N, K // G, G), cfg) if cfg.static_groups else None
    # the group of each solve position: its column's own group (i // G), except for dynamic act-order,
    # whose groups are runs of G solve positions
    col_group = (torch.arange(K) // G if cfg.order is Order.ACT and static is None else col.cpu() // G).tolist()
    if perm is not None:
        W, H = W[:, perm], H[perm.unsqueeze(1), perm]             # one gather: a single new [K, K]
    hdiag = H.diagonal().clone() if cfg.clip_weight else None   # [K] solve order, before damping
    Hinv, damp = _damped_hinv_(H, cfg, name)
    del H
    if cuda_graphs and W.is_cuda and graphable(K, G, cfg):
        codes, scale, zero, loss = _solve_graphed(W, Hinv, G, cfg, col_group, hdiag=hdiag)
    else:
        codes, scale, zero, loss = _solve(W, Hinv, G, cfg, col_group, static, hdiag)
    g_idx = torch.arange(K, device=w.device) // G
    if perm is not None:
        invperm = torch.argsort(perm)                               # solve position of each column
        codes = codes[:, invperm]
        if cfg.order is Order.ACT and static is None:
            g_idx = invperm // G
    return QuantizedWeight(codes, scale, zero, g_idx.to(torch.int32), perm, cfg.bits, float(loss.sum()), damp,
                           loss.cpu())
