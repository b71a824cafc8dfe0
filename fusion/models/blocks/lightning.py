"""Self-attention over all of a patient's tiles in time and memory linear in the number of tiles.

After Lightning Attention (Qin et al., 2024, "Lightning Attention-2" and "Various lengths, constant
speed"), made non-causal for a bag of tiles, with the local term of "Bridging the Divide" (Han et al.,
2024): tiles are put in a spatial order (a Morton curve over their positions, so that a block is a
patch of neighbouring tissue), cut into blocks of `block` tiles, and each tile attends

  - with exact softmax attention to the tiles of its own block (local context), and
  - with linear (kernel) attention to every other tile of the bag, through one key-value state
    S = sum_j phi(k_j) v_j^T [d, d] and normaliser z = sum_j phi(k_j) [d] per head, from which the
    block's own contribution is subtracted (global context).

Each part is normalised on its own and the two are mixed with a learned share per head,
g_h = sigmoid(gamma_h) for the own block (0.5 at start): local context keeps its weight however
large the bag (one normaliser over both would give a block of 64 a share of 64/N of the attention).
A part that is empty gets no share, so a bag that fits in one block gets exactly softmax attention.

Cost per head: O(N (block + d) d) time. Memory: the q/k/v projection of a large bag is kept
(3 x [N, D]); the rest runs in chunks of `chunk` tiles and, in training, is recomputed chunk by
chunk in the backward pass (`torch.utils.checkpoint`): one chunk's intermediates at a time.
The attention arithmetic runs in float32 even under bf16 autocast (the global state subtracts
large sums).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import math
import sys

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

_FAR = 1 << 62  # Morton key of padding: after every real tile


def _spread_bits(v: torch.Tensor) -> torch.Tensor:
    """Insert a zero bit between the low 30 bits of int64 `v` (Morton interleave helper)."""
    v = v & 0x3FFFFFFF
    v = (v | (v << 16)) & 0x0000FFFF0000FFFF
    v = (v | (v << 8)) & 0x00FF00FF00FF00FF
    v = (v | (v << 4)) & 0x0F0F0F0F0F0F0F0F
    v = (v | (v << 2)) & 0x3333333333333333
    return (v | (v << 1)) & 0x5555555555555555


def spatial_order(coords: torch.Tensor, mask: torch.Tensor, grid_um: float = 128.0) -> torch.Tensor:
    """Permutation [B, N] that sorts each bag's tiles along a Morton (Z-order) curve, padding last.

    coords [B, N, 2] are tile centres in micrometres (several slides of a patient lie far apart, see
    `fusion.train.data`); tiles are binned on a `grid_um` grid, so neighbours on the slide end up
    close in the order and a block of the order is a compact patch of tissue.
    """
    c = coords.float()
    big = torch.finfo(c.dtype).max
    low = torch.where(mask[..., None], c, torch.full_like(c, big)).amin(1, keepdim=True)
    cells = ((c - low) / grid_um).floor().clamp(0, 2**30 - 1).long()
    key = _spread_bits(cells[..., 0]) | (_spread_bits(cells[..., 1]) << 1)
    key = torch.where(mask, key, torch.full_like(key, _FAR))
    return torch.argsort(key, dim=1, stable=True)


def _load_malloc_trim():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to do
        return None


_MALLOC_TRIM = _load_malloc_trim() if sys.platform.startswith("linux") else None


def release_freed_memory(x: torch.Tensor) -> None:  # called between chunks of a large bag only
    """Give the C heap's free pages back to the OS before a chunk of a CPU tensor is processed.

    glibc raises its mmap threshold after the first large free, so PyTorch's CPU buffers of up to
    32 MiB then come from the heap, where chunk after chunk of freed intermediates stays resident:
    measured, 1.2 GiB of resident memory for a forward pass over 30k tiles that holds 0.26 GiB of
    tensors. `malloc_trim(0)` returns those pages. It walks the heap, so it is called only between
    chunks of a bag too large for one chunk, where a chunk's arithmetic takes far longer.
    """
    if _MALLOC_TRIM is not None and x.device.type == "cpu":
        _MALLOC_TRIM(0)


def _phi(x: torch.Tensor) -> torch.Tensor:
    """Positive feature map of linear attention (Katharopoulos et al., 2020)."""
    return F.elu(x) + 1.0


class LightningAttention(nn.Module):
    """Multi-head block-softmax + inter-block linear attention over tokens [B, N, D].

    Args:
        dim: token width D (divisible by `heads`).
        heads: attention heads.
        block: tokens per block of exact softmax attention.
        chunk: tokens processed at once (a multiple of `block`); bounds activation memory.
        dropout: dropout on the output projection.
    """

    def __init__(self, dim: int, heads: int = 4, block: int = 64, chunk: int = 4096, dropout: float = 0.0):
        super().__init__()
        if dim % heads:
            raise ValueError(f"LightningAttention: dim {dim} is not divisible by heads {heads}")
        if block < 1 or chunk < block:
            raise ValueError(f"LightningAttention: need 1 <= block <= chunk, got block={block}, chunk={chunk}")
        self.heads, self.block, self.chunk = heads, block, chunk - chunk % block
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.drop = nn.Dropout(dropout)
        self.locality = nn.Parameter(torch.zeros(heads))  # logit of the own block's share g_h (0.5 at start)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x [B, N, D] in the order to block (see `spatial_order`), mask [B, N] -> [B, N, D]."""
        n = x.shape[1]
        if n <= self.chunk:  # one chunk: nothing to recompute
            pad = (-n) % self.block
            xp, mp = (F.pad(x, (0, 0, 0, pad)), F.pad(mask, (0, pad), value=False)) if pad else (x, mask)
            q, k, v, keep = self._heads(self.qkv(xp), mp)
            return self._attend(q, k, v, keep, *self._state(k, v, keep, mp), x.dtype)[:, :n]
        # A large bag: the projection runs once over the whole bag and is kept (3 x [N, D]); all after
        # it runs chunk by chunk and, in training, is recomputed chunk by chunk in the backward pass,
        # so the blocks' intermediates never exist for more than one chunk. Split views, not slices:
        # their backward is one concatenation, not a full-size gradient per chunk.
        qs, ms = list(self.qkv(x).split(self.chunk, 1)), list(mask.split(self.chunk, 1))
        pad = (-qs[-1].shape[1]) % self.block
        if pad:
            qs[-1], ms[-1] = F.pad(qs[-1], (0, 0, 0, pad)), F.pad(ms[-1], (0, pad), value=False)
        recompute = torch.is_grad_enabled()
        # Pass 1: the bag's total key-value state, summed chunk by chunk.
        totals = None
        for qc, mc in zip(qs, ms, strict=True):
            part = checkpoint(self._chunk_state, qc, mc, use_reentrant=False) if recompute else \
                self._chunk_state(qc, mc)
            totals = part if totals is None else tuple(t + p for t, p in zip(totals, part, strict=True))
        # Pass 2: each chunk's output from its own blocks and the bag's state.
        out = [checkpoint(self._chunk_out, qc, mc, *totals, use_reentrant=False) if recompute
               else self._chunk_out(qc, mc, *totals) for qc, mc in zip(qs, ms, strict=True)]
        return torch.cat(out, 1)[:, :n]

    def _heads(self, qkv: torch.Tensor, mask: torch.Tensor):
        """Projected tokens [B, N, 3D] (N a multiple of the block) -> q, k, v [B, H, nb, block, dh]
        in float32, and the mask as [B, 1, nb, block, 1]."""
        b, n, d3 = qkv.shape
        q, k, v = qkv.float().view(b, n // self.block, self.block, 3, self.heads, d3 // (3 * self.heads)) \
            .permute(3, 0, 4, 1, 2, 5)
        return q, k, v, mask.view(b, 1, n // self.block, self.block, 1).float()

    @staticmethod
    def _state(k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Over real tokens: (sum phi(k) v^T [B, H, dh, dh], sum phi(k) [B, H, dh], count [B])."""
        fk = _phi(k) * keep
        return torch.einsum("bhnkd,bhnke->bhde", fk, v), fk.sum((2, 3)), mask.float().sum(1)

    def _chunk_state(self, qkv: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
        release_freed_memory(qkv)
        _, k, v, keep = self._heads(qkv, mask)
        return self._state(k, v, keep, mask)

    def _chunk_out(self, qkv: torch.Tensor, mask: torch.Tensor, state: torch.Tensor, norm: torch.Tensor,
                   count: torch.Tensor) -> torch.Tensor:
        release_freed_memory(qkv)
        return self._attend(*self._heads(qkv, mask), state, norm, count, qkv.dtype)

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor, state: torch.Tensor,
                norm: torch.Tensor, count: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Output [B, nb * block, D] of the blocks in q, k, v given the bag's kernel state."""
        dh = q.shape[-1]
        # Local: exact softmax inside each block (-1e30 rather than -inf for padding keys keeps a
        # block of padding finite in both passes).
        scores = (q @ k.transpose(-1, -2)).mul_(1 / math.sqrt(dh))
        scores = scores.masked_fill_(keep.transpose(-1, -2) == 0, -1e30)
        local = torch.softmax(scores, -1) @ v
        # Global: every other block through the kernel state (the bag's minus this block's).
        fq, fk = _phi(q), _phi(k) * keep
        far_state = state[:, :, None] - torch.einsum("bhnkd,bhnke->bhnde", fk, v)
        far_norm = norm[:, :, None] - fk.sum(3)
        far_den = torch.einsum("bhnqd,bhnd->bhnq", fq, far_norm).clamp_min(1e-30)
        far = torch.einsum("bhnqd,bhnde->bhnqe", fq, far_state) / far_den[..., None]
        # Mix: a learned share g_h for the own block, 1 - g_h for the rest of the bag; a part that is
        # empty (a bag of one block, a block of padding) gets no share, so one block is exact softmax.
        in_block = keep.sum(3, keepdim=True)  # [B, 1, nb, 1, 1]: real tokens of each block
        others = count.view(-1, 1, 1, 1, 1) - in_block
        g = torch.sigmoid(self.locality).view(1, -1, 1, 1, 1)
        w_local, w_far = g * (in_block > 0), (1 - g) * (others > 0)
        out = (w_local * local + w_far * far) / (w_local + w_far).clamp_min(1e-12)
        b, h, nb, blk, _ = out.shape
        out = out.permute(0, 2, 3, 1, 4).reshape(b, nb * blk, h * dh).to(dtype)
        return self.drop(self.proj(out))


class TileTransformerLayer(nn.Module):
    """Pre-norm transformer layer over tiles: x + attn(LN x), then x + FFN(LN x); linear in tiles."""

    def __init__(self, dim: int, heads: int = 4, block: int = 64, dropout: float = 0.1, ff_mult: int = 2):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = LightningAttention(dim, heads, block, dropout=dropout)
        self.ff = nn.Sequential(nn.Linear(dim, ff_mult * dim), nn.GELU(), nn.Dropout(dropout),
                                nn.Linear(ff_mult * dim, dim), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x [B, N, D] (spatially ordered), mask [B, N] -> [B, N, D]."""
        x = x + self.attn(self.norm1(x), mask)
        return x + self.ff(self.norm2(x))


class TileEncoder(nn.Module):
    """Several `TileTransformerLayer`s over a bag, run in spatial order when tile positions are given.

    Returns the tokens in the caller's order, so attention maps still line up with the tiles.
    """

    def __init__(self, dim: int, layers: int = 1, heads: int = 4, block: int = 64, dropout: float = 0.1,
                 grid_um: float = 128.0):
        super().__init__()
        self.layers = nn.ModuleList(TileTransformerLayer(dim, heads, block, dropout) for _ in range(layers))
        self.grid_um = grid_um

    def forward(self, x: torch.Tensor, mask: torch.Tensor, coords: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, N, D], mask [B, N], coords [B, N, 2] in um (optional) -> [B, N, D]."""
        if not len(self.layers):
            return x
        order = spatial_order(coords, mask, self.grid_um) if coords is not None else None
        if order is not None:
            x = torch.gather(x, 1, order[..., None].expand_as(x))
            mask = torch.gather(mask, 1, order)
        for layer in self.layers:
            x = layer(x, mask)
        if order is not None:
            x = torch.empty_like(x).scatter_(1, order[..., None].expand_as(x), x)
        return x
