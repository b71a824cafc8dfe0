import pytest
import torch

from fusion.models import available_models, create_model


@pytest.mark.parametrize("name", available_models())
def test_forward_backward_and_masking(name):
    torch.manual_seed(0)
    model = create_model(name, in_dim=16, dropout=0.0).eval()
    x = torch.randn(3, 50, 16)
    mask = torch.ones(3, 50, dtype=torch.bool)
    mask[1, 20:] = False
    out = model(x, mask)
    assert out["risk"].shape == (3,) and out["attention"].shape == (3, 50)
    assert torch.allclose(out["attention"].sum(1), torch.ones(3), atol=1e-5)
    assert (out["attention"][1, 20:] == 0).all()
    # Padding content must not change a patient's risk.
    x2 = x.clone()
    x2[1, 20:] = 1e3
    assert torch.allclose(model(x2, mask)["risk"], out["risk"], atol=1e-5)
    out["risk"].sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("name", available_models())
def test_a_bag_without_tiles_gives_a_finite_score(name):
    model = create_model(name, in_dim=8).eval()
    x, mask = torch.randn(2, 5, 8), torch.ones(2, 5, dtype=torch.bool)
    mask[0] = False
    assert torch.isfinite(model(x, mask)["risk"]).all()


def test_unknown_model_lists_the_known_ones():
    with pytest.raises(ValueError, match="Unknown model 'nope'; available: abmil"):
        create_model("nope", in_dim=4)
