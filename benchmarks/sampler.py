"""Episodes per second of the episodic sampler: Omniglot 20-way 5-shot 15-query, one core.

Compares, in the same run and on the same in-memory data:

* ``bilevel``      -- ``EpisodeSampler.sample`` (pure, vectorised indexing of a uint8 tensor);
* ``per-image``    -- the classic loop of the MetaOptNet / Gidaris & Komodakis loaders:
  ``random.sample`` per class, then one tensor conversion per image and ``torch.stack``;
* ``decode``       -- decoding every PNG of every episode from the zips (torchvision-style
  image-folder datasets), run on a few episodes only.

Uses the real reduced Omniglot sets in ``--data-root`` (default ``../shared/data``); falls back
to the built-in ``glyphs`` dataset (and skips ``decode``) when they are absent, and says so.

    PYTHONPATH=. python benchmarks/sampler.py [--data-root DIR] [--seconds 3]
"""
from __future__ import annotations

import argparse
import io
import os
import random
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np
import torch

from bilevel.data import EpisodeSampler, load_dataset

WAYS, SHOTS, QUERIES = 20, 5, 15


def rate(fn, episodes_per_call: int, seconds: float) -> float:
    """Episodes per second of ``fn`` over about ``seconds`` (after one warm-up call)."""
    fn(0)
    calls, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        fn(calls + 1)
        calls += 1
    return calls * episodes_per_call / (time.perf_counter() - t0)


def per_image_loop(ds):
    """MetaOptNet-style reference: label -> indices dict, random.sample, per-image tensors."""
    label2ind: dict[int, list[int]] = {}
    for i, lab in enumerate(ds.labels.tolist()):
        label2ind.setdefault(lab, []).append(i)
    arrays = [img for img in ds.images.numpy()]  # uint8 [1, 28, 28] each, in memory
    rng = random.Random(0)

    def sample(_it: int):
        classes = rng.sample(sorted(label2ind), WAYS)
        sup, qry = [], []
        for c in classes:
            ids = rng.sample(label2ind[c], SHOTS + QUERIES)
            sup += ids[:SHOTS]
            qry += ids[SHOTS:]
        sx = torch.stack([torch.from_numpy(arrays[i]).float().div(255) for i in sup])
        qx = torch.stack([torch.from_numpy(arrays[i]).float().div(255) for i in qry])
        return sx, qx

    return sample


def decode_per_episode(root: Path):
    """Decode the PNGs of each episode from the zips (no in-memory tensors)."""
    from PIL import Image

    zips = [zipfile.ZipFile(p) for p in sorted(root.glob("images_background_small*.zip"))]
    by_char: dict[str, list[tuple[zipfile.ZipFile, str]]] = {}
    for z in zips:
        for n in z.namelist():
            if n.endswith(".png"):
                by_char.setdefault("/".join(n.split("/")[1:3]), []).append((z, n))
    rng = random.Random(0)

    def load(z, n):
        with Image.open(io.BytesIO(z.read(n))) as im:
            arr = np.asarray(im.convert("L").resize((28, 28), Image.LANCZOS), dtype=np.uint8)
        return torch.from_numpy(255 - arr).float().div(255).unsqueeze(0)

    def sample(_it: int):
        chars = rng.sample(sorted(by_char), WAYS)
        xs = [load(*f) for c in chars for f in rng.sample(by_char[c], SHOTS + QUERIES)]
        return torch.stack(xs)

    return sample


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data-root", default=None,
                    help="default: $BILEVEL_DATA_ROOT, ../shared/data, /work/shared/data")
    ap.add_argument("--seconds", type=float, default=3.0, help="timing window per variant")
    args = ap.parse_args()
    torch.set_num_threads(1)

    candidates = [args.data_root, os.environ.get("BILEVEL_DATA_ROOT"),
                  Path(__file__).resolve().parents[2] / "shared" / "data", "/work/shared/data"]
    root = next((Path(c) for c in candidates if c and Path(c).is_dir()), Path("."))
    omni = root / "omniglot"
    real = (omni / "images_background_small1.zip").is_file()
    with tempfile.TemporaryDirectory() as cache:
        t0 = time.perf_counter()
        if real:
            ds = load_dataset("omniglot", omni, "train", rotations=True, cache_dir=cache)
        else:
            print(f"NOTE: no Omniglot zips in {omni}; benchmarking the built-in 'glyphs' dataset")
            ds = load_dataset("glyphs", split="train", classes={"train": 612})
        t_cold = time.perf_counter() - t0
        t0 = time.perf_counter()
        if real:
            load_dataset("omniglot", omni, "train", rotations=True, cache_dir=cache)
        t_warm = time.perf_counter() - t0
    print(f"dataset: {ds}")
    print(f"load: {t_cold:.2f} s decoding PNGs, {t_warm:.2f} s from the decode cache"
          if real else f"load: {t_cold:.2f} s generating glyphs")
    print(f"episodes: {WAYS}-way {SHOTS}-shot {QUERIES}-query, torch threads = 1\n")

    results = {}
    for b in (1, 8, 32):
        s = EpisodeSampler(ds, WAYS, SHOTS, QUERIES, meta_batch=b, seed=0)
        results[f"bilevel (meta_batch={b})"] = rate(s.sample, b, args.seconds)
    results["per-image loop (MetaOptNet style)"] = rate(per_image_loop(ds), 1, args.seconds)
    if real:
        results["decode PNGs per episode"] = rate(decode_per_episode(omni), 1, min(args.seconds, 2.0))
    ref = results["bilevel (meta_batch=1)"]
    width = max(map(len, results))
    for name, r in results.items():
        print(f"{name:<{width}}  {r:9.1f} episodes/s   (bilevel meta_batch=1 is {ref / r:6.2f}x this)")
    best = max(v for k, v in results.items() if k.startswith("bilevel"))
    print(f"\nbilevel sampler: {best:.0f} episodes/s (target >= 500): "
          f"{'OK' if best >= 500 else 'BELOW TARGET'}")


if __name__ == "__main__":
    main()
