"""Report stage: the terminal report (Rich), the one-line summary and the JSON file."""

from __future__ import annotations

import json
import warnings

from rich.console import Console
from rich.table import Table

from .measure import NOISE


def _size(n: int | None) -> str:
    if n is None:
        return "–"
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _count(n: int | None) -> str:
    return "–" if n is None else f"{n:,}"


def _pct(v: float | None) -> str:
    return "–" if v is None else f"{v:.2f}%"


def _metric(name: str, v: float | None) -> str:
    """A value of the task's metric: accuracy, agreement, mean IoU and output error in percent, perplexity as a
    number."""
    if v is None:
        return "–"
    return f"{v:.2f}" if name == "perplexity" else f"{v:.2f}%"


NAMES = {"miou": "mean IoU"}  # how a metric's name is shown


def _metric_name(report: dict) -> str:
    return (report.get("metric") or {}).get("name") or report.get("before", {}).get("metric") or "accuracy"


def _loss(v: float | None) -> str:
    return "–" if v is None else f"{v:.4f}"


def _ratio(before, after) -> str:
    if before is None or after is None or not after:
        return ""
    return f"{before / after:.2f}×"


def speedup(report: dict, batch) -> dict | None:
    """The speed-up at ``batch`` that the summary line, the tables, the JSON report and the ``--min-speedup`` gate
    all show: the median of paired per-round ratios of :func:`prunetool.measure.compare_latency` (``p50``), with
    ``p10``, ``p90`` and ``noisy``; None where latency was not measured. Never a ratio of the two medians."""
    m = (report.get("latency") or {}).get(str(batch))
    return None if m is None else {**m["speedup"], "noisy": m["noisy"]}


def _speedup(s: dict) -> str:
    """``2.20× (2.10–2.30)``, marked ``noisy`` when the machine was too noisy to judge it."""
    return f"{s['p50']:.2f}× ({s['p10']:.2f}–{s['p90']:.2f})" + (" noisy" if s["noisy"] else "")


def plan_line(plan: dict) -> str:
    """The plan across axes (``--axes``): each cut tried (its number of whole blocks, and hidden size where the
    plan chose that too) with its divergence, and the one chosen."""
    def point(c: dict) -> str:
        where = f"{c['blocks']}" + (f" at hidden size {c['hidden_size']}" if "hidden_size" in c else "")
        if "divergence" not in c:  # out of reach: its reason is in the report
            return where
        latency = f", latency {c['latency']:.3f}" if "latency" in c else ""
        return f"{where} (divergence {c['divergence']:.4g}{latency})"

    def heads(c: dict) -> str:
        latency = f", latency {c['latency']:.3f}" if "latency" in c else ""
        return f"{c['heads']}" + (f" (divergence {c['divergence']:.4g}{latency})" if "divergence" in c else "")

    parts = []
    if plan["counts"]:
        chosen = plan["chosen"]
        parts.append(f"blocks tried {', '.join(point(c) for c in plan['counts'])}; [bold]{chosen}[/bold] removed"
                     + (f" ({', '.join(plan['order'][:chosen])})" if chosen else "")
                     + (f", hidden size [bold]{plan['hidden_size']}[/bold]" if "hidden_size" in plan else ""))
    if "heads" in plan:
        parts.append(f"heads per layer tried {', '.join(heads(c) for c in plan['heads'])}; "
                     f"[bold]{plan.get('heads_chosen', '–')}[/bold] removed")
    return f"plan across {'+'.join(plan['axes'])}: " + "; ".join(parts)


def layers_table(report: dict) -> Table:
    table = Table(title="units per layer", title_justify="left")
    table.add_column("layer")
    table.add_column("before", justify="right")
    table.add_column("after", justify="right")
    table.add_column("removed", justify="right")
    for layer in report["layers"]:
        b, a = layer["units_before"], layer["units_after"]
        table.add_row(layer["name"], str(b), str(a), f"{b - a} ({100 * (b - a) / b:.0f}%)")
    for p in report.get("protected", []):
        table.add_row(f"[dim]{p['name']}[/dim]", "", "", f"[dim]kept: {p['reason']}[/dim]")
    return table


