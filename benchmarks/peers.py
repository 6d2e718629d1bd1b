"""Peers' unit choices re-implemented on prunetool's cut, for the benchmarks: the units they remove, handed to
``prunetool.shrink`` as its scores (one ratio everywhere, as the papers prune), with the compensation they use.

- *Wanda-sp* (the structured Wanda of An et al., FLAP, 2024): a unit's importance is the sum over the weights that
  read it of ``|W_ij| · ‖X_j‖₂``, the input's norm over the calibration data; nothing compensates.
- *ThiNet* (Luo et al., 2017): per layer, the units whose summed contribution to the consumer's output has the
  least energy, chosen greedily (``‖Σ_{j∈T} W_j x_j‖²`` over the calibration data, from the inputs' second
  moments), then the kept weights refit by least squares (prunetool's ``lstsq``).

    python -m benchmarks.peers CKPT --arch A --data D --peer wanda-sp --target-macs 0.5 --out OUT --json J
"""

from __future__ import annotations

import argparse
import json

import torch

import prunetool
from prunetool.calibrate import Settings, covariances, statistics
from prunetool.data import calibration, load_data
from prunetool.score import Scores
from prunetool.trace import trace
from prunetool.units import input_columns

PEERS = {"wanda-sp": "none", "thinet": "lstsq"}  # peer → its compensation


def _consumers(model, graph, samples, settings):
    """Per group: (W as out × d, E[x xᵀ] over its d inputs, each unit's design columns as units × b) of every
    consumer whose weight is ``weight``."""
    modules = dict(model.named_modules())
    names = sorted({c.name for g in graph.groups for c in g.consumers if c.weight == "weight"})
    covs = covariances(model, names, samples, settings, graph)
    out = {}
    for g in graph.groups:
        for c in g.consumers:
            if c.name not in covs:
                continue
            weight = getattr(modules[c.name], c.weight).detach()
            w = c.op.as_matrix(weight).double()  # out × d
            per = w.shape[1] // weight.shape[c.op.in_dim]  # design columns per input channel
            channels = torch.stack([input_columns(c, torch.tensor([u])) for u in range(g.units)])  # units × ch
            cols = (channels[:, :, None] * per + torch.arange(per)).flatten(1)  # units × b
            out.setdefault(g.name, []).append((w, covs[c.name].double(), cols))
    return out


def wanda_sp(parts) -> torch.Tensor:
    """Σ over consumers and a unit's columns of Σ_o |W_oa| · ‖x_a‖."""
    score = 0
    for w, cov, cols in parts:
        per_column = w.abs().sum(0) * cov.diagonal().clamp_min(0).sqrt()  # d
        score = score + per_column[cols].sum(1)
    return score


def thinet(parts) -> torch.Tensor:
    """Greedy: the unit whose addition to the removed set T least raises ‖Σ_{j∈T} W_j x_j‖² goes next; scores are
    the removal order (first removed, lowest)."""
    units = len(parts[0][2])
    m = torch.zeros(units, units, dtype=torch.float64)
    for w, cov, cols in parts:
        g = (w.T @ w) * cov  # d × d: E[(W_a x_a)·(W_b x_b)] summed over outputs
        s = torch.zeros(units, len(cov), dtype=torch.float64)
        s.scatter_(1, cols, 1.0)  # units × d indicator of each unit's columns
        m += s @ g @ s.T
    removed = torch.zeros(units, dtype=torch.bool)
    cross = torch.zeros(units, dtype=torch.float64)  # Σ_{k∈T} M[j, k]
    order = torch.empty(units)
    for step in range(units):
        cost = 2 * cross + m.diagonal()
        cost[removed] = float("inf")
        j = int(torch.argmin(cost))
        removed[j] = True
        cross += m[:, j]
        order[j] = step
    return order


def scores(model, samples, peer: str) -> Scores:
    settings = Settings()
    x, _ = samples.take(2)
    graph = trace(model, x)
    parts = _consumers(model, graph, samples, settings)
    rank = wanda_sp if peer == "wanda-sp" else thinet
    out = {g.name: (rank(parts[g.name]).float() if g.name in parts else torch.zeros(g.units)) for g in graph.groups}
    return Scores(peer, out, statistics(model, graph, samples, settings).means)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint")
    parser.add_argument("--arch", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--peer", choices=sorted(PEERS), required=True)
    parser.add_argument("--target-macs", type=float, required=True)
    parser.add_argument("--calib", type=int, default=1000)
    parser.add_argument("--out", required=True)
    parser.add_argument("--json", required=True)
    args = parser.parse_args(argv)
    model = prunetool.load(args.checkpoint, arch=args.arch).model.eval()
    samples = calibration(load_data(args.data), args.calib)
    chosen = scores(model, samples, args.peer)
    _, report = prunetool.shrink(args.checkpoint, args.data, compensate=PEERS[args.peer], arch=args.arch,
                                 calib=args.calib, target_macs=args.target_macs, allocation="uniform",
                                 scores=chosen, out=args.out, latency_batches=())
    with open(args.json, "w") as f:
        json.dump(report, f, default=str)


if __name__ == "__main__":
    main()
