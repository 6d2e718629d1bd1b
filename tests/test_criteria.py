"""Criteria: MRS against its exact oracle MRP, and the closed forms behind fp, l1, l2, taylor."""

import pytest
import torch
from scipy.stats import spearmanr

from prunetool.score import frame_potential_order, score

from conftest import evci_cnn, traced


@pytest.fixture(scope="module")
def evci_setup(mnist_small):
    return traced(evci_cnn(), mnist_small, 500)


def test_mrs_ranks_units_like_mrp(evci_setup):
    dense, graph, x, y = evci_setup
    mrs = score(dense, graph, "mrs", x, y).scores
    mrp = score(dense, graph, "mrp", x, y).scores
    for g in graph.groups:
        rho = spearmanr(mrs[g.name].numpy(), mrp[g.name].numpy()).statistic
        print(f"Spearman(MRS, MRP) {g.name}: {rho:.3f}")
        assert rho >= 0.7, (g.name, rho)


def test_mrs_means_come_from_the_whole_calibration_set(evci_setup):
    """Scoring in one batch or many gives the same scores: means are dataset means, not batch means."""
    from prunetool.calibrate import Settings, batch_size

    dense, graph, x, y = evci_setup
    big, small = Settings(memory=2 ** 34), Settings(memory=2 ** 20)
    assert batch_size(graph, big, backward=True) >= 256 > len(x) // 8 >= batch_size(graph, small, backward=True)
    whole = score(dense, graph, "mrs", x, y, settings=big)
    split = score(dense, graph, "mrs", x, y, settings=small)
    for g in graph.groups:
        assert torch.allclose(whole.scores[g.name], split.scores[g.name], rtol=1e-4, atol=1e-6)
        for key in whole.means[g.name]:
            assert torch.allclose(whole.means[g.name][key], split.means[g.name][key], atol=1e-6)


def test_mrs_and_taylor_match_a_direct_computation(evci_setup):
    """For the hidden Linear layer, recompute both scores from autograd on the captured activations."""
    dense, graph, x, y = evci_setup
    captured = {}

    def keep_input(module, args):
        a = args[0].detach().requires_grad_()
        captured["a"] = a
        return (a,)

    handle = dense.classifier[3].register_forward_pre_hook(keep_input)
    try:
        loss = torch.nn.functional.cross_entropy(dense(x), y, reduction="sum")
    finally:
        handle.remove()
    a = captured["a"]
    (g,) = torch.autograd.grad(loss, a)
    a, g = a.detach().double(), g.double()
    expected_taylor = (a * g).abs().sum(0)
    expected_mrs = ((a.mean(0) - a) * g).abs().sum(0)
    got_mrs = score(dense, graph, "mrs", x, y).scores["classifier.1"]
    got_taylor = score(dense, graph, "taylor", x, y).scores["classifier.1"]
    assert torch.allclose(got_mrs.double(), expected_mrs, rtol=1e-4, atol=1e-6)
    assert torch.allclose(got_taylor.double(), expected_taylor, rtol=1e-4, atol=1e-6)


def test_weight_norm_criteria(evci_setup):
    dense, graph, x, y = evci_setup
    l1 = score(dense, graph, "l1", x, y).scores
    l2 = score(dense, graph, "l2", x, y).scores
    w = dense.features[3].weight.detach()
    assert torch.allclose(l1["features.3"], w.abs().sum((1, 2, 3)))
    assert torch.allclose(l2["features.3"], w.flatten(1).norm(dim=1))


def test_frame_potential_closed_form_matches_recomputation():
    torch.manual_seed(0)
    w = torch.randn(12, 7)
    order = frame_potential_order(w)
    wn = torch.nn.functional.normalize(w.double(), dim=1)
    alive = list(range(12))
    for step in range(12):
        contrib = {i: sum((wn[i] @ wn[j]).item() ** 2 for j in alive) for i in alive}
        smallest = min(contrib, key=contrib.get)
        assert order[smallest] == step
        alive.remove(smallest)


def test_random_is_seeded(evci_setup):
    dense, graph, x, y = evci_setup
    a = score(dense, graph, "random", x, y).scores
    b = score(dense, graph, "random", x, y).scores
    assert all(torch.equal(a[k], b[k]) for k in a)


class Twin(torch.nn.Module):
    """A hidden layer whose unit 5 repeats unit 2 (same weights in, same bias): one of them is redundant."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = torch.nn.Linear(6, 8), torch.nn.Linear(8, 3)
        with torch.no_grad():
            self.a.weight[5], self.a.bias[5] = self.a.weight[2], self.a.bias[2]

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def test_obs_removes_first_the_unit_the_refit_repairs_exactly():
    import prunetool

    dense, x = Twin().eval(), torch.randn(512, 6)
    from prunetool.trace import trace

    graph = trace(dense, x[:2])
    scores = score(dense, graph, "obs", x, torch.zeros(512, dtype=torch.long)).scores["a"]
    assert int(torch.argmin(scores)) in (2, 5) and float(scores.min()) < 1e-3 * float(scores.max())
    mrs = score(dense, graph, "mrs", x, torch.zeros(512, dtype=torch.long)).scores["a"]
    assert int(torch.argmin(mrs)) not in (2, 5)  # mrs sees two useful units, not that one repeats the other
    small, _ = prunetool.shrink(dense, input_shape=(6,), criterion="obs", ratio=0.125, calib=512, measure=False)
    with torch.no_grad():
        assert small.a.out_features == 7 and torch.allclose(small(x), dense(x), atol=1e-4)


def test_obs_first_cost_is_the_least_squares_refit_error(monkeypatch):
    """One consumer: the greedy's first cost for a unit is the output error of refitting the others by least
    squares (with a bias) once it is gone (damping off)."""
    from prunetool import score as score_module

    monkeypatch.setattr(score_module, "OBS_DAMPING", 1e-10)
    dense, x = Twin().eval(), torch.randn(2048, 6)
    with torch.no_grad():
        h = torch.relu(dense.a(x)).double()
        y = dense.b(torch.relu(dense.a(x))).double()
    from prunetool.score import _greedy_obs, _obs_state
    from prunetool.trace import trace

    graph = trace(dense, x[:2])
    g = graph.groups[0]
    cov = torch.cov(h.T, correction=0)
    w, hinv, cols = _obs_state(g.consumers[0], dense.b, cov, g.units)
    first = torch.einsum("ob,bc,oc->", w[:, [0]], torch.linalg.inv(hinv[[0]][:, [0]]), w[:, [0]])
    design = torch.cat([h[:, 1:], torch.ones(len(h), 1, dtype=torch.float64)], 1)
    fit = torch.linalg.lstsq(design, y).solution
    exact = ((design @ fit - y) ** 2).sum(1).mean()
    assert abs(float(first) - float(exact)) <= 1e-6 * float(exact)
    assert len(_greedy_obs([(w, hinv, cols)], g.units)) == g.units
