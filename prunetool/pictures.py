"""Pictures for ``inspect`` (matplotlib PNGs) and the self-contained HTML page that embeds them."""

from __future__ import annotations

import base64
import html
import io
import math

import torch

from .redundancy import mp_density


def _figure(width=6.0, height=3.6):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(width, height), dpi=100)


def _png(fig) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def spectrum_png(m: dict) -> bytes:
    sigma = torch.tensor(m["singular_values"], dtype=torch.float64)
    s2 = sigma ** 2
    residual = torch.cat([s2.flip(0).cumsum(0).flip(0), torch.zeros(1, dtype=s2.dtype)])
    fig, ax = _figure()
    ks = range(1, len(sigma) + 1)
    ax.plot(ks, sigma.numpy(), color="tab:blue", label="singular values σ_k")
    ax.set_xlabel("k")
    ax.set_ylabel("σ_k", color="tab:blue")
    ax2 = ax.twinx()
    ax2.plot(range(len(residual)), (residual / residual[0]).numpy(), color="tab:orange", label="residual r(k)")
    ax2.set_ylabel("r(k) = Σ_{i>k} σ_i² (normalised)", color="tab:orange")
    k = m["elbow_rank"]
    ax2.axvline(k, color="tab:red", linestyle="--")
    ax2.annotate(f"elbow k={k}\n{100 * m['elbow_energy']:.0f}% energy", (k, 0.5), color="tab:red",
                 xytext=(8, 0), textcoords="offset points")
    ax.set_title(f"{m['name']} {m['shape'][0]}×{m['shape'][1]}: spectrum and residual")
    return _png(fig)