def steps_table(report: dict) -> Table:
    table = Table(title="steps", title_justify="left")
    name = _metric_name(report)
    for col in ("step", "ratio", "parameters", f"{name} after cut", "after fine-tuning", "fine-tuning loss"):
        table.add_column(col, justify="right")
    for i, st in enumerate(report["steps"], 1):
        losses = st.get("finetune_loss") or []
        table.add_row(str(i), str(st.get("ratio", "")), f"{st['params']:,}" if "params" in st else "",
                      _metric(name, st.get(f"{name}_after_cut")), _metric(name, st.get(f"{name}_after_finetune")),
                      " → ".join(f"{v:.3f}" for v in losses))
    return table


def metrics_table(report: dict) -> Table:
    b, a = report["before"], report["after"]
    table = Table(title="model", title_justify="left")
    table.add_column("")
    table.add_column("before", justify="right")
    table.add_column("after", justify="right")
    table.add_column("ratio", justify="right")
    table.add_row("parameters", _count(b["params"]), _count(a["params"]), _ratio(b["params"], a["params"]))
    table.add_row("MACs / sample", _count(b["macs"]), _count(a["macs"]), _ratio(b["macs"], a["macs"]))
    table.add_row("file size", _size(b["file_bytes"]), _size(a["file_bytes"]), _ratio(b["file_bytes"], a["file_bytes"]))
    if _metric_name(report) == "perplexity":
        table.add_row("perplexity", _metric("perplexity", b.get("perplexity")),
                      _metric("perplexity", a.get("perplexity")), "")
        table.add_row("next-token accuracy", _pct(b["accuracy"]), _pct(a["accuracy"]), "")
    elif _metric_name(report) == "miou" and "fidelity" not in report:
        table.add_row("mean IoU", _metric("miou", b.get("miou")), _metric("miou", a.get("miou")), "")
        table.add_row("pixel accuracy", _pct(b["accuracy"]), _pct(a["accuracy"]), "")
    elif "fidelity" in report:
        m = report["metric"]
        table.add_row(f"{NAMES.get(m['name'], m['name'])} with the dense model", _metric(m["name"], m["before"]),
                      _metric(m["name"], m["after"]), "")
    else:
        table.add_row("accuracy", _pct(b["accuracy"]), _pct(a["accuracy"]), "")
    table.add_row("loss", _loss(b["loss"]), _loss(a["loss"]), "")
    for bs, m in report.get("latency", {}).items():
        before, after = m["before"], m["after"]
        table.add_row(f"latency, batch {bs}", f"{before['median_ms']:.3f} ms ({before['p10_ms']:.2f}–{before['p90_ms']:.2f})",
                      f"{after['median_ms']:.3f} ms ({after['p10_ms']:.2f}–{after['p90_ms']:.2f})",
                      _speedup(speedup(report, bs)))
    return table


def summary_line(report: dict) -> str:
    """``shrink: 20522 → 4019 params (5.1×), 0.9 → 0.4 ms at batch 1 (2.2×), 98.9% → 98.6% (−0.3 pp)``; the
    speed-up is :func:`speedup`'s p50 (marked ``noisy`` when it could not be judged)."""
    b, a = report["before"], report["after"]
    parts = [f"{b['params']} → {a['params']} params ({_ratio(b['params'], a['params'])})"]
    bs = next(iter(b["latency_ms"]), None)
    if bs is not None:
        lb, la, s = b["latency_ms"][bs], a["latency_ms"][bs], speedup(report, bs)
        ratio = "" if s is None else f" ({s['p50']:.2f}×" + (", noisy)" if s["noisy"] else ")")
        parts.append(f"{lb:.2f} → {la:.2f} ms at batch {bs}{ratio}")
    m = report.get("metric") or {}
    if m.get("before") is not None:
        name = m["name"]
        drop = m["drop"] if name == "perplexity" else -m["drop"]  # the sign of the change, as seen
        label = "" if name == "accuracy" else f"{NAMES.get(name, name)} "
        parts.append(f"{label}{_metric(name, m['before'])} → {_metric(name, m['after'])} ({drop:+.2f} {m['unit']})")
    return f"{report['command']}: " + ", ".join(parts)


