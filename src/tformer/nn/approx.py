"""Approximate attention in place of softmax(q k^T * scale) v: Linformer and Performer (FAVOR+).

Shapes: B batch, T tokens, H query heads, Hkv key/value heads, G = H / Hkv queries a key/value head
serves, D head_dim, m random features, r Linformer rank, N max_seq_len, C tokens a chunk.

Both layers are `Attention` with another attention proper: the same wqkv, RoPE, head layout and wo.
Causality is structural (a decoder's layers are causal, an encoder's bidirectional; chosen when
built); of the model's boolean mask only key padding is read (`key_valid`). Any other pattern
(windows, prefix-LM, sparse patterns, ALiBi, packed sequences) is refused by `ModelConfig` and
the models, never silently dropped.

Performer (Choromanski et al. 2021, FAVOR+): exp(q.k) = E_w[phi(q) . phi(k)] with positive random
features phi(x) = exp(w x - |x|^2 / 2) / sqrt(m), w the m rows of blocks of orthogonal Gaussian
directions (`RandomFeatures`). With q, k scaled by sqrt(scale):
    bidirectional  y_t = phi(q_t) S / phi(q_t) z,        S = sum_s phi(k_s) v_s^T (m, D), z = sum_s phi(k_s) (m,)
    causal         the same with S_t, z_t summed over s <= t, in chunks of C tokens: within a chunk the
                   masked (C, C) matrix phi(q) phi(k)^T, between chunks the (m, D) states, all chunks at once
                   (no loop); decoding carries (S, z) in `FeatureState`: O(1) a token.
The 1/sqrt(m) cancels in the ratio and is left out. exp is stabilised by constants that cancel in the
ratio: per query its largest logit; for keys a running maximum c (the state rescales by exp(c - c')
when it grows), so the state never overflows and decoding equals the full forward to rounding.

Linformer (Wang et al. 2020): keys and values projected along the sequence to r rows by learned
E, F (r, N), shared by the heads ("headwise sharing"), key j taking column p_j (its index among the
real keys):
    bidirectional  y = softmax(q (E K)^T * scale) (F V): attention over r rows instead of T keys;
    causal         query t reads only keys s <= t: K~(t) = sum_{s<=t} E[:, p_s] k_s^T (r, D), V~(t) the
                   same with F, y_t = softmax(q_t K~(t)^T * scale) V~(t). A causal model of its own
                   rather than an approximation of causal softmax attention (at r = N with E = I, rows
                   not yet reached score 0 instead of being masked). Computed in chunks of C tokens:
                   K~ entering each chunk is a cumulative sum of chunk sums, the keys inside it enter
                   through a masked (C, C) q k^T; decoding carries (K~, V~) and the count of real keys in
                   `ProjectionState`: O(r D) a sequence.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from tformer.config import ModelConfig
from tformer.nn.attention import Attention

NEG = -1e30  # log-feature of a padding key, and the running maximum before any key
CHUNK = 64  # tokens a chunk of a causal scan (Performer: the smallest; see `performer_chunk`)


def key_valid(mask: torch.Tensor | None, input_pos: torch.Tensor | None = None,
              causal: bool = True) -> torch.Tensor | None:
    """(B or 1, T) bool: which of this forward's keys are real, from the model's bool mask (B or 1, 1, T', S).

    The last query's row sees every real key before it (`causal_mask`, `encoder_mask` hide only
    padding there); its own slot reads True even when it is padding, which only a padding query,
    whose output nobody reads, can see. input_pos (T,): the cache slots of this forward's keys.
    A bidirectional layer takes only a key-padding mask (B or 1, 1, 1, S)."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or (not causal and mask.shape[-2] != 1):
        raise ValueError("approximate attention reads causality and key padding only: a boolean (B, 1, 1, S) "
                         "key mask in an encoder; packed rows (segments), windows and biases need exact attention")
    row = mask[:, 0, -1, :]  # (B or 1, S)
    return row if input_pos is None else row.index_select(-1, input_pos)


