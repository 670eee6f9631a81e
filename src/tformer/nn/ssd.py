"""Mamba-2's state-space mixer (SSD; Dao & Gu 2024, "Transformers are SSMs", arXiv:2405.21060), used in
place of attention in the layers `ModelConfig.ssd` names.

Shapes: B batch, T tokens, C dim, E = expand * dim inner channels in H = E / P heads of P = head_dim,
G groups of N = state_dim input/output projections (each shared by H / G heads), W conv_width, Q chunk.

    x (B,T,C) -> w_in -> z (E) | xBC (E + 2 G N) | dt (H)
    xBC -> causal depthwise conv (W taps) -> SiLU -> x (B,T,H,P), B (B,T,G,N), C (B,T,G,N)
    dt = softplus(dt + dt_bias) (B,T,H);  A = -exp(A_log), one scalar per head
    recurrence, per head:  h_t (P,N) = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T;   y_t = h_t C_t + D x_t
    y (B,T,E) -> RMSNorm(y * silu(z)) over each group's E / G channels -> wo -> (B,T,C)

Training and prefill compute the recurrence in the chunked form (SSD, §6, "ssd_minimal"): within a
chunk of Q tokens y = (L o C B^T)(dt x), a causal "attention" whose decay mask
L[t,s] = exp(sum_{s<r<=t} dt_r A) (a segment sum) stands where softmax weights would; between chunks
only the (P, N) states pass, one recurrence step per chunk. A decode step runs the recurrence
itself: O(1) work and memory per token whatever the context (`SSDCache`).

Sequence starts. `mask` (B, T) bool, or None: True where a token starts a new sequence, so that
its state and conv window see nothing before it (left padding: the first real token; packed
examples: each one's first token); `Decoder` derives it from attention_mask or segments. A start
enters the decay as dt A = -inf, which the segment sums carry to exact zeros: they only add
log-decays (cumulative sums, never differences of them), so no inf - inf arises. `rope` is unused
(the recurrence is ordered by itself).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from tformer.config import ModelConfig


class SSDCache(nn.Module):
    """An SSD layer's decode state, of a constant size: the conv's last W-1 inputs (B, W-1, E + 2GN)
    and the recurrent state (B, H, P, N), kept in fp32. `n_slots` only bounds the positions
    (input_pos) it serves, as a KV cache's slots do. Both buffers are batch first (beam search
    reorders rows of every buffer)."""

    def __init__(self, batch_size: int, n_slots: int, conv_dim: int, conv_width: int, n_heads: int,
                 head_dim: int, state_dim: int, dtype: torch.dtype, device=None):
        super().__init__()
        self.n_slots = n_slots
        conv = torch.zeros(batch_size, conv_width - 1, conv_dim, dtype=dtype, device=device)
        self.register_buffer("conv", conv, persistent=False)
        ssm = torch.zeros(batch_size, n_heads, head_dim, state_dim, dtype=torch.float32, device=device)
        self.register_buffer("ssm", ssm, persistent=False)


class GatedRMSNorm(nn.Module):
    """Mamba-2's output norm: RMSNorm(y * silu(z)) over groups of E / G channels (or, with
    `norm_before_gate`, RMSNorm(y) * silu(z)); fp32 inside, as `RMSNorm`."""

    def __init__(self, dim: int, n_groups: int, eps: float, norm_before_gate: bool = False):
        super().__init__()
        self.n_groups, self.eps, self.norm_before_gate = n_groups, eps, norm_before_gate
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        h, gate = y.float(), F.silu(z.float())
        h = h if self.norm_before_gate else h * gate
        g = h.unflatten(-1, (self.n_groups, -1))  # (..., G, E/G)
        h = (g * torch.rsqrt(g.pow(2).mean(-1, keepdim=True) + self.eps)).flatten(-2)
        h = h * gate if self.norm_before_gate else h
        return self.weight * h.to(y.dtype)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)


class SSD(nn.Module):
    """The Mamba-2 mixer (module docstring): forward(x, rope, mask, input_pos) as `Attention`'s, with
    `mask` the (B, T) sequence starts or None; `cache` (an `SSDCache`) while decoding."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        s = config.ssd
        self.inner, self.head_dim, self.state_dim = s.expand * config.dim, s.head_dim, s.state_dim
        self.n_heads, self.n_groups = self.inner // s.head_dim, s.n_groups
        self.conv_width, self.chunk = s.conv_width, s.chunk
        self.conv_dim = self.inner + 2 * s.n_groups * s.state_dim
        self.dt_range = (s.dt_min, s.dt_max)
        self.w_in = nn.Linear(config.dim, self.inner + self.conv_dim + self.n_heads, bias=False)  # z | xBC | dt
        self.conv = nn.Conv1d(self.conv_dim, self.conv_dim, s.conv_width, groups=self.conv_dim)  # (E+2GN, 1, W)
        self.dt_bias = nn.Parameter(torch.empty(self.n_heads))
        self.A_log = nn.Parameter(torch.empty(self.n_heads))
        self.D = nn.Parameter(torch.empty(self.n_heads))
        self.norm = GatedRMSNorm(self.inner, s.n_groups, config.norm_eps, s.norm_before_gate)
        self.wo = nn.Linear(self.inner, config.dim, bias=False)
        self.resid_drop = nn.Dropout(config.resid_dropout)
        self.cache: SSDCache | None = None
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """This module's own parameters, as Mamba-2 draws them: dt log-uniform in dt_range (dt_bias its
        softplus inverse), A uniform in [1, 16], D = 1. The Linear, conv and norm children init themselves."""
        if self.A_log.is_meta:
            return
        lo, hi = self.dt_range
        dt = torch.exp(torch.rand(self.n_heads) * (math.log(hi) - math.log(lo)) + math.log(lo)).clamp(min=1e-4)
        self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # softplus(dt_bias) = dt
        self.A_log.copy_(torch.log(torch.empty(self.n_heads).uniform_(1, 16)))
        self.D.fill_(1.0)

    def make_cache(self, batch_size: int, n_slots: int, dtype: torch.dtype, device=None) -> SSDCache:
        return SSDCache(batch_size, n_slots, self.conv_dim, self.conv_width, self.n_heads, self.head_dim,
                        self.state_dim, dtype, device)

    def forward(self, x, rope=None, mask=None, input_pos=None):
        B, T, _ = x.shape
        H, P, G, N = self.n_heads, self.head_dim, self.n_groups, self.state_dim
        z, xbc, dt = self.w_in(x).split([self.inner, self.conv_dim, H], dim=-1)
        conv_state, h0 = self._read_cache(B, input_pos)
        if self.cache is not None:
            window = torch.cat((conv_state, xbc), dim=1)[:, T:]  # the last W-1 inputs
            self.cache.conv[:B].copy_(window if mask is None else window * _carries(mask, window))
        xbc = F.silu(causal_conv(xbc, self.conv.weight[:, 0], self.conv.bias, conv_state, mask))
        xs, b, c = xbc.split([self.inner, G * N, G * N], dim=-1)
        xs = xs.unflatten(-1, (H, P))  # (B, T, H, P)
        b, c = b.unflatten(-1, (G, N)), c.unflatten(-1, (G, N))  # (B, T, G, N)
        dt = F.softplus(dt.float() + self.dt_bias)  # (B, T, H)
        A = -torch.exp(self.A_log.float())  # (H,)
        with torch.autocast(x.device.type, enabled=False):  # fp32 even under autocast: exps of summed decays
            if self.cache is not None and T == 1:
                y, h = ssd_step(xs[:, 0], dt[:, 0], A, b[:, 0], c[:, 0], h0, None if mask is None else mask[:, 0])
                y = y[:, None]
            else:
                y, h = self.scan(xs, dt, A, b, c, h0, mask)
        if self.cache is not None:
            self.cache.ssm[:B].copy_(h)
        y = y + xs.float() * self.D.float()[:, None]  # (B, T, H, P)
        y = self.norm(y.to(x.dtype).flatten(-2), z)  # (B, T, E)
        return self.resid_drop(self.wo(y))

    def scan(self, x, dt, A, b, c, h0=None, starts=None):  # b, c (B, T, G, N): mamba_ssm's layout
        """The chunked recurrence (`ssd_chunked`). An instance may replace it, as `Attention.core`: a fused
        scan (mamba_ssm's chunk scan, where that package is installed) belongs to whatever swaps it in
        from outside the model; none is swapped in here."""
        return ssd_chunked(x, dt, A, b, c, self.chunk, h0, starts)

    def _read_cache(self, B: int, input_pos):
        """The conv inputs (B, W-1, E+2GN) and state (B, H, P, N) before these tokens: the cache's, or
        zeros. A forward from slot 0 starts a new sequence, so a reused cache's old state is dropped
        (by a product, no host sync)."""
        cache = self.cache
        if cache is None:
            return None, None
        if input_pos is None or input_pos.dim() != 1:
            raise ValueError("an SSD layer decodes with input_pos (T,), the same slots for every row "
                             "(its state is not paged)")
        go_on = (input_pos[:1] > 0).to(cache.conv.dtype)
        return cache.conv[:B] * go_on, cache.ssm[:B] * go_on.float()