def factored_table(report: dict) -> Table:
    table = Table(title="factored layers", title_justify="left")
    for col, justify in (("layer", "left"), ("shape", "right"), ("elbow", "right"), ("rank", "right"),
                         ("decided by", "left"), ("output error", "right"), ("params before → after", "right")):
        table.add_column(col, justify=justify)
    for e in report["layers"]:
        shape = "×".join(str(d) for d in e["shape"])
        if e["rank"] is None:
            table.add_row(f"[dim]{e['name']}[/dim]", shape, str(e["elbow"]), "", e.get("rule") or "", "",
                          f"[dim]kept: {e['skipped']}[/dim]")
        else:
            table.add_row(e["name"], shape, str(e["elbow"]), str(e["rank"]), e.get("rule") or "",
                          f"{100 * e['relative_output_error']:.1f}%", f"{e['params_before']:,} → {e['params_after']:,}")
    return table


def render(report: dict, console: Console) -> None:
    s = report["settings"]
    if report["command"] == "sparsify":
        console.print(f"[bold]prunetool sparsify[/bold]  {s['rounds']} rounds of {100 * s['imp']:.0f}% magnitude "
                      f"pruning, {s['finetune_epochs']} epoch(s) of retraining each"
                      + (", rewinding" if s["rewind"] else ""))
        sp = Table(title="weights per layer", title_justify="left")
        for col in ("layer", "weights", "nonzero", "sparsity"):
            sp.add_column(col, justify="left" if col == "layer" else "right")
        for row in report["sparsity"]:
            sp.add_row(row["name"], f"{row['weights']:,}", f"{row['nonzero']:,}", f"{100 * row['sparsity']:.1f}%")
        console.print(sp)
        console.print(layers_table(report))
    elif report["command"] == "compress":
        target = next((f"{k.removeprefix('target_')} {v}" for k, v in s.items() if k.startswith("target_") and v),
                      "")
        console.print(f"[bold]prunetool compress[/bold]  target {target}, plan [cyan]{s['plan']}[/cyan] chosen on "
                      f"{s['calib']} calibration samples from {s['data']}")
        plans = Table(title="plans (calibration samples)", title_justify="left")
        name = _metric_name(report)
        for col in ("plan", "size kept", name, "drop", ""):
            plans.add_column(col, justify="left" if col in ("plan", "") else "right")
        for p in s["plans"]:
            if "error" in p:
                plans.add_row(p["plan"], "", "", "", f"[dim]{p['error']}[/dim]")
                continue
            frac = next(v for k, v in p.items() if k.endswith("_fraction"))
            plans.add_row(p["plan"], f"{frac:.3f}", _metric(name, p.get(f"calibration_{name}")),
                          f"{p['calibration_drop']:.2f}", "chosen" if p["plan"] == s["plan"] else
                          ("" if p["reached"] else "above the target"))
        console.print(plans)
        for step in report.get("steps", []):
            console.print(f"step {step['command']}: {step['params']:,} parameters, {step['macs']:,} MACs")
    elif report["command"] == "lowrank":
        budget = ", ".join(f"{k.removeprefix('target_').replace('_', '-')} {v}" for k, v in s.items()
                           if k in ("target_params", "target_macs") and v is not None)
        how = {"rank": f"rank [cyan]{s['rank']}[/cyan]", "energy": f"energy [cyan]{s['energy']}[/cyan]",
               "elbow": "rank at the plain [cyan]elbow[/cyan]",
               "auto": f"the elbow, each layer's output error capped at [cyan]{100 * s['max_layer_error']:g}%[/cyan]",
               "budget": f"ranks allocated across layers ([cyan]{s['search']}[/cyan]"
                         + (f", {budget}" if budget else "") + ")"}[s["method"]]
        extra = (", data-aware" if s["data_aware"] else "") + (
            f", drop budget {s['max_drop']}" if s["max_drop"] is not None else "") + (
            f", {s['search_evaluations']} full evaluations" if s["method"] == "budget" else "")
        console.print(f"[bold]prunetool lowrank[/bold]  {how}{extra}, {s['calib']} calibration samples from {s['data']}")
        console.print(factored_table(report))
    else:
        console.print(f"[bold]prunetool {report['command']}[/bold]  criterion [cyan]{s['criterion']}[/cyan], "
                      f"ratio [cyan]{s['ratio']}[/cyan] ({s['scope']}), compensation [cyan]{s['compensation']}[/cyan], "
                      f"{s['calib']} calibration samples from {s['data']}")
        console.print(layers_table(report))
        for r in report.get("rounded", []):
            console.print(f"rounded for a Hugging Face directory: {r['text']}")
        if report.get("plan"):
            console.print(plan_line(report["plan"]))
    if report.get("steps") and report["command"] != "compress":
        console.print(steps_table(report))
    if "before" in report:
        console.print(metrics_table(report))
        m = report.get("metric") or {}
        f = report.get("fidelity")
        if f is not None:
            extra = ", ".join(part for part in (
                f"{'pixel' if f['metric'] == 'miou' else 'top-1'} agreement {f['agreement']:.2f}%"
                if "agreement" in f and f["metric"] != "agreement" else "",
                f"cosine {f['cosine']:.4f}" if f.get("cosine") is not None else "",
                f"output error {f['output_error']:.2f}%" if f.get("output_error") is not None and
                f["metric"] != "output error" else "") if part)
            value = _metric(f["metric"], f["value"])
            console.print(f"no labelled test data: against the dense model on {f['samples']} calibration inputs, "
                          f"{NAMES.get(f['metric'], f['metric'])} [bold]{value}[/bold]"
                          + (f" ({extra})" if extra else ""))
        elif m.get("drop") is not None:
            unit = "percentage points" if m["unit"] == "pp" else "% (relative increase)"
            console.print(f"{NAMES.get(m['name'], m['name'])} drop: [bold]{m['drop']:.2f}[/bold] {unit}")
        else:
            console.print("accuracy: not measured (no --data)")
    v = report.get("verify", {})
    if v and "removal_rel_diff" in v:
        const = v.get("constant_unit_rel_diff")
        console.print(f"verified: forward and output shape ok, ratio 0 exact, removal = zeroing "
                      f"({v['removal_rel_diff']:.1e})"
                      + (f", constant unit removed exactly ({const:.1e})" if const is not None else "")
                      + (", reload identical" if v.get("reload") else ""))
    for kind in ("onnx", "pt2"):
        if kind in report:
            o = report[kind]
            how = f" ({o['exporter']} exporter, opset {o['opset']})" if kind == "onnx" else ""
            console.print(f"{kind}: {o['path']}{how}, max |exported − PyTorch| {o['max_abs_diff']:.2g} "
                          f"(tolerance {o['tolerance']:.2g})")
    dtype = s.get("dtype")
    if dtype and dtype["file"] != dtype["computed"]:
        console.print(f"dtype: written as {dtype['file']}, computed in {dtype['computed']}")
    mem = report.get("memory") or {}
    if mem.get("peak_bytes"):
        estimate = f" (estimated {mem['estimate_bytes'] / 2 ** 30:.1f} GiB before loading)" \
            if mem.get("estimate_bytes") else ""
        console.print(f"memory: peak {mem['peak_bytes'] / 2 ** 30:.1f} GiB resident{estimate}")
    for note in report.get("notes", []):
        console.print(f"note: {note}")
    if report.get("config"):
        console.print(f"config: options from {report['config']}")


