import pytest
import torch

from fusion.models import available_models, create_model

KW = {"in_dim": 16, "genomic_dim": 12, "clinical_dim": 3, "groups": [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]}


def _inputs(b=3, n=50):
    torch.manual_seed(0)
    x = torch.randn(b, n, 16)
    mask = torch.ones(b, n, dtype=torch.bool)
    mask[1, 20:] = False
    extra = {"genomics": torch.randn(b, 12), "genomics_mask": torch.tensor([True, True, False]),
             "clinical": torch.randn(b, 3)}
    return x, mask, extra


def _total_loss(out):
    loss = out["risk"].sum() + out.get("aux_loss", 0)
    return loss + out["branch_risk"].sum() if "branch_risk" in out else loss


@pytest.mark.parametrize("name", available_models())
def test_forward_backward_and_masking(name):
    model = create_model(name, dropout=0.0, **KW).eval()
    x, mask, extra = _inputs()
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


@pytest.mark.parametrize("name", available_models())
def test_missing_modalities_give_finite_scores(name):
    model = create_model(name, **KW).eval()
    x, mask, extra = _inputs()
    mask[0] = False  # patient 0 has no tiles; patient 2 has no genomics (see _inputs)
    out = model(x, mask, **extra)
    assert torch.isfinite(out["risk"]).all()
    assert torch.isfinite(model(x, mask)["risk"]).all()  # image-only call works for every model


@pytest.mark.parametrize("name", ["coattn", "biofusion"])
def test_genomics_change_the_fusion_models_risk(name):
    model = create_model(name, dropout=0.0, **KW).eval()
    x, mask, extra = _inputs()
    other = {**extra, "genomics": extra["genomics"] + 3}
    assert not torch.allclose(model(x, mask, **extra)["risk"][:2], model(x, mask, **other)["risk"][:2])


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


def test_unknown_model_lists_the_known_ones():
    with pytest.raises(ValueError, match="Unknown model 'nope'; available: abmil, acmil"):
        create_model("nope", in_dim=4)