def orthogonal_gaussian(n_rows: int, dim: int, generator: torch.Generator) -> torch.Tensor:
    """(n_rows, dim): blocks of `dim` orthonormal directions (QR of Gaussian matrices), each row
    scaled by the norm of a Gaussian vector, so rows are N(0, I) marginally but orthogonal in a block
    (FAVOR+'s orthogonal random features: lower variance than iid rows)."""
    blocks = [torch.linalg.qr(torch.randn(dim, dim, generator=generator))[0].T for _ in range(-(-n_rows // dim))]
    rows = torch.cat(blocks)[:n_rows]
    return rows * torch.randn(n_rows, dim, generator=generator).norm(dim=1, keepdim=True)


class RandomFeatures(nn.Module):
    """Performer's m directions omega (m, D): a persistent buffer (saved with the model, so a redraw
    survives a checkpoint), drawn from a per-layer seed when the model is initialised."""

    def __init__(self, n_features: int, head_dim: int, seed: int):
        super().__init__()
        self.seed, self.draws = seed, 0
        self.register_buffer("omega", torch.empty(n_features, head_dim))
        if not self.omega.is_meta:
            self.reset_parameters()

    def reset_parameters(self) -> None:
        """The layer's first draw (`tformer.models.build.init_weights` calls it)."""
        self.draws = 0
        self.redraw(self.seed)

    @torch.no_grad()
    def redraw(self, seed: int | None = None) -> None:
        """New directions from `seed` (None: the layer's next seed: seed + 7919 x redraws so far)."""
        if seed is None:
            self.draws += 1
            seed = self.seed + 7919 * self.draws
        omega = orthogonal_gaussian(*self.omega.shape, torch.Generator().manual_seed(seed))
        self.omega.copy_(omega.to(self.omega.device, self.omega.dtype))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., D) -> log phi(x) = omega x - |x|^2 / 2 (..., m), in fp32."""
        x = x.float()
        return x @ self.omega.float().T - 0.5 * (x * x).sum(-1, keepdim=True)


class FeatureState(nn.Module):
    """A Performer layer's decoding state, fp32: S (B, Hkv, m, D), z (B, Hkv, m) and the running
    maximum c (B, Hkv) they are scaled by. Constant size; `n_slots` only bounds the positions."""

    def __init__(self, batch_size: int, n_slots: int, n_kv_heads: int, n_features: int, head_dim: int, device=None):
        super().__init__()
        self.n_slots = n_slots
        shape = (batch_size, n_kv_heads, n_features)
        self.register_buffer("s", torch.zeros(*shape, head_dim, device=device), persistent=False)
        self.register_buffer("z", torch.zeros(shape, device=device), persistent=False)
        self.register_buffer("c", torch.full(shape[:2], NEG, device=device), persistent=False)


class ProjectionState(nn.Module):
    """A causal Linformer layer's decoding state, fp32: K~, V~ (B, Hkv, r, D) and n (B,), the real
    keys so far (the next real key's column of E and F)."""

    def __init__(self, batch_size: int, n_slots: int, n_kv_heads: int, rank: int, head_dim: int, device=None):
        super().__init__()
        self.n_slots = n_slots
        shape = (batch_size, n_kv_heads, rank, head_dim)
        self.register_buffer("k", torch.zeros(shape, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, device=device), persistent=False)
        self.register_buffer("n", torch.zeros(batch_size, device=device), persistent=False)


def _read_state(cache: nn.Module, B: int, input_pos: torch.Tensor, names: tuple[str, ...], fills: tuple[float, ...]):
    """The first B rows of `cache`'s state buffers, or their start values where input_pos begins a
    sequence (slot 0): a tensor select, so no host sync and the same graph for every step."""
    fresh = input_pos.reshape(-1)[0] == 0
    return [torch.where(fresh, fill, getattr(cache, name)[:B]) for name, fill in zip(names, fills)]


def _write_state(cache: nn.Module, names: tuple[str, ...], values) -> None:
    for name, value in zip(names, values):
        getattr(cache, name)[: value.shape[0]].copy_(value)


class PerformerAttention(Attention):
    """Attention through FAVOR+ positive random features (module docstring): linear in T."""

    STATE = ("s", "z", "c")

    def __init__(self, config: ModelConfig, layer: int = 0):
        super().__init__(config)
        self.features = RandomFeatures(config.attention.features, self.head_dim, seed=1_000_003 * (layer + 1))
        self.causal = config.architecture == "decoder"
        self.mix = self._causal if self.causal else self._bidirectional

    def make_cache(self, batch_size: int, n_slots: int, dtype: torch.dtype, device=None) -> FeatureState:
        """The recurrent state (fp32 whatever `dtype`) in place of a KV cache."""
        m = self.features.omega.shape[0]
        return FeatureState(batch_size, n_slots, self.n_kv_heads, m, self.head_dim, device)

    def redraw_features(self, seed: int | None = None) -> None:
        self.features.redraw(seed)

    def attend(self, qkv, rope=None, mask=None, input_pos=None):
        B, T, _ = qkv.shape
        q, k, v = self.heads(qkv, rope)  # (B, H, T, D), (B, Hkv, T, D)
        root = math.sqrt(self.scale if self.scale is not None else 1 / math.sqrt(self.head_dim))
        lq, lk = self.features.logits(q * root), self.features.logits(k * root)  # (B, H|Hkv, T, m)
        fq = (lq - lq.amax(-1, keepdim=True)).exp().view(B, self.n_kv_heads, -1, T, lq.shape[-1])
        valid = key_valid(mask, input_pos if self.kv_cache is not None else None, self.causal)  # (B or 1, T)
        w = None if valid is None else valid[:, None, :, None].float()  # (B or 1, 1, T, 1)
        if valid is not None:
            lk = lk.masked_fill(~valid[:, None, :, None], NEG)
        y = self.mix(fq, lk, w, v.float(), input_pos)  # (B, Hkv, G, T, D)
        return y.reshape(B, self.n_heads, T, self.head_dim).to(v.dtype).transpose(1, 2).reshape(B, T, -1)

    def _bidirectional(self, fq, lk, w, v, input_pos=None):
        fk = (lk - lk.amax((-2, -1), keepdim=True)).exp()  # (B, Hkv, T, m)
        fk = fk if w is None else fk * w
        s, z = torch.einsum("bktm,bktd->bkmd", fk, v), fk.sum(2)  # (B, Hkv, m, D), (B, Hkv, m)
        num, den = torch.einsum("bkgtm,bkmd->bkgtd", fq, s), torch.einsum("bkgtm,bkm->bkgt", fq, z)
        return num / den.clamp_min(torch.finfo(torch.float32).tiny)[..., None]

    def _causal(self, fq, lk, w, v, input_pos=None):
        B, Hkv, T, m = lk.shape
        G, D = fq.shape[2], v.shape[-1]
        if self.kv_cache is None:
            s0, z0 = v.new_zeros(B, Hkv, m, D), v.new_zeros(B, Hkv, m)
            c0 = v.new_full((B, Hkv), NEG)
        else:
            s0, z0, c0 = _read_state(self.kv_cache, B, input_pos, self.STATE, (0.0, 0.0, NEG))
        C = performer_chunk(T, m, D)
        n, pad = -(-T // C), -T % C
        w = lk.new_ones(1, 1, T, 1) if w is None else w
        lk, v, w = (torch.nn.functional.pad(t, (0, 0, 0, pad), value=x) for t, x in ((lk, NEG), (v, 0.0), (w, 0.0)))
        fq = torch.nn.functional.pad(fq, (0, 0, 0, pad)).view(B, Hkv, G, n, C, m)
        lk, v, w = lk.view(B, Hkv, n, C, m), v.view(B, Hkv, n, C, D), w.view(w.shape[0], 1, n, C, 1)
        # reference maxima: M[e] over the cached state (e = 0) and chunks 0..e-1; the ratio cancels them,
        # so they carry no gradient
        M = torch.cat([c0[..., None], lk.amax((-2, -1))], -1).detach().cummax(-1).values  # (B, Hkv, n+1)
        fk = (lk - M[..., 1:, None, None]).exp() * w  # (B, Hkv, n, C, m): each chunk's keys against its M
        s = torch.cat([s0[:, :, None], torch.einsum("bkncm,bkncd->bknmd", fk, v)], 2)  # (B, Hkv, n+1, m, D)
        z = torch.cat([z0[:, :, None], fk.sum(3)], 2)  # (B, Hkv, n+1, m)
        # the state entering chunk e - 1, rescaled to M[e]: sum over i < e of exp(M[i] - M[e]) s[i]
        earlier = torch.ones(n + 1, n + 1, dtype=torch.bool, device=M.device).tril(-1)
        decay = (M[..., None, :] - M[..., :, None]).masked_fill(~earlier, -math.inf).exp()  # [e, i]
        s_in = torch.einsum("bkei,bkimd->bkemd", decay[:, :, 1:], s)  # (B, Hkv, n, m, D)
        z_in = torch.einsum("bkei,bkim->bkem", decay[:, :, 1:], z)
        # within a chunk: phi(q) phi(k)^T over the keys up to each query
        a = torch.einsum("bkgncm,bknsm->bkgncs", fq, fk)
        a = a.masked_fill(~torch.ones(C, C, dtype=torch.bool, device=a.device).tril(), 0.0)
        num = torch.einsum("bkgncs,bknsd->bkgncd", a, v) + torch.einsum("bkgncm,bknmd->bkgncd", fq, s_in)
        den = a.sum(-1) + torch.einsum("bkgncm,bknm->bkgnc", fq, z_in)
        if self.kv_cache is not None:
            last = (M - M[..., -1:]).exp()  # (B, Hkv, n+1): every state rescaled to the final maximum
            s_end, z_end = torch.einsum("bki,bkimd->bkmd", last, s), torch.einsum("bki,bkim->bkm", last, z)
            _write_state(self.kv_cache, self.STATE, (s_end, z_end, M[..., -1]))
        y = num / den.clamp_min(torch.finfo(torch.float32).tiny)[..., None]
        return y.reshape(B, Hkv, G, n * C, D)[:, :, :, :T]  # (B, Hkv, G, T, D)


def performer_chunk(T: int, m: int, D: int) -> int:
    """Tokens a chunk of the causal Performer scan: the power of two in [CHUNK, 1024] that minimises
    its cost, T C (m + D) within chunks plus (T / C)^2 m D between them."""
    best, best_cost = CHUNK, math.inf
    for C in (CHUNK << i for i in range(5)):
        cost = T * C * (m + D) + (T / C) ** 2 * m * D
        best, best_cost = (C, cost) if cost < best_cost else (best, best_cost)
    return best


class SequenceProjection(nn.Module):
    """Linformer's E (or F): weight (r, N), position j's column weight[:, j]; N(0, 1/r) at init
    (Wang et al. 2020, a Johnson-Lindenstrauss projection)."""

    def __init__(self, rank: int, max_seq_len: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(rank, max_seq_len))
        if not self.weight.is_meta:
            self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, std=self.weight.shape[0] ** -0.5)

    def columns(self, positions: torch.Tensor) -> torch.Tensor:
        """positions (B or 1, T) -> (B or 1, T, r): each key's column (clamped to the last one)."""
        return self.weight.T[positions.clamp(0, self.weight.shape[1] - 1)]


class LinformerAttention(Attention):
    """Attention over r learned projections of the keys and values along the sequence (module docstring)."""

    STATE = ("k", "v", "n")

    def __init__(self, config: ModelConfig, layer: int = 0):
        super().__init__(config)
        self.rank, self.max_seq_len = config.attention.rank, config.max_seq_len
        self.proj_k = SequenceProjection(self.rank, config.max_seq_len)  # E
        self.proj_v = SequenceProjection(self.rank, config.max_seq_len)  # F
        self.causal = config.architecture == "decoder"
        self.mix = self._causal if self.causal else self._bidirectional

    def make_cache(self, batch_size: int, n_slots: int, dtype: torch.dtype, device=None) -> ProjectionState:
        """The projected keys and values so far (fp32 whatever `dtype`) in place of a KV cache."""
        return ProjectionState(batch_size, n_slots, self.n_kv_heads, self.rank, self.head_dim, device)

    def attend(self, qkv, rope=None, mask=None, input_pos=None):
        B, T, _ = qkv.shape
        if self.kv_cache is None and T > self.max_seq_len:
            raise ValueError(f"Linformer projects at most max_seq_len={self.max_seq_len} positions, got {T} tokens")
        q, k, v = self.heads(qkv, rope)  # (B, H, T, D), (B, Hkv, T, D)
        valid = key_valid(mask, input_pos if self.kv_cache is not None else None, self.causal)  # (B or 1, T)
        y = self.mix(q, k, v, valid, input_pos)  # (B, H, T, D)
        return y.to(v.dtype).transpose(1, 2).reshape(B, T, -1)

    def _columns(self, valid, T: int, start, device):
        """E and F columns (B or 1, T, r) of this forward's keys, zero for padding keys; and the count
        of real keys after them. start: real keys before them (B,), or None."""
        w = torch.ones(1, T, device=device) if valid is None else valid.float()
        seen = w.cumsum(-1) if start is None else start[:, None] + w.cumsum(-1)  # (B or 1, T)
        positions = (seen - 1).long()
        e, f = (p.columns(positions) * w[..., None] for p in (self.proj_k, self.proj_v))
        return e, f, seen[:, -1]

    def _bidirectional(self, q, k, v, valid, input_pos=None):
        e, f, _ = self._columns(valid, k.shape[2], None, k.device)
        kt = torch.einsum("btr,bktd->bkrd", e.to(k.dtype), k)  # (B, Hkv, r, D)
        vt = torch.einsum("btr,bktd->bkrd", f.to(v.dtype), v)
        everything = torch.ones(1, 1, 1, self.rank, dtype=torch.bool, device=q.device)
        return self.core(q, kt, vt, everything, self.attn_dropout if self.training else 0.0)

    def _causal(self, q, k, v, valid, input_pos=None):
        (B, Hkv, T, D), scale = k.shape, self.scale if self.scale is not None else self.head_dim ** -0.5
        if self.kv_cache is None:
            kt = vt = k.new_zeros(B, Hkv, self.rank, D, dtype=torch.float32)
            n_seen = None
        else:
            kt, vt, n_seen = _read_state(self.kv_cache, B, input_pos, self.STATE, (0.0, 0.0, 0.0))
        e, f, n_end = self._columns(valid, T, n_seen, k.device)  # (B or 1, T, r)
        C, G = CHUNK, q.shape[1] // Hkv
        n, pad = -(-T // C), -T % C
        pad_t = lambda t: torch.nn.functional.pad(t.float(), (0, 0, 0, pad))  # noqa: E731 - zero keys, rows
        qg = pad_t(q).view(B, Hkv, G, n, C, D)
        k, v = pad_t(k).view(B, Hkv, n, C, D), pad_t(v).view(B, Hkv, n, C, D)
        e, f = pad_t(e).view(-1, n, C, self.rank), pad_t(f).view(-1, n, C, self.rank)
        # K~, V~ before each chunk: the state plus the earlier chunks' projected keys and values
        k_sum, v_sum = torch.einsum("bncr,bkncd->bknrd", e, k), torch.einsum("bncr,bkncd->bknrd", f, v)
        k_in, v_in = kt[:, :, None] + k_sum.cumsum(2) - k_sum, vt[:, :, None] + v_sum.cumsum(2) - v_sum
        # plus, within the chunk, the keys up to each query: q_t K~(t)^T = q_t K~_in^T + sum_{s<=t} (q_t.k_s) e_s
        upto = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
        qk = torch.einsum("bkgncd,bknsd->bkgncs", qg, k).masked_fill(~upto, 0.0)
        scores = torch.einsum("bkgncd,bknrd->bkgncr", qg, k_in) + torch.einsum("bkgncs,bnsr->bkgncr", qk, e)
        dropout_p = self.attn_dropout if self.training else 0.0
        weights = torch.nn.functional.dropout((scores * scale).softmax(-1), dropout_p, training=dropout_p > 0)
        wf = torch.einsum("bkgncr,bnsr->bkgncs", weights, f).masked_fill(~upto, 0.0)
        y = torch.einsum("bkgncr,bknrd->bkgncd", weights, v_in) + torch.einsum("bkgncs,bknsd->bkgncd", wf, v)
        if self.kv_cache is not None:
            _write_state(self.kv_cache, self.STATE, (kt + k_sum.sum(2), vt + v_sum.sum(2), n_end.expand(B)))
        return y.reshape(B, Hkv * G, n * C, D)[:, :, :T]  # (B, H, T, D)


def make_approx_attention(config: ModelConfig, layer: int = 0) -> Attention:
    """Layer `layer`'s self-attention: the approximation `config.attention.approx` names, or exact
    `Attention` for "none" (layer seeds Performer's random features)."""
    return APPROXIMATIONS[config.attention.approx](config, layer)


APPROXIMATIONS = {"none": lambda config, layer: Attention(config), "linformer": LinformerAttention,
                  "performer": PerformerAttention}
