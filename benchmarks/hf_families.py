"""Hugging Face families: each one cut through the CLI and written as a directory ``from_pretrained`` reads.

    python -m benchmarks.hf_families --out docs/COVERAGE.md

For every family: a small config (2 layers, width 64, 8 query heads with 4 key/value heads where the family groups
them; random weights, seed 0) saved with ``save_pretrained``, then, as a user runs it,
``prunetool shrink DIR --tokens 32 --calib 32 --ratio R --out OUT --json OUT.json`` at R = 0.25 and 0.5 (the
default: head and MLP counts rounded to what the family's config holds). A fresh process in another folder then
loads OUT with ``AutoModel*.from_pretrained`` (no prunetool) and compares its outputs on fixed token ids with the
ones the CLI's run recorded from the cut model in memory (``prunetool.load`` of the same directory in this process
must agree too). The row reports what the run wrote, the parameters of the model read back, the heads and MLP units
kept per layer, and the rounding the report states.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from .common import commit, machine, publish, table_args, today

VOCAB = 128
RATIOS = (0.25, 0.5)
GQA = {"num_attention_heads": 8, "num_key_value_heads": 4}
LM = {"vocab_size": VOCAB, "hidden_size": 64, "num_hidden_layers": 2, "intermediate_size": 128,
      "max_position_embeddings": 128}
ENCODER = {"vocab_size": VOCAB, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 8,
           "intermediate_size": 128, "max_position_embeddings": 128, "num_labels": 3}

# family → (config class, model class, config arguments)
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {**LM, **GQA}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {**LM, **GQA}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {**LM, **GQA, "head_dim": 8}),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", {**LM, **GQA, "head_dim": 8, "sliding_window": 16}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {**LM, **GQA, "pad_token_id": 0}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {**LM, **GQA}),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", {**LM, **GQA}),
    "granite": ("GraniteConfig", "GraniteForCausalLM", {**LM, **GQA}),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", {**LM, "num_attention_heads": 8}),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", {"vocab_size": VOCAB, "n_embd": 64, "n_layer": 2, "n_head": 8,
                                                "n_positions": 128}),
    "opt": ("OPTConfig", "OPTForCausalLM", {"vocab_size": VOCAB, "hidden_size": 64, "num_hidden_layers": 2,
                                            "ffn_dim": 128, "num_attention_heads": 8, "word_embed_proj_dim": 64,
                                            "max_position_embeddings": 128}),
    "bert": ("BertConfig", "BertForSequenceClassification", ENCODER),
    "roberta": ("RobertaConfig", "RobertaForSequenceClassification", {**ENCODER, "pad_token_id": 1}),
    "distilbert": ("DistilBertConfig", "DistilBertForSequenceClassification",
                   {"vocab_size": VOCAB, "dim": 64, "n_layers": 2, "n_heads": 8, "hidden_dim": 128,
                    "max_position_embeddings": 128, "num_labels": 3}),
    "modernbert": ("ModernBertConfig", "ModernBertForSequenceClassification",
                   {**ENCODER, "pad_token_id": 0, "global_attn_every_n_layers": 1}),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", {**LM, **GQA, "num_local_experts": 4,
                                                          "num_experts_per_tok": 2}),
    "mixtral --drop-experts 0.5": ("MixtralConfig", "MixtralForCausalLM", {**LM, **GQA, "num_local_experts": 4,
                                                                           "num_experts_per_tok": 2}),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", {**LM, **GQA, "num_experts": 4, "num_experts_per_tok": 2,
                                                             "moe_intermediate_size": 64,
                                                             "shared_expert_intermediate_size": 128}),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", {**LM, **GQA, "head_dim": 8, "num_experts": 4,
                                                             "num_experts_per_tok": 2, "moe_intermediate_size": 64}),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM", {**LM, **GQA, "num_experts": 4, "num_experts_per_tok": 2}),
    "gpt_oss": ("GptOssConfig", "GptOssForCausalLM", {**LM, **GQA, "head_dim": 8, "num_local_experts": 4,
                                                       "num_experts_per_tok": 2, "layer_types": ["full_attention"] * 2}),
    "t5": ("T5Config", "T5ForConditionalGeneration", {"vocab_size": VOCAB, "d_model": 64, "d_kv": 8, "d_ff": 128,
                                                       "num_layers": 2, "num_heads": 8, "decoder_start_token_id": 0}),
    "bart": ("BartConfig", "BartForConditionalGeneration",
             {"vocab_size": VOCAB, "d_model": 64, "encoder_layers": 2, "decoder_layers": 2,
              "encoder_attention_heads": 8, "decoder_attention_heads": 8, "encoder_ffn_dim": 128,
              "decoder_ffn_dim": 128, "max_position_embeddings": 128}),
}

FRESH = """
import json, sys, torch, transformers
d, ids = sys.argv[1], torch.load(sys.argv[2])
cls = getattr(transformers, json.load(open(d + '/config.json'))['architectures'][0])
m = cls.from_pretrained(d).eval()
kw = {'decoder_input_ids': ids} if m.config.is_encoder_decoder else {}
with torch.no_grad():
    out = m(input_ids=ids, **kw)
