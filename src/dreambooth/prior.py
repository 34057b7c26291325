"""Class images for prior preservation, generated once by the frozen model and reused.

The class folder holds PNGs and a `manifest.json`: which model, prompt and seed made the set, and
per image its seed, sampler, steps, guidance and content hash. A rerun reuses every recorded image
whose file is intact and generates only the missing ones (image i always has seed `seed + i` and
is sampled in the same batch, so a partial set completes to exactly the set a single run with that
batch size would have made, however the work is split between processes). A set made by another
model, prompt or seed is detected and never mixed in silently.

While generating, each process records its images in a part file of its own
(`manifest.part-*.json`); once every process is done, one of them folds the part files into the
manifest. A run killed midway leaves part files that the next run reads and completes.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from PIL import Image
from tqdm.auto import tqdm

from dreambooth.files import atomic_write_bytes, read_json, write_json
from dreambooth.generate import generate

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
PARTS = "manifest.part-*.json"
"""Records written while generating: one file per process and run, merged into the manifest at the end."""
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
AUTOCAST = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class ClassImageSpec:
    """What defines a class-image set: images made under the same spec are interchangeable."""

    model: str
    """`model_fingerprint` of the generating pipelines."""
    prompt: str
    prompt_tokenized: str
    """The prompt as the pipelines tokenize it (the family's `preprocess_prompt`: IF lower-cases)."""
    resolution: int
    sampler: str
    steps: int
    guidance: tuple[float, ...]
    """Classifier-free guidance of each stage of the cascade that made the images."""
    seed: int
    """Image i is sampled with seed `seed + i`."""
    precision: str = "fp32"
    """Autocast dtype of the sampling: 'fp32' (none), 'bf16' or 'fp16' (a GPU run's mixed precision)."""


def model_fingerprint(*pipelines) -> str:
    """An identity of what shapes the images of `pipelines` (a cascade, base first).

    It covers every component's config (architectures, the scheduler) and every tensor of every
    torch module among the components (denoiser, text encoders, VAE): its name, shape, dtype, and
    two sums of its bits read as integers, one of them position-weighted. The sums run on the
    tensor's own device and are exact, so the fingerprint does not depend on the device or the
    reduction order, and any changed weight (a merged LoRA, one text-encoder value) changes it.
    """
    digest = hashlib.blake2b(digest_size=12)
    hashed: dict[int, bytes] = {}  # a module shared by two stages (IF's T5) is read once
    for index, pipeline in enumerate(pipelines):
        for name, component in sorted(pipeline.components.items()):
            digest.update(f"{index}/{name}: {type(component).__name__}\n".encode())
            if (config := getattr(component, "config", None)) is not None:
                digest.update(_config_text(config))
            if isinstance(component, torch.nn.Module):
                if id(component) not in hashed:
                    hashed[id(component)] = _module_bytes(component)
                digest.update(hashed[id(component)])
    return digest.hexdigest()


def ensure_class_images(
    pipelines: list, class_dir: Path, spec: ClassImageSpec, count: int, *, batch_size: int
) -> list[Path]:
    """Make sure `class_dir` holds `count` class images of `pipelines` made under `spec`; return their paths.

    `pipelines` is the frozen model up to its last stage that trains: the base alone, or the
    base and the super-resolution stage (the images are then the whole cascade's outputs). Under
    several processes, call `generate_class_images` on each, then `record_class_images` on one.

    Raises:
        ValueError: if `class_dir` holds images made under another spec (model, prompt, seed, settings).
    """
    generate_class_images(pipelines, class_dir, spec, count, batch_size=batch_size)
    return record_class_images(class_dir, spec, count)


def generate_class_images(
    pipelines: list, class_dir: Path, spec: ClassImageSpec, count: int, *, batch_size: int, rank: int = 0,
    num_ranks: int = 1,
) -> None:
    """Generate process `rank`'s share of the images `class_dir` lacks.

    Image i is sampled in the batch of its block of indices `[b, b + batch_size)` (b a multiple of
    `batch_size`): batched sampling is not bit-exact per image, so a block with any image missing
    is sampled whole (its intact images are not rewritten), and the set comes out the same whether
    one process makes it or several, in one run or over several. Process `rank` makes the blocks
    `b / batch_size % num_ranks == rank`: its share depends on no other process's progress, and
    every process can run this at once, each writing only its own images and part file.

    Raises:
        ValueError: if `class_dir` holds images made under another spec (model, prompt, seed, settings).
    """
    assert 0 <= rank < num_ranks, (rank, num_ranks)
    class_dir.mkdir(parents=True, exist_ok=True)
    have = _intact_records(class_dir, spec)
    blocks = [range(b, min(b + batch_size, count)) for b in range(0, count, batch_size)]
    todo = [block for block in blocks if any(i not in have for i in block)]
    mine = [block for block in todo if block.start // batch_size % num_ranks == rank]
    if have and todo and rank == 0:
        missing = sum(i not in have for i in range(count))
        logger.info("reusing %d class images in %s; generating %d more", len(have), class_dir, missing)
    if not mine:
        return
    if num_ranks > 1:
        logger.info(
            "process %d of %d samples %d of the %d batches of class images", rank, num_ranks, len(mine),
            len(todo),
        )
    part = class_dir / PARTS.replace("*", f"{rank}-{uuid.uuid4().hex[:12]}")  # never another run's file
    made: list[dict] = []

    def save(images: dict[int, Image.Image]) -> None:
        encoded = {i: _png(image) for i, image in images.items()}
        made.extend(_record(i, data, spec) for i, data in encoded.items())
        # Recorded before written: a record whose file is missing is made again, an image without any record
        # would be refused.
        write_json(part, {"spec": _as_json(spec), "images": made})
        for i, data in encoded.items():
            atomic_write_bytes(class_dir / _file_name(i), data)

    started = time.monotonic()
    # PNG encoding and writing overlap the next batch's sampling, in order
    with ThreadPoolExecutor(max_workers=1) as writer:
        saved = []
        for block in tqdm(
            mine, desc="class images" + (f" (process {rank})" if num_ranks > 1 else ""), unit="batch"
        ):
            images = generate(
                pipelines, [spec.prompt] * len(block), [spec.seed + i for i in block], steps=spec.steps,
                guidance=list(spec.guidance), sampler=spec.sampler, batch_size=len(block),
                autocast_dtype=AUTOCAST[spec.precision],
            )
            saved.append(writer.submit(save, {i: image for i, image in zip(block, images) if i not in have}))
        for future in saved:
            future.result()  # re-raise a failed write here
    seconds = time.monotonic() - started
    logger.info(
        "generated %d class images in %.0f s (%.2f s each) into %s", len(made), seconds, seconds / len(made),
        class_dir,
    )


def record_class_images(class_dir: Path, spec: ClassImageSpec, count: int) -> list[Path]:
    """Fold the part files into `manifest.json` once every process's `generate_class_images` returned; return
    the paths.

    Call it on one process only; the others read the paths with `class_image_paths` afterwards.
    """
    have = _intact_records(class_dir, spec)
    parts = sorted(class_dir.glob(PARTS))
    if parts:
        write_json(class_dir / MANIFEST, {"spec": _as_json(spec), "images": [have[i] for i in sorted(have)]})
        for part in parts:  # only now that the manifest holds their records
            part.unlink()
    return _paths(class_dir, have, count)


def class_image_paths(class_dir: Path, spec: ClassImageSpec, count: int) -> list[Path]:
    """The paths of the `count` class images in `class_dir`, which must be complete (only reads)."""
    return _paths(class_dir, _intact_records(class_dir, spec), count)


def _paths(class_dir: Path, have: dict[int, dict], count: int) -> list[Path]:
    absent = [i for i in range(count) if i not in have]
    if absent:
        raise RuntimeError(
            f"class images {absent[:5]} of {count} are missing or damaged in {str(class_dir)!r} after "
            "generation"
        )
    return [class_dir / have[i]["file"] for i in range(count)]


def _intact_records(class_dir: Path, spec: ClassImageSpec) -> dict[int, dict]:
    """The records of the manifest and part files whose image file is intact, by index."""
    checked: dict[tuple[str, str], bool] = {}
    have = {}
    for record in _load_records(class_dir, spec):
        key = (record["file"], record["sha256"])
        if key not in checked:
            checked[key] = _intact(class_dir / record["file"], record["sha256"])
        if checked[key]:
            have[record["index"]] = record
    return have


def _load_records(class_dir: Path, spec: ClassImageSpec) -> list[dict]:
    # Images are listed before the record files: every image this tool writes has its record file already.
    images = [p.name for p in class_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES]
    sources = ([class_dir / MANIFEST] if (class_dir / MANIFEST).is_file() else []) + sorted(
        class_dir.glob(PARTS)
    )
    if not sources and images:
        raise ValueError(
            f"class_dir {str(class_dir)!r} holds {len(images)} images without a {MANIFEST} (e.g. "
            f"{images[0]}): "
            "they were not generated by this tool, so their model and prompt are unknown. "
            "Pass an empty or new --class-dir"
        )
    records = []
    for path in sources:
        stored = read_json(path)
        _check_spec(stored["spec"], spec, class_dir)
        records += stored["images"]
    return records


def _check_spec(stored: dict, spec: ClassImageSpec, class_dir: Path) -> None:
    current = _as_json(spec)
    if stored == current:
        return
    details = "; ".join(
        f"{k}: {repr(stored[k]) if k in stored else 'not recorded'} there, {v!r} now"
        for k, v in current.items() if stored.get(k) != v
    )
    unrecorded = [k for k in current if k not in stored]
    older = (
        f" An earlier version of this tool made them: it did not record {', '.join(unrecorded)} and "
        "fingerprinted the model differently, so they cannot be matched to this run."
    ) if unrecorded else ""
    raise ValueError(
        f"class images in {str(class_dir)!r} were made differently ({details}).{older} "
        "Use another --class-dir for this model/prompt/seed, or delete that folder to regenerate"
    )


def _as_json(spec: ClassImageSpec) -> dict:
    fields = asdict(spec)
    if spec.precision == "fp32":  # as manifests written before precision was recorded, which were all fp32
        del fields["precision"]
    return json.loads(json.dumps(fields))  # as JSON stores it (tuples as lists)


def _file_name(index: int) -> str:
    return f"{index:05d}.png"


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _record(index: int, data: bytes, spec: ClassImageSpec) -> dict:
    return {
        "index": index, "file": _file_name(index), "prompt": spec.prompt, "seed": spec.seed + index,
        "sampler": spec.sampler, "steps": spec.steps, "guidance": list(spec.guidance),
        "sha256": hashlib.sha256(data).hexdigest(),
    }


def _intact(path: Path, sha256: str) -> bool:
    return path.is_file() and hashlib.sha256(path.read_bytes()).hexdigest() == sha256


def _config_text(config) -> bytes:
    items = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    # Where it was loaded from, the library version that saved it and the load dtype do not change what it
    # computes (the tensors' dtypes are hashed with them).
    kept = {
        k: v for k, v in items.items()
        if not k.startswith("_") and k not in ("transformers_version", "torch_dtype", "dtype")
    }
    return json.dumps(kept, sort_keys=True, default=str).encode()


_CHUNK = 1 << 22  # words per reduction: each chunk's weighted sum stays below 2**52
_PERIOD = 32749  # the largest prime below 2**15: the position weights line up with no tensor dimension
_MODULUS = (1 << 31) - 1
_MIX = 65599  # chunk sums are mixed like a polynomial hash, so chunks weigh by their position too


@torch.no_grad()
def _module_bytes(module: torch.nn.Module) -> bytes:
    """Name, shape and dtype of each parameter and buffer, and the int64 sums of `_tensor_sums`."""
    described, sums = [], []
    for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
        for leaf in _storage_tensors(tensor):
            described.append(f"{name} {tuple(leaf.shape)} {leaf.dtype}")
            sums.append(_tensor_sums(leaf).cpu())
    return "\n".join(described).encode() + (torch.stack(sums).numpy().tobytes() if sums else b"")


def _storage_tensors(tensor: torch.Tensor) -> list[torch.Tensor]:
    """The plain tensors that hold `tensor`'s data: itself, or the inner tensors of a wrapper subclass
    (torchao's quantised weights)."""
    if hasattr(tensor, "__tensor_flatten__"):
        names, _ = tensor.__tensor_flatten__()
        return [leaf for n in names for leaf in _storage_tensors(getattr(tensor, n))]
    return [tensor.detach().as_subclass(torch.Tensor)]


def _tensor_sums(tensor: torch.Tensor) -> torch.Tensor:
    """[2] int64 on the tensor's device: the sum of its bits as 16-bit (or 8-bit) words, and the
    position-weighted sum.

    Integer sums are exact: any device and any reduction order give the same numbers.
    """
    words = tensor.reshape(-1).view(torch.uint8)
    if words.numel() % 2 == 0 and words.storage_offset() % 2 == 0:
        words = words.view(torch.int16)
    weights = torch.arange(min(_CHUNK, words.numel()), dtype=torch.int32, device=words.device) % _PERIOD + 1
    total = torch.zeros(2, dtype=torch.int64, device=words.device)
    for start in range(0, words.numel(), _CHUNK):
        chunk = words[start : start + _CHUNK]
        # |word| <= 2**15, weight < 2**15: fits int32
        weighted = chunk.to(torch.int32) * weights[: chunk.numel()]
        sums = torch.stack([chunk.sum(dtype=torch.int64), weighted.sum(dtype=torch.int64)])
        total = (total * _MIX + sums) % _MODULUS  # below 2**47 + 2**52: no overflow
    return total