def render_plan(report: dict, console: Console) -> None:
    """The dry run: groups, protected layers with reasons, and the size each ratio would give."""
    s = report["settings"]
    console.print(f"[bold]prunetool shrink --dry-run[/bold]  {report['params']:,} parameters, "
                  f"{report['macs']:,} MACs at input {tuple(report['input_shape'])}, scope {s['scope']}")
    table = Table(title=f"{len(report['groups'])} prunable groups (units removed together)", title_justify="left")
    for col in ("group", "units", "producers", "consumers", "also sliced"):
        table.add_column(col)
    for g in report["groups"]:
        table.add_row(g["name"], str(g["units"]) + (f" in {g['blocks']} blocks" if g["blocks"] > 1 else ""),
                      _names(g["producers"]), _names(g["consumers"]), _names(g["members"]))
    console.print(table)
    if report["protected"]:
        kept = Table(title=f"{len(report['protected'])} protected (kept whole)", title_justify="left")
        kept.add_column("producer(s)")
        kept.add_column("why")
        for p in report["protected"]:
            kept.add_row(p["name"], p["reason"])
        console.print(kept)
    sizes = Table(title="what each ratio would give", title_justify="left")
    for col in ("ratio", "parameters", "of original", "MACs", "of original"):
        sizes.add_column(col, justify="right")
    for r in report["ratios"]:
        sizes.add_row(f"{r['ratio']:.1f}", f"{r['params']:,}", f"{r['params_fraction']:.2f}", f"{r['macs']:,}",
                      f"{r['macs_fraction']:.2f}")
    console.print(sizes)