def esd_png(m: dict) -> bytes:
    mp = m["mp"]
    eig = torch.tensor(mp["eigenvalues"], dtype=torch.float64)
    fig, ax = _figure()
    bins = min(80, max(10, len(eig) // 3))
    ax.hist(eig.numpy(), bins=bins, density=True, color="tab:blue", alpha=0.6, label="eigenvalues of W·Wᵀ/n")
    lam = torch.linspace(max(mp["lambda_minus"], 1e-12), mp["lambda_plus"], 200, dtype=torch.float64)
    ax.plot(lam.numpy(), mp_density(lam, mp["q"], mp["sigma2"]).numpy(), color="tab:red", label="Marchenko–Pastur")
    ax.axvline(mp["lambda_plus"], color="tab:red", linestyle="--")
    ax.set_title(f"{m['name']}: ESD, {mp['spikes']} spikes above λ₊ = {mp['lambda_plus']:.3g}")
    ax.set_xlabel("λ")
    ax.legend()
    return _png(fig)


def scores_png(g: dict) -> bytes:
    fig, ax = _figure()
    scores = torch.tensor(g["mrs_per_sample"], dtype=torch.float64)
    ax.hist(scores.numpy(), bins=min(50, max(5, len(scores) // 2)), color="tab:green")
    ax.set_yscale("log")
    ax.ticklabel_format(style="sci", axis="x", scilimits=(-2, 3))
    ax.set_xlabel("MRS per sample: estimated |loss change| if replaced by its mean")
    ax.set_ylabel("units")
    ax.set_title(f"{g['name']}: {g['units']} units, {len(g['dead'])} dead, {len(g['frozen'])} frozen,\n"
                 f"{g['could_go_under_1pct']} could go under 1% loss", fontsize=10)
    return _png(fig)


def weights_png(name: str, module: torch.nn.Module) -> bytes:
    w = module.weight.detach().reshape(module.weight.shape[0], -1).abs()
    fig, ax = _figure(7.0, 3.6)
    image = ax.imshow(w.numpy(), aspect="auto", cmap="viridis", interpolation="nearest")
    fig.colorbar(image, ax=ax, label="|w|")
    ax.set_xlabel("input (fan-in)")
    ax.set_ylabel("unit")
    ax.set_title(f"{name}: weight magnitudes")
    return _png(fig)


def receptive_fields_png(name: str, module: torch.nn.Linear, image_shape: tuple[int, ...], limit: int = 64) -> bytes:
    """Each unit's incoming weights drawn as an image (first layer on flattened images)."""
    import matplotlib.pyplot as plt

    c, h, w = image_shape
    units = min(limit, module.out_features)
    cols = int(math.ceil(math.sqrt(units)))
    rows = int(math.ceil(units / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 0.9, rows * 0.9), dpi=100)
    weights = module.weight.detach().reshape(-1, c, h, w)[:units].mean(1)
    for i, ax in enumerate(axes.flat if hasattr(axes, "flat") else [axes]):
        ax.axis("off")
        if i < units:
            v = weights[i]
            lim = float(v.abs().max()) or 1.0
            ax.imshow(v.numpy(), cmap="RdBu_r", vmin=-lim, vmax=lim)
    fig.suptitle(f"{name}: incoming weights of the first {units} units")
    return _png(fig)




def page(report: dict, plots: dict[str, bytes]) -> str:
    """One HTML file with every picture embedded (data: URIs): opens from disk, no server, no network."""
    def img(key):
        if key not in plots:
            return ""
        data = base64.b64encode(plots[key]).decode()
        return f'<img alt="{html.escape(key)}" src="data:image/png;base64,{data}">'

    e = html.escape
    rows = "".join(
        f"<tr><td>{e(g['name'])}</td><td>{g['units']}</td><td>{len(g['dead'])}</td><td>{len(g['frozen'])}</td>"
        f"<td>{g['could_go_under_1pct']}</td></tr>" for g in report["groups"])
    mats = "".join(
        f"<tr><td>{e(m['name'])}</td><td>{m['shape'][0]}×{m['shape'][1]}</td><td>{m['stable_rank']:.1f}</td>"
        f"<td>{m['effective_rank']:.1f}</td><td>{m['elbow_rank']}</td><td>{100 * m['elbow_energy']:.1f}%</td>"
        f"<td>{m['mp']['spikes']}</td><td>{m['frame_potential']:.1f}</td>"
        f"<td>{m['lowrank_at_elbow']['params_saved']:,}</td></tr>" for m in report["layers"])
    sections = []
    for g in report["groups"]:
        sections.append(f"<h3>units of {e(g['name'])}</h3>" + img("scores_" + g["name"] + ".png"))
    for m in report["layers"]:
        n = m["name"]
        pictures = [img(f"{kind}_{n}.png") for kind in ("spectrum", "esd", "weights", "fields")]
        sections.append(f"<h3>weights of {e(n)}</h3><div class=row>{pictures[0]}{pictures[1]}</div>"
                        f"{pictures[2]}{pictures[3]}")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>prunetool inspect: {e(str(report['source']))}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2rem; color: #222; max-width: 1300px; }}
table {{ border-collapse: collapse; margin: 1rem 0; }}
td, th {{ border: 1px solid #ccc; padding: 0.25rem 0.6rem; text-align: right; }}
td:first-child, th:first-child {{ text-align: left; }}
img {{ max-width: 100%; margin: 0.3rem; border: 1px solid #eee; }}
.row {{ display: flex; flex-wrap: wrap; }}
.row img {{ max-width: calc(50% - 1rem); }}
.note {{ color: #555; }}
</style></head><body>
<h1>Where is this model redundant?</h1>
<p class=note>{e(str(report['source']))}: {report['params']:,} parameters; {report['calib']} calibration samples
from {e(str(report['data']))}. Dead: replacing the unit by its mean changes the loss by under
{report['thresholds']['dead_nats']:g} nats per sample ({e(report['dead_by']).upper()}).
Frozen: mean |∂L/∂h| at most {report['thresholds']['frozen_relative']:g} of the layer's median.</p>
<h2>Units (prunable groups)</h2>
<table><tr><th>group</th><th>units</th><th>dead</th><th>frozen</th><th>could go (&lt;1% loss)</th></tr>{rows}</table>
<h2>Weight matrices</h2>
<table><tr><th>layer</th><th>shape</th><th>stable rank</th><th>effective rank</th><th>elbow</th>
<th>energy at elbow</th><th>MP spikes</th><th>frame potential</th><th>lowrank saves</th></tr>{mats}</table>
<h2>Pictures</h2>
{''.join(sections)}
</body></html>
"""
