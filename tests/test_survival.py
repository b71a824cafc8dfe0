import numpy as np
import pandas as pd
import torch
from lifelines import CoxPHFitter
from sksurv.metrics import concordance_index_censored

from fusion.survival import concordance, cox_loss


def _breslow_reference(risk, time, event):
    """Textbook Breslow partial likelihood, one subject at a time."""
    total = 0.0
    for i in np.flatnonzero(event):
        at_risk = time >= time[i]
        total += risk[i] - np.log(np.exp(risk[at_risk]).sum())
    return -total / event.sum()


def test_cox_loss_matches_reference_with_ties():
    rng = np.random.default_rng(0)
    time = rng.integers(1, 8, 40).astype(float)  # many ties
    event = rng.random(40) < 0.5
    risk = rng.normal(size=40)
    ours = cox_loss(torch.tensor(risk), torch.tensor(time), torch.tensor(event))
    assert np.isclose(float(ours), _breslow_reference(risk, time, event), atol=1e-5)


def test_cox_loss_recovers_lifelines_coefficients():
    """Minimising our loss with a linear risk gives lifelines' Cox estimate (no ties: Efron = Breslow)."""
    rng = np.random.default_rng(1)
    n = 400
    x = rng.normal(size=(n, 2))
    t = rng.exponential(np.exp(-(x @ np.array([0.8, -0.5]))))
    c = rng.exponential(2.0, n)
    time, event = np.minimum(t, c), (t <= c).astype(float)
    df = pd.DataFrame({"x0": x[:, 0], "x1": x[:, 1], "time": time, "event": event})
    expected = CoxPHFitter().fit(df, "time", "event").params_.to_numpy()

    beta = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([beta], max_iter=200, tolerance_grad=1e-10, line_search_fn="strong_wolfe")
    xt, tt, et = torch.tensor(x), torch.tensor(time), torch.tensor(event)

    def closure():
        opt.zero_grad()
        loss = cox_loss((xt @ beta), tt, et)
        loss.backward()
        return loss

    opt.step(closure)
    np.testing.assert_allclose(beta.detach().numpy(), expected, atol=2e-3)


def test_cox_loss_prefers_the_right_order_and_survives_no_events():
    time = torch.tensor([1.0, 2.0, 3.0, 4.0])
    event = torch.tensor([1.0, 1.0, 1.0, 0.0])
    good, bad = torch.tensor([3.0, 2.0, 1.0, 0.0]), torch.tensor([0.0, 1.0, 2.0, 3.0])
    assert cox_loss(good, time, event) < cox_loss(bad, time, event)
    risk = torch.zeros(4, requires_grad=True)
    loss = cox_loss(risk, time, torch.zeros(4))
    loss.backward()
    assert float(loss.detach()) == 0.0 and risk.grad is not None


def test_concordance_is_sksurv():
    rng = np.random.default_rng(2)
    time, event, risk = rng.exponential(size=50), rng.random(50) < 0.4, rng.normal(size=50)
    assert concordance(time, event, risk) == concordance_index_censored(event, time, risk)[0]
    assert np.isnan(concordance(time, np.zeros(50, bool), risk))


def test_efron_matches_lifelines_with_ties():
    """lifelines fits with Efron ties: its coefficient minimises our Efron loss."""
    from fusion.survival import efron_cox_loss

    rng = np.random.default_rng(3)
    x = rng.normal(size=200)
    time = np.ceil(rng.exponential(np.exp(-0.7 * x)) * 4)  # heavy ties
    event = (rng.random(200) < 0.6).astype(float)
    beta = CoxPHFitter().fit(pd.DataFrame({"x": x, "t": time, "e": event}), "t", "e").params_["x"]
    f = lambda b: float(efron_cox_loss(torch.tensor(x * b), torch.tensor(time), torch.tensor(event)))  # noqa: E731
    assert f(beta) < f(beta + 0.02) and f(beta) < f(beta - 0.02)


def test_weighted_cox_rebalances_and_is_not_a_constant():
    from fusion.survival import event_balance_weights, weighted_cox_loss

    event = torch.tensor([1.0, 0, 0, 0, 1, 0, 0, 0])
    w = event_balance_weights(event)
    assert torch.isclose(w[event > 0].sum(), w[event == 0].sum()) and torch.isclose(w.mean(), torch.tensor(1.0))
    time = torch.arange(8.0)
    risk = torch.randn(8)
    # Unlike a constant weight, rebalancing changes the loss (risk sets hold weighted censored patients).
    assert not torch.isclose(weighted_cox_loss(risk, time, event), cox_loss(risk, time, event))
    # With equal weights it is the plain Cox loss.
    assert torch.isclose(weighted_cox_loss(risk, time, event, torch.ones(8)), cox_loss(risk, time, event))


def test_discrete_time_nll_prefers_the_true_bin():
    from fusion.survival import discrete_time_bins, nll_survival_loss, risk_from_hazards

    time = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0])
    event = torch.ones(8)
    edges = discrete_time_bins(time, event, n_bins=4)
    assert edges.shape == (5,) and torch.isinf(edges[0]) and torch.isinf(edges[-1])
    early = torch.tensor([[4.0, -4, -4, -4]]).repeat(8, 1)  # everyone dies in bin 0
    late = torch.tensor([[-4.0, -4, -4, 4]]).repeat(8, 1)
    early_patients = torch.tensor([1.0, 2.0, 1.5, 1.2, 2.1, 1.1, 1.9, 1.3])
    loss = lambda logits: nll_survival_loss(logits, early_patients, event, edges)  # noqa: E731
    assert loss(early) < loss(late)
    assert (risk_from_hazards(early) > risk_from_hazards(late)).all()  # higher risk = earlier death