def _names(names: list[str], limit: int = 3) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" (+{len(names) - limit})" if len(names) > limit else "")


def json_bytes(report: dict) -> bytes:
    return (json.dumps(report, indent=2) + "\n").encode()


def budget_failures(report: dict, budgets) -> list[str]:
    """One line per missed budget (``budgets`` is an :class:`prunetool.options.Budgets`, and a ``--target-latency``
    whose result ran slower than it beyond the noise); empty when all hold. A speed-up measured too noisily to judge
    is not a miss: :func:`too_noisy` says so."""
    lines = []
    b, a = report.get("before", {}), report.get("after", {})
    if budgets.max_drop is not None:
        m = report.get("metric") or {}
        drop, unit = m.get("drop"), m.get("unit", "pp")
        if drop is not None and drop > budgets.max_drop:
            hint = ("; --recover 60 (label-free distillation towards the original) may win some of it back"
                    if report.get("command") in ("shrink", "lowrank") and not report.get("settings", {}).get("recover")
                    else "")
            lines.append(f"{NAMES.get(m['name'], m['name'])} drop {drop:.2f} {unit} is above --max-drop "
                         f"{budgets.max_drop:g} {unit} by "
                         f"{drop - budgets.max_drop:.2f}{hint}")
    if budgets.min_speedup is not None:
        s = speedup(report, budgets.speedup_batch)
        if not s["noisy"] and s["p50"] < budgets.min_speedup:
            lines.append(f"speed-up {s['p50']:.2f}× (p10 {s['p10']:.2f}×, p90 {s['p90']:.2f}×) at batch "
                         f"{budgets.speedup_batch} is below --min-speedup {budgets.min_speedup:g}×")
    if (report.get("latency_target") or {}).get("missed"):  # a latency target is a budget the run set itself
        lines.append(report["latency_target"]["missed"])
    if budgets.max_params is not None:
        limit = budgets.max_params * b["params"] if budgets.max_params <= 1 else budgets.max_params
        if a["params"] > limit:
            lines.append(f"{a['params']:,} parameters are above --max-params {budgets.max_params:g} "
                         f"({int(limit):,}) by {a['params'] - int(limit):,}")
    return lines


def too_noisy(report: dict, budgets) -> str | None:
    """The line saying a speed-up gate could not be judged: the measurement stayed too noisy."""
    if budgets.min_speedup is None:
        return None
    m, s = report["latency"][str(budgets.speedup_batch)], speedup(report, budgets.speedup_batch)
    if not s["noisy"]:
        return None
    return (f"the machine was too noisy to judge --min-speedup {budgets.min_speedup:g}× at batch "
            f"{budgets.speedup_batch}: the speed-up ranged {s['p10']:.2f}×–{s['p90']:.2f}× over {m['rounds']} rounds "
            f"in each of {m['attempts']} measurements (judged within ±{100 * NOISE:.0f}% of the median); run it on an "
            "idle machine, or pin threads with OMP_NUM_THREADS")


def summary_markdown(report: dict, failures: list[str]) -> str:
    """A Markdown table fit for a CI job summary."""
    b, a = report["before"], report["after"]
    name = _metric_name(report)
    rows = [("parameters", f"{b['params']:,}", f"{a['params']:,}", _ratio(b["params"], a["params"])),
            ("MACs / sample", f"{b['macs']:,}", f"{a['macs']:,}", _ratio(b["macs"], a["macs"])),
            ("file size", _size(b["file_bytes"]), _size(a["file_bytes"]), _ratio(b["file_bytes"], a["file_bytes"])),
            (name, _metric(name, b.get(name)), _metric(name, a.get(name)), "")]
    rows += [(f"latency, batch {k}", f"{m['before']['median_ms']:.3f} ms", f"{m['after']['median_ms']:.3f} ms",
              _speedup(speedup(report, k))) for k, m in report.get("latency", {}).items()]
    lines = [f"### prunetool {report['command']}", "", f"`{summary_line(report)}`", "",
             "| | before | after | ratio |", "|---|--:|--:|--:|"]
    lines += [f"| {r[0]} | {r[1]} | {r[2]} | {r[3]} |" for r in rows]
    if "onnx" in report:
        o = report["onnx"]
        lines += ["", f"ONNX: `{o['path']}` (opset {o['opset']}), max |onnxruntime − PyTorch| = {o['max_abs_diff']:.2g}"]
    lines += ["", "**Budgets: all met.**" if not failures else "**Budgets missed:**"]
    lines += [f"- {f}" for f in failures]
    return "\n".join(lines) + "\n"