torch.save(out.logits, sys.argv[3])
print(sum(p.numel() for p in m.parameters()))
"""


def make(family: str, path: Path) -> None:
    import transformers

    config_cls, model_cls, kwargs = FAMILIES[family]  # (a variant with flags builds its base family's model)
    torch.manual_seed(0)
    config = getattr(transformers, config_cls)(**kwargs)
    getattr(transformers, model_cls)(config).eval().save_pretrained(path)


def one(family: str, ratio: float, work: Path, timeout: int) -> dict:
    stem = family.split()[0]
    flags = family.split()[1:]  # a family may name extra flags after its name
    src, out = work / stem, work / f"{family.replace(' ', '_')}-{ratio}"
    if not src.exists():
        make(family, src)  # the config of the name's first word's entry
    row: dict = {"family": family, "ratio": ratio, "commit": commit()}
    report_path = work / f"{family.replace(' ', '_')}-{ratio}.json"
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-W", "ignore", "-m", "prunetool", "shrink", str(src), "--tokens", "32",
                           "--calib", "32", "--ratio", str(ratio), "--no-latency", "--out", str(out), "--json",
                           str(report_path), "-q", "--no-progress", *flags], capture_output=True, text=True,
                          timeout=timeout,
                          cwd=work)
    row["seconds"] = round(time.perf_counter() - start, 1)
    row["exit"] = proc.returncode
    if proc.returncode != 0:
        row["error"] = (proc.stderr.strip().splitlines() or ["?"])[-1][:300]
        return row
    report = json.loads(report_path.read_text())
    row["written"] = report["settings"]["out_format"]
    row["params_before"], row["params_after"] = report["before"]["params"], report["after"]["params"]
    row["kept"] = {layer["name"]: f"{layer['units_after']}/{layer['units_before']}" for layer in report["layers"]}
    row["rounded"] = [r["text"] for r in report.get("rounded", [])]
    row["notes"] = report.get("notes", [])
    row["protected"] = len(report.get("protected", []))
    row["verify"] = report["verify"].get("reload_from_pretrained") or report["verify"].get("reload")
    if row["written"] != "huggingface":
        return row
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(1))
    with tempfile.TemporaryDirectory() as elsewhere:
        torch.save(ids, Path(elsewhere) / "ids.pt")
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        fresh = subprocess.run([sys.executable, "-W", "ignore", "-c", FRESH, str(out), "ids.pt", "y.pt"],
                               cwd=elsewhere, env=env, capture_output=True, text=True, timeout=timeout)
        if fresh.returncode != 0:
            row["fresh"] = (fresh.stderr.strip().splitlines() or ["?"])[-1][:300]
            return row
        row["fresh_params"] = int(fresh.stdout.split()[-1])
        import prunetool

        model = prunetool.load(str(out)).model.eval()
        kw = {"decoder_input_ids": ids} if model.config.is_encoder_decoder else {}
        with torch.no_grad():
            want = model(input_ids=ids, **kw).logits
        row["fresh"] = "identical" if torch.equal(torch.load(Path(elsewhere) / "y.pt"), want) else \
            f"differs by {(torch.load(Path(elsewhere) / 'y.pt') - want).abs().max().item():.2g}"
    return row


def _kept(row: dict) -> str:
    kept = row.get("kept", {})
    moe = sorted({v for k, v in kept.items() if k.endswith(".experts")})
    inside = sorted({v for k, v in kept.items() if k.endswith(".experts.units")})
    heads = sorted({v for k, v in kept.items()
                    if any(w in k.lower() for w in ("attn", "attention", "q_proj", "query"))})
    mlps = sorted({v for k, v in kept.items() if v not in heads and not k.endswith((".experts", ".experts.units"))})
    return f"heads {', '.join(heads) or '–'}; MLP {', '.join(mlps) or '–'}" + \
        (f"; experts {', '.join(moe)}" if moe else "") + \
        (f"; expert MLP units (all experts) {', '.join(inside)}" if inside else "")


def markdown(rows: list[dict], seconds: float) -> str:
    lines = [
        "## Hugging Face families: written as directories `from_pretrained` reads",
        "",
        f"Command: `python -m benchmarks.hf_families --out docs/COVERAGE.md` · {machine()} · {today()} · "
        f"commit {rows[0]['commit'] if rows else '?'} · {seconds / 60:.1f} min.",
        "",
        "Each family: a small config (2 layers, width 64, 8 query heads, 4 key/value heads where the family groups "
        "them, random weights), saved with `save_pretrained`, then `prunetool shrink DIR --tokens 32 --calib 32 "
        "--ratio R --out OUT` with the defaults: head and MLP counts rounded to ones the family's config holds (the "
        "same in every layer; the remaining heads dividing the width where the config asks it), stated in the "
        "report. *Read back*: a fresh process in another folder loads OUT with `from_pretrained` (transformers only) "
        "and its logits on fixed ids equal the cut model's bit for bit. *Params* are the read-back model's. "
        "*Kept*: units kept per layer (heads: key/value groups where the family groups them).",
        "",
        "| family | ratio | written | read back | params before → after | kept | rounding / reason |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r.get("exit"):
            lines.append(f"| {r['family']} | {r['ratio']} | refused (exit {r['exit']}) | | | | {r.get('error', '')} |")
            continue
        why = "; ".join(r.get("rounded", []) + [n for n in r.get("notes", []) if "own file" in n])
        params = f"{r['params_before']:,} → {r['params_after']:,}"
        written = "directory" if r["written"] == "huggingface" else "prunetool's own file"
        lines.append(f"| {r['family']} | {r['ratio']} | {written} | {r.get('fresh', '–')} | {params} | {_kept(r)} | "
                     f"{why.replace('|', '/')} |")
    return "\n".join(lines)


def main() -> None:
    args = table_args(__doc__, "families", 600)
    start = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for family in args.only or FAMILIES:
            for ratio in RATIOS:
                try:
                    row = one(family, ratio, Path(d), args.timeout)
                except Exception as e:  # one family's failure (a timeout, a build) is a row, not the end of the table
                    row = {"family": family, "ratio": ratio, "commit": commit(), "exit": -1,
                           "error": f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"}
                rows.append(row)
                print(json.dumps({k: v for k, v in row.items() if k != "kept"}), flush=True)
    publish(args.out, "hf-families", markdown(rows, time.perf_counter() - start))


if __name__ == "__main__":
    main()
