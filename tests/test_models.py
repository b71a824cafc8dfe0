import pytest
import torch

from fusion.models import available_models, create_model

KW = {"in_dim": 16, "genomic_dim": 12, "clinical_dim": 3, "groups": [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]}
# Every registered model with its defaults, and the fusion models with each attention block switched on.
VARIANTS = [(name, {}) for name in available_models()] + [
    ("biofusion", {"encoder_dims": [10, 6]}),  # two encoders per tile, fused by the VAE
    ("biofusion", {"modal_fusion": "cls"}),
    ("biofusion", {"glca": 0.2, "pwca": True}),
    ("biofusion", {"tile_layers": 0, "cross_layers": 1}),
    ("biofusion", {"scale_dims": [16]}),  # CrossViT over a second magnification
    ("biofusion", {"scale_dims": [16, 16], "multiscale": "medusa"}),
    ("coattn", {"fusion": "cls"}),
]
IDS = [name + "".join(f"-{k}={v}" for k, v in opts.items()) for name, opts in VARIANTS]


def _inputs(b=3, n=50, scales=0):
    torch.manual_seed(0)
    x = torch.randn(b, n, 16)
    mask = torch.ones(b, n, dtype=torch.bool)
    mask[1, 20:] = False
    grid = torch.tensor([[i % 10 * 128.0, i // 10 * 128.0] for i in range(n)])
    extra = {"genomics": torch.randn(b, 12), "genomics_mask": torch.tensor([True, True, False]),
             "clinical": torch.randn(b, 3), "coords": grid.expand(b, -1, -1).clone()}
    if scales:
        coarse_mask = torch.ones(b, 6, dtype=torch.bool)
        coarse_mask[2] = False  # patient 2 lacks the low-magnification tiles
        extra.update(scale_features=[torch.randn(b, 6, 16) for _ in range(scales)],
                     scale_masks=[coarse_mask] * scales, scale_coords=[grid[:6].expand(b, -1, -1) * 4] * scales)
    return x, mask, extra


def _total_loss(out):
    loss = out["risk"].sum() + out.get("aux_loss", 0)
    return loss + out["branch_risk"].sum() if "branch_risk" in out else loss


@pytest.mark.parametrize(("name", "options"), VARIANTS, ids=IDS)
def test_forward_backward_and_masking(name, options):
    model = create_model(name, dropout=0.0, **KW, **options).eval()
    x, mask, extra = _inputs(scales=len(options.get("scale_dims", [])))
    out = model(x, mask, **extra)
    assert out["risk"].shape == (3,) and out["attention"].shape == (3, 50)
    assert torch.allclose(out["attention"].sum(1), torch.ones(3), atol=1e-5)
    assert (out["attention"][1, 20:] == 0).all()
    # Padding content must not change a patient's risk.
    x2 = x.clone()
    x2[1, 20:] = 1e3
    assert torch.allclose(model(x2, mask, **extra)["risk"], out["risk"], atol=1e-4)
    model.train()
    _total_loss(model(x, mask, **extra)).backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize(("name", "options"), VARIANTS, ids=IDS)
def test_missing_modalities_give_finite_scores(name, options):
    model = create_model(name, **KW, **options).eval()
    x, mask, extra = _inputs(scales=len(options.get("scale_dims", [])))
    mask[0] = False  # patient 0 has no tiles; patient 2 has no genomics nor low-magnification tiles
    out = model(x, mask, **extra)
    assert torch.isfinite(out["risk"]).all()
    assert torch.isfinite(model(x, mask)["risk"]).all()  # image-only call works for every model
    if name in ("coattn", "biofusion"):  # a patient with tiles only is scored from them, not a constant
        tiles_only = model(x, mask)["risk"]
        assert not torch.allclose(tiles_only[1:2], model(x + torch.randn_like(x), mask)["risk"][1:2])


@pytest.mark.parametrize("name", ["coattn", "biofusion"])
def test_genomics_change_the_fusion_models_risk(name):
    model = create_model(name, dropout=0.0, **KW).eval()
    x, mask, extra = _inputs()
    other = {**extra, "genomics": extra["genomics"] + 3}
    assert not torch.allclose(model(x, mask, **extra)["risk"][:2], model(x, mask, **other)["risk"][:2])


def test_acmil_defaults_are_the_papers():
    model = create_model("acmil", in_dim=16)
    assert (model.w.out_features, model.top_k, model.mask_ratio, model.diversity) == (5, 10, 0.6, 1.0)


def test_acmil_masks_int_k_ratio_of_each_branchs_top_k_in_training():
    model = create_model("acmil", in_dim=16, dropout=0.0).train()
    x, mask, _ = _inputs()
    h = model.embed(model.normalise(x))
    logits = model.w(torch.tanh(model.v(h)) * torch.sigmoid(model.u(h))).transpose(1, 2)
    valid = mask[:, None, :].expand_as(logits)
    dropped = model._stochastic_top_k(logits, valid)
    assert (dropped.sum(-1) == 6).all()  # int(10 * 0.6) per branch and bag
    top10 = logits.masked_fill(~valid, float("-inf")).topk(10, -1).indices
    assert (dropped & ~torch.zeros_like(dropped).scatter(-1, top10, True)).sum() == 0
    assert not (dropped & ~valid).any()


def test_acmil_masks_top_instances_in_training_only():
    model = create_model("acmil", in_dim=16, dropout=0.0)
    x, mask, _ = _inputs()
    model.eval()
    assert torch.equal(model(x, mask)["risk"], model(x, mask)["risk"])
    model.train()
    torch.manual_seed(1)
    a = model(x, mask)["attention"]
    torch.manual_seed(2)
    b = model(x, mask)["attention"]
    assert not torch.allclose(a, b)  # stochastic top-K masking differs between draws
    assert model(x, mask)["aux_loss"] >= 0


def test_model_options_are_checked_by_name():
    from fusion.train.loop import TrainConfig

    with pytest.raises(ValueError, match="model 'abmil' has no option.*glca"):
        TrainConfig(model="abmil", model_options={"glca": 0.1})
    with pytest.raises(ValueError, match="modal_fusion='both' is not one of"):
        create_model("biofusion", modal_fusion="both", **KW)
    with pytest.raises(ValueError, match="encoder_dims \\[10, 10\\] add up to 20"):
        create_model("biofusion", encoder_dims=[10, 10], **KW)
    with pytest.raises(ValueError, match="only biofusion read several tile sets"):
        TrainConfig(model="abmil", extra_tile_sets=("5x",))


def test_biofusion_vae_reads_each_encoder_on_its_own():
    """Two encoders per tile: the VAE projects each separately, so each has its own input weights."""
    model = create_model("biofusion", encoder_dims=[10, 6], **KW)
    assert [p[0].in_features for p in model.vae.proj] == [10, 6]


def test_unknown_model_lists_the_known_ones():
    with pytest.raises(ValueError, match="Unknown model 'nope'; available: abmil, acmil"):
        create_model("nope", in_dim=4)


def test_cli_options_are_read_as_yaml_scalars():
    from fusion.cli import _options

    assert _options(["glca=0.1", "pwca=true", "modal_fusion=cls"]) == {"glca": 0.1, "pwca": True, "modal_fusion": "cls"}
    with pytest.raises(ValueError, match="expected NAME=VALUE"):
        _options(["glca"])