def bench_noise(report: dict) -> str | None:
    """The one line saying which of bench's speed-ups the machine was too noisy to judge; None when all were judged."""
    noisy = []
    for r in report["results"]:
        for b, st in r["batches"].items():
            if st["noisy"]:
                s = st["speedup"]
                noisy.append(f"{r['checkpoint']} ({r['runtime']}, batch {b}: {s['p10']:.2f}×–{s['p90']:.2f}×)")
    if not noisy:
        return None
    return (f"the machine was too noisy to judge the speed-up of {'; '.join(noisy)} over {report['rounds']} rounds "
            f"(judged within ±{100 * NOISE:.0f}% of the median); run it on an idle machine, or pin threads with "
            "OMP_NUM_THREADS")


def render_bench(report: dict, console: Console) -> None:
    """The table of bench's checkpoints; speed-ups the machine was too noisy to judge are marked ``noisy``, and one
    warning (:func:`bench_noise`) names them."""
    table = Table(title=f"latency ({report['threads']} threads); speed-up is against the first checkpoint (median "
                        "of paired rounds, p10–p90)", title_justify="left")
    for col in ("checkpoint", "runtime", "params", "batch", "median", "p90", "throughput", "speed-up", "peak fwd"):
        table.add_column(col, justify="left" if col in ("checkpoint", "runtime") else "right")
    for r in report["results"]:
        for b, st in r["batches"].items():
            peak = r.get("peak_forward_mb")
            table.add_row(r["checkpoint"], r["runtime"] + ("" if r["runtime"] != "torch" else f" ({r['device']})"),
                          f"{r['params']:,}", b, f"{st['median_ms']:.3f} ms", f"{st['p90_ms']:.3f} ms",
                          f"{st['throughput']:,.0f}/s", _speedup({**st["speedup"], "noisy": st["noisy"]}),
                          "" if peak is None else f"{peak:.1f} MB")
    console.print(table)
    line = bench_noise(report)
    if line:
        warnings.warn(line)


def render_inspect(report: dict, console: Console) -> None:
    console.print(f"[bold]prunetool inspect[/bold]  {report['source']}: {report['params']:,} parameters, "
                  f"{report['calib']} calibration samples from {report['data']}")
    units = Table(title=f"units (dead by {report['dead_by'].upper()} < {report['thresholds']['dead_nats']:g} nats/sample)",
                  title_justify="left")
    for col in ("group", "units", "dead", "frozen", "could go (<1% loss)"):
        units.add_column(col, justify="left" if col == "group" else "right")
    for g in report["groups"]:
        units.add_row(g["name"], str(g["units"]), str(len(g["dead"])), str(len(g["frozen"])),
                      str(g["could_go_under_1pct"]))
    console.print(units)
    mats = Table(title="weight matrices", title_justify="left")
    for col in ("layer", "shape", "stable rank", "effective rank", "elbow", "energy", "MP spikes", "frame pot.",
                "lowrank saves"):
        mats.add_column(col, justify="left" if col == "layer" else "right")
    for m in report["layers"]:
        mats.add_row(m["name"], f"{m['shape'][0]}×{m['shape'][1]}", f"{m['stable_rank']:.1f}",
                     f"{m['effective_rank']:.1f}", str(m["elbow_rank"]), f"{100 * m['elbow_energy']:.0f}%",
                     str(m["mp"]["spikes"]), f"{m['frame_potential']:.1f}",
                     f"{m['lowrank_at_elbow']['params_saved']:,}")
    console.print(mats)
    if report.get("html"):
        console.print(f"wrote {report['html']}")
    if report.get("plots"):
        console.print(f"wrote {len(report['plots'])} pictures")
