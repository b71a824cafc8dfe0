"""The attention blocks of fusion/models/blocks: exactness where they must be exact, masking,
chunking, spatial order, and what each block reads."""

import math

import pytest
import torch

from fusion.models.blocks.cross import CLSFusion, CrossAttentionBlock
from fusion.models.blocks.glca import GlobalLocalCrossAttention, distractor
from fusion.models.blocks.lightning import LightningAttention, TileEncoder, _phi, spatial_order
from fusion.models.blocks.multiscale import SharedScaleBody


def _bag(b=2, n=50, d=32, seed=0):
    torch.manual_seed(seed)
    x = torch.randn(b, n, d)
    mask = torch.ones(b, n, dtype=torch.bool)
    mask[1, n * 2 // 3:] = False
    return x, mask


def _heads(att, x, heads):
    b, n, d = x.shape
    return att.qkv(x).view(b, n, 3, heads, d // heads).permute(2, 0, 3, 1, 4)


def test_lightning_is_exact_softmax_attention_when_the_bag_fits_one_block():
    att = LightningAttention(32, heads=4, block=64).eval()
    with torch.no_grad():
        att.locality.fill_(1.3)  # the local share must not matter when there is nothing else
    x, mask = _bag(n=50)
    q, k, v = _heads(att, x, 4)
    exact = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :])
    exact = att.proj(exact.transpose(1, 2).reshape(2, 50, 32))
    out = att(x, mask)
    torch.testing.assert_close(out[0], exact[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[1, :33], exact[1, :33], atol=1e-5, rtol=1e-5)


def test_lightning_over_many_blocks_mixes_block_softmax_and_far_linear_attention():
    """Own block: softmax; other blocks: kernel weights phi(q).phi(k), normalised on their own; mixed
    with the learned share g. Checked against the dense formula, with chunks smaller than the bag."""
    att = LightningAttention(32, heads=4, block=16, chunk=32).eval()
    with torch.no_grad():
        att.locality.fill_(0.7)
    n = 70
    x, mask = _bag(n=n)
    q, k, v = _heads(att, x, 4)
    same_block = (torch.arange(n)[:, None] // 16) == (torch.arange(n)[None] // 16)
    real = mask[:, None, None, :]
    local_w = torch.exp(q @ k.transpose(-1, -2) / math.sqrt(8)) * same_block * real
    far_w = (_phi(q) @ _phi(k).transpose(-1, -2)) * ~same_block * real
    g = torch.sigmoid(torch.tensor(0.7))
    mixed = g * (local_w @ v) / local_w.sum(-1, keepdim=True) + (1 - g) * (far_w @ v) / far_w.sum(-1, keepdim=True)
    dense = att.proj(mixed.transpose(1, 2).reshape(2, n, 32))
    out = att(x, mask)
    torch.testing.assert_close(out[0], dense[0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out[1, :46], dense[1, :46], atol=1e-5, rtol=1e-4)


def test_lightning_chunks_recomputed_in_backward_give_the_same_gradients():
    torch.manual_seed(1)
    small = LightningAttention(32, heads=4, block=16, chunk=32)
    big = LightningAttention(32, heads=4, block=16, chunk=4096)
    big.load_state_dict(small.state_dict())
    x, mask = _bag(n=150)
    grads = []
    for att in (small, big):
        xi = x.clone().requires_grad_(True)
        att(xi, mask).pow(2).sum().backward()
        grads.append((xi.grad, att.qkv.weight.grad))
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_lightning_ignores_padding_and_stays_finite():
    att = LightningAttention(32, heads=4, block=16, chunk=32).train()
    x, mask = _bag(n=100)
    out = att(x, mask)
    x2 = x.clone()
    x2[1, ~mask[1]] = 1e4
    torch.testing.assert_close(att(x2, mask)[1, mask[1]], out[1, mask[1]])
    empty = torch.zeros_like(mask)
    assert torch.isfinite(att(x, empty)).all()
    with pytest.raises(ValueError, match="not divisible by heads"):
        LightningAttention(30, heads=4)


def test_spatial_order_walks_neighbours_together_and_puts_padding_last():
    # A 4 x 4 grid of 128-um tiles given in a scrambled order; the first 4 of the order are a 2 x 2 patch.
    grid = torch.tensor([[x * 128.0, y * 128.0] for y in range(4) for x in range(4)])
    perm = torch.randperm(16, generator=torch.Generator().manual_seed(0))
    coords = torch.cat([grid[perm], torch.full((2, 2), 9e9)])[None]
    mask = torch.ones(1, 18, dtype=torch.bool)
    mask[0, 16:] = False
    order = spatial_order(coords, mask)[0]
    first = coords[0, order[:4]]
    assert (first.amax(0) - first.amin(0) <= 128).all()  # a compact 2 x 2 patch
    assert set(order[16:].tolist()) == {16, 17}


def test_tile_encoder_follows_tiles_not_their_input_order():
    enc = TileEncoder(32, layers=2, heads=4, block=8).eval()
    n = 40
    coords = torch.tensor([[x * 128.0, y * 128.0] for y in range(5) for x in range(8)])[None].expand(2, -1, -1)
    x, mask = _bag(n=n)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(3))
    a = enc(x, mask, coords)
    b = enc(x[:, perm], mask[:, perm], coords[:, perm])
    torch.testing.assert_close(a[:, perm][mask[:, perm]], b[mask[:, perm]], atol=1e-5, rtol=1e-5)


def test_glca_queries_are_the_top_tiles_and_pwca_adds_a_distractor():
    glca = GlobalLocalCrossAttention(32, heads=4, ratio=0.1, max_queries=3).eval()
    x, mask = _bag(n=50)
    scores = torch.arange(50.0).expand(2, -1).clone()
    local, idx = glca(x, mask, scores)
    assert idx[0].tolist() == [49, 48, 47]  # capped at max_queries
    assert set(idx[1].tolist()) <= set(range(33))  # never a padded tile
    empty = torch.zeros_like(mask)
    assert torch.isfinite(glca(x, empty, scores)[0]).all()
    pair = distractor(x, mask)
    assert torch.equal(pair[0][0], x[1]) and distractor(x[:1], mask[:1]) is None
    with_pair, _ = glca(x, mask, scores, extra=pair)
    assert not torch.allclose(with_pair, local)


def test_cross_attention_block_reads_its_context_and_survives_an_empty_one():
    block = CrossAttentionBlock(32, heads=4, dropout=0.0).eval()
    x, mask = _bag(n=20)
    queries = torch.randn(2, 3, 32)
    out, weights = block(queries, x, mask, need_weights=True)
    assert weights.shape == (2, 3, 20) and (weights[1, :, mask[1].sum():] == 0).all()
    other, _ = block(queries, x + torch.randn_like(x), mask)  # (a constant shift is what LayerNorm removes)
    assert not torch.allclose(out, other)
    assert torch.isfinite(block(queries, x, torch.zeros_like(mask))[0]).all()


def test_cls_fusion_reads_only_the_other_side_through_one_query():
    fusion = CLSFusion(32, heads=4).eval()
    a, mask_a = _bag(n=30, seed=1)
    b, mask_b = _bag(n=12, seed=2)
    cls_a, cls_b = torch.randn(2, 32), torch.randn(2, 32)
    out_a, out_b, attn = fusion(cls_a, a, mask_a, cls_b, b, mask_b)
    assert attn.shape == (2, 30) and (attn[1, ~mask_a[1]] == 0).all()
    # a's CLS reads b's tokens (not a's); b's CLS reads a's tokens.
    out_a2, out_b2, _ = fusion(cls_a, a + torch.randn_like(a), mask_a, cls_b, b, mask_b)
    torch.testing.assert_close(out_a2, out_a)
    assert not torch.allclose(out_b2, out_b)


def test_medusa_shares_one_body_and_pools_each_scale():
    body = SharedScaleBody(32, n_scales=2, layers=1, heads=4, block=8).eval()
    fine, fine_mask = _bag(n=40)
    coarse, coarse_mask = _bag(n=6, seed=5)
    tokens, pooled = body([fine, coarse], [fine_mask, coarse_mask])
    assert tokens.shape == fine.shape and len(pooled) == 1 and pooled[0].shape == (2, 32)
    # Fine tiles see the coarse ones (one shared body): changing coarse tiles changes fine tokens.
    tokens2, _ = body([fine, coarse + torch.randn_like(coarse)], [fine_mask, coarse_mask])
    assert not torch.allclose(tokens2, tokens)
    none = torch.zeros_like(coarse_mask)
    _, missing = body([fine, coarse], [fine_mask, none])
    torch.testing.assert_close(missing[0], body.missing[0].expand(2, -1))


def _neighbour_bags(p: int, side: int = 10, n: int = 10, seed: int = 0):
    """Bags on a side x side grid of 128-um tiles: n tiles of kind A in one cluster and n of kind B,
    each B next to the cluster with probability sigmoid(2 z), else 3 tiles or more from it. Every bag holds the
    same tiles; only who neighbours whom carries the risk (-1.5 z)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    grid = np.array([[x, y] for y in range(side) for x in range(side)], float) * 128
    z = rng.standard_normal(p)
    feats = rng.normal(0, 0.5, (p, side * side, 4)).astype(np.float32)
    for i in range(p):
        cx, cy = rng.integers(1, side // 2 - 1, 2)
        a = set()
        while len(a) < n:
            dx, dy = rng.integers(-1, 3, 2)
            a.add(int((cy + dy) * side + cx + dx))
        dist = np.abs(grid[:, None] - grid[sorted(a)][None]).max(-1).min(1)
        near = list(rng.permutation(np.flatnonzero(dist == 128)))
        far = list(rng.permutation(np.flatnonzero(dist >= 384)))
        b = [(near if near and rng.random() < 1 / (1 + np.exp(-2 * z[i])) else far).pop() for _ in range(n)]
        feats[i, sorted(a), 0] += 3
        feats[i, b, 1] += 3
    t = 100 * (-np.log(rng.random(p)) * np.exp(1.5 * z)) ** (1 / 1.3)
    c = rng.uniform(50, 400, p)
    return (torch.from_numpy(feats), torch.from_numpy(grid).float().expand(p, -1, -1),
            torch.from_numpy(np.minimum(t, c)).float(), torch.from_numpy(t <= c).float())


@pytest.mark.parametrize("layers", [1, 0])
def test_lightning_learns_a_risk_that_lies_in_which_tiles_neighbour_which(layers):
    """With one Lightning layer (blocks of 16 = 4 x 4 tiles) a pooled model reads the signal; without
    it, the same model is at chance: the tiles' kinds and counts say nothing, their places do."""
    from fusion.models.blocks.pooling import GatedAttentionPool
    from fusion.survival import concordance, cox_loss

    x, coords, time, event = _neighbour_bags(240, side=8, n=8)
    mask = torch.ones(x.shape[:2], dtype=torch.bool)
    torch.manual_seed(0)
    embed, enc = torch.nn.Sequential(torch.nn.Linear(4, 32), torch.nn.GELU()), TileEncoder(32, layers, 4, 16, 0.0)
    pool, head = GatedAttentionPool(32, 16), torch.nn.Linear(32, 1)
    params = [p for m in (embed, enc, pool, head) for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=2e-3)
    risk = lambda s: head(pool(enc(embed(x[s]), mask[s], coords[s]), mask[s])[0]).squeeze(-1)  # noqa: E731
    for _ in range(60):
        idx = torch.randperm(180)[:48]
        loss = cox_loss(risk(idx), time[idx], event[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        c = concordance(time[180:].numpy(), event[180:].numpy().astype(bool), risk(slice(180, 240)).numpy())
    if layers:
        assert c > 0.65, c
    else:
        assert c < 0.6, c