def _carries(starts: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
    """(B, W-1, 1): whether each row of the conv window the cache keeps (B, W-1, K) is in the sequence of
    the last token (starts (B, T)); a start among the last tokens cuts the window there."""
    n = window.shape[1]
    last = _since_start(starts)[:, -1:]  # (B, 1): tokens since the last token's start
    back = torch.arange(n - 1, -1, -1, device=starts.device)  # window row j lies n-1-j tokens back
    return (back <= last)[..., None].to(window.dtype)


def _since_start(starts: torch.Tensor) -> torch.Tensor:
    """(B, T) tokens since each token's sequence start (0 at a start), huge where no start precedes it
    in this forward (its sequence goes on from the cache)."""
    T = starts.shape[1]
    idx = torch.arange(T, device=starts.device)
    last_start = torch.where(starts, idx, -(1 << 30)).cummax(dim=1).values
    return idx - last_start


def causal_conv(x, weight, bias, state=None, starts=None):
    """Depthwise causal conv: x (B, T, K), weight (K, W), bias (K,), state (B, W-1, K) the inputs before
    x (None: zeros) -> (B, T, K). With starts (B, T), a token's window stops at its sequence start."""
    B, T, K = x.shape
    W = weight.shape[1]
    state = x.new_zeros(B, W - 1, K) if state is None else state
    xp = torch.cat((state, x), dim=1)  # (B, T+W-1, K)
    if starts is None:
        return F.conv1d(xp.transpose(1, 2), weight[:, None], bias, groups=K).transpose(1, 2)
    windows = xp.unfold(1, W, 1)  # (B, T, K, W): tap k reads the input W-1-k tokens back
    back = torch.arange(W - 1, -1, -1, device=x.device)
    seen = (back <= _since_start(starts)[..., None]).to(x.dtype)  # (B, T, W)
    return torch.einsum("btkw,btw,kw->btk", windows, seen, weight) + bias


def segsum(a: torch.Tensor) -> torch.Tensor:
    """a (..., Q) log-decays -> (..., Q, Q): out[t, s] = sum_{s<r<=t} a_r for s <= t, -inf above the
    diagonal. Sums, never differences of cumulative sums, so -inf entries (starts) stay exact."""
    Q = a.shape[-1]
    a = a[..., None].expand(*a.shape, Q)  # [r, s] = a_r
    ones = torch.ones(Q, Q, dtype=torch.bool, device=a.device)
    out = a.masked_fill(~ones.tril(-1), 0).cumsum(dim=-2)  # [t, s] = sum_{r <= t, r > s} a_r
    return out.masked_fill(~ones.tril(0), float("-inf"))


def ssd_chunked(x, dt, A, b, c, chunk: int, h0=None, starts=None):
    """The recurrence in chunked form: x (B,T,H,P), dt (B,T,H), A (H,), b/c (B,T,G,N) (group g serves heads
    g*H/G ... (g+1)*H/G - 1), h0 (B,H,P,N) or None (zeros), starts (B,T) bool or None
    -> y (B,T,H,P) fp32 (without D x), final state (B,H,P,N) fp32."""
    Bsz, T, H, P = x.shape
    G, N = b.shape[-2:]
    Q = min(chunk, T)
    pad = -T % Q  # tail padding: dt = 0 leaves the state as it is and adds nothing
    a = dt * A  # (B, T, H) log-decays, <= 0
    if starts is not None:
        a = a.masked_fill(starts[..., None], float("-inf"))
    xdt = x.float() * dt[..., None]
    xdt, b, c = (F.pad(t.float(), (0, 0, 0, 0, 0, pad)).unflatten(1, (-1, Q)) for t in (xdt, b, c))  # (B,n,Q,H,.)
    a = F.pad(a, (0, 0, 0, pad)).unflatten(1, (-1, Q)).permute(0, 3, 1, 2)  # (B, H, n, Q)
    L = torch.exp(segsum(a))  # (B, H, n, Q, Q)
    # within each chunk: the quadratic, attention-like form (C.B once per group, the decay per head)
    scores = torch.einsum("bclgn,bcsgn->bgcls", c, b).repeat_interleave(H // G, dim=1) * L  # (B, H, n, Q, Q)
    y = torch.einsum("bhcls,bcshp->bclhp", scores, xdt)
    b, c = b.repeat_interleave(H // G, dim=3), c.repeat_interleave(H // G, dim=3)  # (B, n, Q, H, N)
    # each chunk's own contribution to the state at its end
    states = torch.einsum("bclhn,bhcl,bclhp->bchpn", b, L[..., -1, :], xdt)  # (B, n, H, P, N)
    # states passed between chunks: state entering chunk z = sum_j decay(j..z) * states[j]
    h0 = x.new_zeros(Bsz, H, P, N, dtype=torch.float32) if h0 is None else h0
    states = torch.cat((h0[:, None], states), dim=1)  # (B, n+1, H, P, N)
    chunk_decay = torch.exp(segsum(F.pad(a.sum(-1), (1, 0))))  # (B, H, n+1, n+1)
    states = torch.einsum("bhzj,bjhpn->bzhpn", chunk_decay, states)
    # the state entering each chunk, decayed to each of its tokens, read by c
    # exp(sum_{r<=t} a_r) = exp(a_0) L[t, 0]: no cumulative sum (Inductor's CUDA scan codegen fails on
    # this one in torch 2.11), and -inf starts stay exact
    decay_in = torch.exp(a[..., :1]) * L[..., :, 0]  # (B, H, n, Q)
    y = y + torch.einsum("bclhn,bchpn,bhcl->bclhp", c, states[:, :-1], decay_in)
    return y.flatten(1, 2)[:, :T], states[:, -1]


def ssd_step(x, dt, A, b, c, h, start=None):
    """One recurrence step: x (B,H,P), dt (B,H), A (H,), b/c (B,G,N), h (B,H,P,N) fp32, start (B,) bool
    or None -> y (B,H,P) fp32 (without D x), new state (B,H,P,N)."""
    H, G = x.shape[1], b.shape[1]
    b, c = b.repeat_interleave(H // G, dim=1), c.repeat_interleave(H // G, dim=1)  # (B, H, N)
    decay = torch.exp(dt * A)  # (B, H)
    if start is not None:
        decay = decay.masked_fill(start[:, None], 0.0)
    h = h * decay[..., None, None] + (dt[..., None] * x.float())[..., None] * b.float()[:, :, None, :]
    return torch.einsum("bhpn,bhn->bhp", h, c.float()), h


def sequence_starts(q_slots: torch.Tensor, key_valid: torch.Tensor | None = None,
                    segments: torch.Tensor | None = None) -> torch.Tensor | None:
    """(B, T) bool: the tokens an SSD layer's state restarts at, or None (one sequence a row, from slot 0).

    q_slots (T,) or (B, T): the tokens' slots; key_valid (B, S): 1 for real tokens (padding: 0), a token
    starting where its slot is real and the one before is not (or is slot 0); segments (B, T): packed
    sequence ids, a token starting where its id differs from the one before."""
    if segments is not None:
        starts = torch.zeros_like(segments, dtype=torch.bool)
        starts[:, 1:] = segments[:, 1:] != segments[:, :-1]
        return starts
    if key_valid is None:
        return None
    valid = key_valid.bool()
    slots = q_slots.expand(valid.shape[0], -1)  # (B, T)
    before = valid.gather(1, (slots - 1).clamp(min=0)) & (slots > 0)
    return valid.gather(1, slots) & ~before
