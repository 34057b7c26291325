"""Our `dreambooth train` against diffusers' DreamBooth examples, on a tiny offline workload, timed by one
harness: SD 1.x full UNet fine-tuning (`--workload sd-full`, the default) or SDXL LoRA (`sdxl-lora`).

Run: python bench/vs_diffusers.py --diffusers-script
/path/to/diffusers/examples/dreambooth/train_dreambooth.py
     python bench/vs_diffusers.py --workload sdxl-lora --diffusers-script
/path/to/diffusers/examples/dreambooth/train_dreambooth_lora_sdxl.py
     (about 3 minutes each on 2 CPU cores, the first time 20 s more to build the cache; `--steps 20
     --repeats 1` for a quick look; `--json runs.json` keeps every run and figure)

The scripts come from a diffusers source checkout (they must suit the installed diffusers, whose
version they check on start):
    git clone https://github.com/huggingface/diffusers
    -> diffusers/examples/dreambooth/train_dreambooth.py, train_dreambooth_lora_sdxl.py

How it is measured. Every run is a fresh Python process that the harness starts itself,
`python -m dreambooth.cli train ...` or `python train_dreambooth.py ...` (no `accelerate launch`), so
the process timed is the training process: wall time around it, peak RSS its `ru_maxrss` from
wait4. Nothing is instrumented inside either program. Per repeat, three runs of each program,
interleaved (ours, diffusers, ours, diffusers, ...):
    cold   `--steps` steps, empty class-image folder    -> end-to-end wall time, peak RSS
    warm   `--steps` steps, the folder cold filled       -> class images: wall(cold) - wall(warm)
    long   5 x `--steps` steps, the same folder          -> steps/s: 4 x steps / (wall(long) - wall(warm))
Each wall time in a figure is the best (lowest) of its `--repeats` runs. Steps/s includes the
checkpoints written every steps / 2 steps, as a real run does. The progress lines also give each
run's CPU time (user + system), kept in the JSON: a run that lost the CPUs to another program shows
a wall time out of line with it. On a shared 2-core machine a run's wall time moves by a second or
two: the class-image figure (a second or a few, against runs of about 12 s) moves as much, and
`--class-images 32` steadies it. Ours also gets a median and p90 step time, read from its own step log
(millisecond timestamps) of the long run; diffusers' script logs none.

The workload, the same for both wherever their flags allow: a tiny random model (tests/tiny_models.py:
`build_tiny_sd`, 32x32 px, or `build_tiny_sdxl`, 64x64 px), 3 photos of a coloured disc, "a photo of
sks dog"; prior preservation with 8 class images of "a photo of dog" (the pipeline's default
classifier-free guidance, 7.5 or 5, 8 per batch, fp32); batch 1, constant learning rate, fp32, seed 0;
sd-full: full UNet fine-tuning at 5e-6, the fine-tuned pipeline saved at the end; sdxl-lora: LoRA rank 16
on the UNet at 1e-4, the adapter saved at the end; text encoders frozen in both; a checkpoint every
steps / 2 (30) steps; TensorBoard logging (diffusers' scripts always log, to TensorBoard by default).
Models and photos are built once in bench/.cache/vs_diffusers/ (gitignored), where the runs' logs go.

What still differs, by design of the programs:
  - Class images: ours samples 25 DPM++ steps (its default `--class-steps`); diffusers' script calls
    the pipeline with its default 50 steps of the model's own scheduler. The time per image per
    denoising step compares equal work; it still carries that phase's fixed costs (diffusers loads
    a second copy of the pipeline for it).
  - Ours encodes photos and class images to latents once; diffusers' scripts run the VAE encoder on
    every batch. Both encode the prompts once (train_dreambooth.py: `--pre_compute_text_embeddings`;
    the SDXL LoRA script does it whenever the text encoders are frozen).
  - Neither samples validation images (ours `--validation-images 0`; diffusers' script without
    `--validation_prompt`).
  - Ours keeps the last 2 checkpoints (its default) and deletes older ones; diffusers' keeps all.

torchvision. Diffusers' script imports `torchvision.transforms` (pure Python). The harness installs
the torchvision release paired with the installed torch (`pip install --no-deps --target`, about 7 MB,
once) into the cache and puts it on the PYTHONPATH of the diffusers process only. PyPI's Linux
wheel is built against CUDA torch: beside a CPU build of torch its compiled ops cannot load, which
torchvision tolerates, except for two fake-kernel registrations (`torchvision::nms`, `qnms`) that
fail because the ops do not exist. A `sitecustomize.py` on the same PYTHONPATH declares these two op
schemas, with no kernels, so `import torchvision` goes through; nothing the script runs calls them.
Where the interpreter already imports torchvision (a GPU machine's own torch and torchvision), it is
used as it is. There, each run's peak GPU memory is read with `nvidia-smi` too (bench/_timing.py).
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from _timing import Timed, load_average, run_timed, tail
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(__file__).resolve().parent / ".cache" / "vs_diffusers"
PROGRAMS = ("ours", "diffusers")
KINDS = ("cold", "warm", "long")
LONG = 5                # the long run trains LONG x --steps: steps/s comes from the (LONG - 1) x --steps more
WARM_STEPS = 10         # steps left out of our logged step times (allocator and kernel warm-up)
CLASS_BATCH = 8         # ours' default --class-batch-size; diffusers' script gets it as --sample_batch_size
DIFFUSERS_CLASS_STEPS = 50   # the script calls the pipeline without num_inference_steps: its default, 50
INSTANCE_PROMPT, CLASS_PROMPT = "a photo of sks dog", "a photo of dog"


@dataclass(frozen=True)
class Recipe:
    """What a workload fine-tunes, and how each program is told to: the rest of the workload is shared."""

    script: str
    """The diffusers example that trains it (examples/dreambooth/<script>)."""
    builder: str
    """The tests/tiny_models.py function that builds the tiny model."""
    resolution: int
    """The tiny model's native image size."""
    guidance: float
    """Classifier-free guidance of the class images: the pipeline's default, which both programs use."""
    ours: tuple[str, ...]
    """Our `dreambooth train` flags for it."""
    theirs: tuple[str, ...]
    """The diffusers script's flags for it."""
    weights: dict[str, Path]
    """The fine-tuned weights each program saves at the end, relative to its output folder."""


RECIPES = {
    # W1 of the performance issue: SD 1.x, full UNet fine-tuning (the paper's method), text encoder frozen
    "sd-full": Recipe(
        "train_dreambooth.py", "build_tiny_sd", 32, 7.5, ("--learning-rate", "5e-6"),
        ("--learning_rate", "5e-6", "--pre_compute_text_embeddings"),
        {"ours": Path("pipeline/unet/diffusion_pytorch_model.safetensors"),
         "diffusers": Path("unet/diffusion_pytorch_model.safetensors")},
    ),
    # W2: SDXL, LoRA rank 16 on the UNet (text encoders frozen; their prompts are encoded once by both)
    "sdxl-lora": Recipe(
        "train_dreambooth_lora_sdxl.py", "build_tiny_sdxl", 64, 5.0,
        ("--lora-rank", "16", "--learning-rate", "1e-4", "--no-save-pipeline"),
        ("--rank", "16", "--learning_rate", "1e-4"),
        {"ours": Path("lora/pytorch_lora_weights.safetensors"),
         "diffusers": Path("pytorch_lora_weights.safetensors")},
    ),
}
IMAGE_SUFFIXES = (".png", ".jpg")
BUSY_LOAD = 0.25        # x CPU count: the 1-minute load before the runs above which the figures are suspect
# Declares the two ops whose fake kernels `import torchvision` registers unconditionally (see the module
# docstring).
TORCHVISION_SHIM = (
    '"""Lets torchvision import beside a torch it was not built against: declares two op schemas, '
    'no kernels."""\n'
    '''import torch

_lib = torch.library.Library("torchvision", "DEF")
for _name in ("nms", "qnms"):
    _lib.define(f"{_name}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
''')


@dataclass(frozen=True)
class Workload:
    recipe: Recipe
    model: Path
    photos: Path
    steps: int
    class_images: int
    resolution: int
    precision: str = "no"
    """Mixed precision of training and class images: 'no' (fp32), 'bf16' or 'fp16' (a GPU)."""

    @property
    def checkpoint_every(self) -> int:
        return max(1, self.steps // 2)


@dataclass(frozen=True)
class Job:
    program: str
    kind: str
    repeat: int

    def steps(self, workload: Workload) -> int:
        return workload.steps * (LONG if self.kind == "long" else 1)

    @property
    def folder(self) -> Path:
        return CACHE / "runs" / f"{self.repeat}-{self.program}-{self.kind}"

    @property
    def class_dir(self) -> Path:
        """Filled by the cold run of the same repeat, reused by its warm and long runs."""
        return CACHE / "runs" / f"{self.repeat}-{self.program}-class"


@dataclass(frozen=True)
class Run:
    program: str
    kind: str
    repeat: int
    steps: int
    wall_s: float
    peak_rss_mb: float
    cpu_s: float
    step_ms: tuple[float, float] | None = None
    """Ours only: median and p90 of its own logged step times after the first WARM_STEPS steps."""
    peak_gpu_mb: float | None = None
    """GPU memory at its peak during the run, above what was in use before it (None without a GPU)."""


def ours_command(job: Job, w: Workload) -> list[str]:
    return [
        sys.executable, "-m", "dreambooth.cli", "train", "--model", str(w.model), "--instance-dir",
        str(w.photos), "--identifier", "sks", "--class-noun", "dog", "--instance-prompt",
        "a photo of {identifier} {class_noun}", "--class-prompt", "a photo of {class_noun}",
        "--prior-preservation", "--num-class-images", str(w.class_images), "--class-dir", str(job.class_dir),
        "--class-batch-size", str(CLASS_BATCH), "--resolution", str(w.resolution), "--max-steps",
        str(job.steps(w)), "--batch-size", "1", *w.recipe.ours, "--mixed-precision", w.precision,
        "--seed", "0", "--checkpoint-every", str(w.checkpoint_every), "--logger", "tensorboard",
        "--validation-images",
        "0",  # no validation samples, as diffusers' script without --validation_prompt
        "--run-dir", str(job.folder / "out"),
    ]


def diffusers_command(script: Path, job: Job, w: Workload) -> list[str]:
    return [
        sys.executable, str(script), "--pretrained_model_name_or_path", str(w.model), "--instance_data_dir",
        str(w.photos), "--instance_prompt", INSTANCE_PROMPT, "--class_prompt", CLASS_PROMPT,
        "--with_prior_preservation", "--num_class_images", str(w.class_images), "--class_data_dir",
        str(job.class_dir), "--sample_batch_size", str(CLASS_BATCH), "--prior_generation_precision",
        {"no": "fp32"}.get(w.precision, w.precision), "--resolution", str(w.resolution), "--max_train_steps",
        str(job.steps(w)), "--train_batch_size", "1", *w.recipe.theirs, "--lr_scheduler", "constant",
        "--lr_warmup_steps", "0", "--mixed_precision", w.precision, "--seed", "0", "--checkpointing_steps",
        str(w.checkpoint_every), "--report_to", "tensorboard", "--output_dir", str(job.folder / "out"),
    ]


def torchvision_release() -> str:
    """The torchvision minor release built with the installed torch (torch 2.N pairs with torchvision
    0.N+15)."""
    major, minor = importlib.metadata.version("torch").split(".")[:2]
    if major != "2":
        raise ValueError(f"torch {major}.{minor}: no known torchvision pairing; this harness knows torch 2.x")
    return f"0.{int(minor) + 15}"


def setup_step(cmd: list[str], env: dict[str, str], what: str) -> None:
    """Run one preparation command, its output kept in the cache; raise with its stderr tail on failure."""
    logs = CACHE / "setup" / what.replace(" ", "_")
    result = run_timed(cmd, env, logs)
    if result.returncode != 0:
        raise RuntimeError(f"{what} failed (exit {result.returncode}):\n{tail(logs / 'stderr.txt')}")


def prepare_model(recipe: Recipe) -> Path:
    """The tiny pipeline folder, built on first use (in a child process: the harness stays light)."""
    path = CACHE / recipe.builder.replace("build_tiny", "model")
    if not (path / "model_index.json").exists():
        print(f"building the tiny model ({recipe.builder}, once) ...", flush=True)
        partial = path.with_name(path.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        code = (f"import sys; from pathlib import Path; sys.path.insert(0, {str(ROOT / 'tests')!r}); "
                f"from tiny_models import {recipe.builder}; {recipe.builder}(Path({str(partial)!r}))")
        setup_step([sys.executable, "-c", code], dict(os.environ), "build model")
        partial.rename(path)
    return path


def prepare_photos() -> Path:
    """Three 64x64 PNGs of a disc, one colour each (square: diffusers' random crop then crops nothing)."""
    folder = CACHE / "photos"
    folder.mkdir(parents=True, exist_ok=True)
    for i, colour in enumerate(("red", "green", "blue")):
        image = Image.new("RGB", (64, 64), "white")
        ImageDraw.Draw(image).ellipse((8 + 4 * i, 12, 48 + 4 * i, 52), fill=colour)
        image.save(folder / f"{i}.png")
    return folder


def prepare_torchvision() -> list[Path]:
    """torchvision for the diffusers process, installed once, and the shim where it needs one to import;
    nothing where the interpreter already imports it (a GPU machine's own torch and torchvision).

    Returns:
        The folders to put on the diffusers process's PYTHONPATH: the one holding the `torchvision`
        package, after the one holding `sitecustomize.py` where the shim is needed (a CPU build of torch).
    """
    if importlib.util.find_spec("torchvision") is not None:
        return []
    release = torchvision_release()
    target, shim = CACHE / f"torchvision-{release}", CACHE / "torchvision_shim"
    if not (target / "torchvision" / "__init__.py").exists():
        print(f"installing torchvision {release}.* into {target.relative_to(ROOT)} (once) ...", flush=True)
        partial = target.with_name(target.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        setup_step([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(partial),
                    f"torchvision=={release}.*"], dict(os.environ), "pip install torchvision")
        partial.rename(target)
    check = [sys.executable, "-c", "from torchvision import transforms"]
    plain = {**os.environ, "PYTHONPATH": str(target)}
    if subprocess.run(check, env=plain, capture_output=True).returncode == 0:
        return [target]  # a CUDA build of torch: the wheel's compiled ops load
    shim.mkdir(parents=True, exist_ok=True)
    (shim / "sitecustomize.py").write_text(TORCHVISION_SHIM)
    shimmed = {**os.environ, "PYTHONPATH": os.pathsep.join([str(shim), str(target)])}
    setup_step(check, shimmed, "import torchvision")
    return [shim, target]


def environments(torchvision: list[Path]) -> dict[str, dict[str, str]]:
    """Each program's environment: offline, and torchvision for diffusers' script only."""
    base = {**os.environ, "HF_HUB_OFFLINE": "1"}
    paths = [*map(str, torchvision), *filter(None, [os.environ.get("PYTHONPATH")])]
    return {"ours": base, "diffusers": {**base, "PYTHONPATH": os.pathsep.join(paths)}}


def problems_with(job: Job, w: Workload, timed: Timed) -> list[str]:
    """What shows that the run did not train: exit code, steps never reached, missing weights or class
    images."""
    problems = [] if timed.returncode == 0 else [f"exit code {timed.returncode}"]
    steps = job.steps(w)
    if f"{steps}/{steps} [" not in (job.folder / "stderr.txt").read_text(errors="replace"):
        problems.append(f"its progress bar never reached {steps}/{steps} steps")
    if not (job.folder / "out" / w.recipe.weights[job.program]).is_file():
        problems.append(f"no {w.recipe.weights[job.program]} in {job.folder / 'out'}")
    found = [p for p in job.class_dir.glob("*") if p.suffix in IMAGE_SUFFIXES]
    if len(found) < w.class_images:
        problems.append(f"{len(found)} class images in {job.class_dir}, expected {w.class_images}")
    return problems


def execute(job: Job, cmd: list[str], env: dict[str, str], w: Workload) -> Run:
    """Run one job, check that it trained, drop its outputs (its logs stay)."""
    shutil.rmtree(job.folder, ignore_errors=True)
    timed = run_timed(cmd, env, job.folder)
    problems = problems_with(job, w, timed)
    if problems:
        raise SystemExit(
            f"\n{job.program} {job.kind} run failed: {'; '.join(problems)}\ncommand: {' '.join(cmd)}\n"
            f"--- stderr tail ({job.folder / 'stderr.txt'}) "
            f"---\n{tail(job.folder / 'stderr.txt')}"
        )
    step_ms = logged_step_ms(job.folder / "out" / "logs" / "base.jsonl") if job.program == "ours" else None
    shutil.rmtree(job.folder / "out")
    return Run(
        job.program, job.kind, job.repeat, job.steps(w), timed.wall_s, timed.peak_rss_mb, timed.cpu_s,
        step_ms, timed.peak_gpu_mb,
    )


def logged_step_ms(log: Path) -> tuple[float, float] | None:
    """Median and p90 (ms) of the step times in our JSONL log (differences of its `elapsed_s`), after the
    first WARM_STEPS steps; the steps that wrote a checkpoint are among them. None for a short run."""
    if not log.is_file():
        return None
    elapsed = [json.loads(line)["elapsed_s"] for line in log.read_text().splitlines()]
    times = sorted(1000 * (b - a) for a, b in zip(elapsed[WARM_STEPS:], elapsed[WARM_STEPS + 1 :]))
    if len(times) < 10:
        return None
    return statistics.median(times), times[int(0.9 * (len(times) - 1))]


def class_sampling(program: str, class_dir: Path, model: Path) -> tuple[int, str]:
    """Denoising steps and sampler of a program's class images: ours as the folder's manifest records
    them; diffusers' script uses its pipeline's defaults, with the scheduler the model ships."""
    if program == "diffusers":
        return DIFFUSERS_CLASS_STEPS, json.loads((model / "scheduler" / "scheduler_config.json").read_text())[
            "_class_name"
        ]
    spec = json.loads((class_dir / "manifest.json").read_text()).get("spec", {})
    if "steps" not in spec:
        raise ValueError(
            f"{class_dir / 'manifest.json'} has no spec.steps: its format changed, update this bench"
        )
    return int(spec["steps"]), str(spec.get("sampler"))


def figures(runs: list[Run], w: Workload, class_steps: dict[str, int]) -> dict[str, dict[str, float | None]]:
    """Each program's figures from the best wall time of each kind of run."""
    out = {}
    for program in PROGRAMS:
        mine = [r for r in runs if r.program == program]
        cold, warm, long = (min(r.wall_s for r in mine if r.kind == kind) for kind in KINDS)
        class_s = cold - warm
        out[program] = {
            "end_to_end_s": cold,
            "steps_per_s": (LONG - 1) * w.steps / (long - warm) if long > warm else None,
            "class_images_s": class_s,
            "class_ms_per_image_step": 1000 * class_s / (w.class_images * class_steps[program]),
            "peak_rss_cold_mb": min(r.peak_rss_mb for r in mine if r.kind == "cold"),
            "peak_rss_long_mb": min(r.peak_rss_mb for r in mine if r.kind == "long"),
            **{
                f"peak_gpu_{kind}_mb": min(r.peak_gpu_mb for r in mine if r.kind == kind)
                for kind in ("cold", "long") if all(r.peak_gpu_mb is not None for r in mine)
            },
        }
    return out


ROWS = (  # key, label, which way is better
    ("end_to_end_s", "end-to-end wall, cold run (s)", "lower"),
    ("steps_per_s", "training speed (steps/s)", "higher"),
    ("class_images_s", "class images (s)", "lower"),
    ("class_ms_per_image_step", "class images (ms per image per denoising step)", "lower"),
    ("peak_rss_cold_mb", "peak RSS, cold run (MB)", "lower"),
    ("peak_rss_long_mb", "peak RSS, long run (MB)", "lower"),
    ("peak_gpu_cold_mb", "peak GPU memory, cold run (MB, nvidia-smi)", "lower"),
    ("peak_gpu_long_mb", "peak GPU memory, long run (MB, nvidia-smi)", "lower"),
)


def table(figs: dict[str, dict[str, float | None]]) -> str:
    def cell(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.3g}" if abs(value) < 10 else f"{value:.1f}"

    lines = [f"{'figure':48s} {'ours':>9s} {'diffusers':>10s} {'ours/theirs':>12s}  better"]
    for key, label, better in ROWS:
        if key not in figs["ours"]:  # GPU memory, on a machine without a GPU
            continue
        ours, theirs = figs["ours"][key], figs["diffusers"][key]
        ratio = ours / theirs if ours is not None and theirs and theirs > 0 and ours > 0 else None
        lines.append(f"{label:48s} {cell(ours):>9s} {cell(theirs):>10s} {cell(ratio):>12s}  {better}")
    return "\n".join(lines)


def versions(script: Path) -> dict[str, str]:
    """What the figures depend on: packages, our commit (and whether src/ has changes), the script's hash."""
    def git(*args: str) -> str:
        result = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True)
        return result.stdout.strip() if result.returncode == 0 else "unknown"

    packages = {
        name: importlib.metadata.version(name)
        for name in ("torch", "diffusers", "transformers", "accelerate")
    }
    dirty = " + uncommitted changes in src/" if git("status", "--porcelain", "--", "src") else ""
    return {
        "python": platform.python_version(), **packages,
        "dreambooth": git("rev-parse", "--short", "HEAD") + dirty,
        script.name: f"{script} (sha256 {hashlib.sha256(script.read_bytes()).hexdigest()[:12]})",
    }


def warn_if_busy(load: float, when: str) -> None:
    cpus = os.cpu_count() or 1
    if load > BUSY_LOAD * cpus:
        print(
            f"WARNING: load average {load:.2f} {when} on {cpus} CPUs: other programs compete, the figures "
            "are noisy"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--diffusers-script", type=Path, required=True,
                        help="the workload's examples/dreambooth/ script of a diffusers source checkout")
    parser.add_argument("--workload", choices=RECIPES, default="sd-full",
                        help="sd-full: SD 1.x full UNet (train_dreambooth.py); sdxl-lora: SDXL LoRA rank 16 "
                             "(train_dreambooth_lora_sdxl.py)")
    parser.add_argument("--steps", type=int, default=60, help="training steps of the cold and warm runs")
    parser.add_argument("--class-images", type=int, default=8, help="class images for prior preservation")
    parser.add_argument(
        "--repeats", type=int, default=2, help="runs of each kind per program; the best counts"
    )
    parser.add_argument("--json", type=Path, default=None, help="write every run and figure here")
    parser.add_argument("--model", type=Path, default=None,
                        help="pipeline folder of the workload's family (bench/full_size_sd15.py on a GPU); "
                             "default: tiny")
    parser.add_argument("--resolution", type=int, default=None,
                        help="training and class-image px; default: the tiny model's")
    parser.add_argument("--mixed-precision", choices=("no", "bf16", "fp16"), default="no",
                        help="of training and class images in both programs (bf16/fp16 need a GPU)")
    args = parser.parse_args()
    script, recipe = args.diffusers_script.resolve(), RECIPES[args.workload]
    if not script.is_file():
        parser.error(f"--diffusers-script {args.diffusers_script} is not a file; get it with `git clone "
                     f"https://github.com/huggingface/diffusers`: examples/dreambooth/{recipe.script}")
    if script.name != recipe.script:
        parser.error(
            f"--workload {args.workload} compares with examples/dreambooth/{recipe.script}, not {script.name}"
        )
    if min(args.steps, args.class_images, args.repeats) < 1:
        parser.error("--steps, --class-images and --repeats must be >= 1")
    start = time.perf_counter()

    info = versions(script)
    print("\n".join(f"{name}: {value}" for name, value in info.items()))
    threads = os.environ.get("OMP_NUM_THREADS", "unset")
    print(f"{os.cpu_count()} CPUs, OMP_NUM_THREADS {threads}")
    load_before = load_average()
    print(f"load average before: {load_before:.2f}")
    warn_if_busy(load_before, "before the runs")

    model = args.model.resolve() if args.model else prepare_model(recipe)
    w = Workload(
        recipe, model, prepare_photos(), args.steps, args.class_images, args.resolution or recipe.resolution,
        args.mixed_precision,
    )
    envs = environments(prepare_torchvision())
    commands = {"ours": ours_command, "diffusers": functools.partial(diffusers_command, script)}
    print(
        f"\nworkload {args.workload}: {w.model.name}, {w.resolution} px, precision {w.precision}, "
        f"{args.class_images} class "
        f"images, runs of {w.steps} and "
        f"{LONG * w.steps} steps, a checkpoint every {w.checkpoint_every}; {args.repeats} repeat(s)"
    )

    shutil.rmtree(CACHE / "runs", ignore_errors=True)
    jobs = [
        Job(program, kind, repeat) for repeat in range(args.repeats) for kind in KINDS for program in PROGRAMS
    ]
    runs, sampling = [], {}
    for i, job in enumerate(jobs, 1):
        print(
            f"[{i:2d}/{len(jobs)}] {job.program:9s} {job.kind:4s} {job.steps(w):4d} steps ...", end=" ",
            flush=True,
        )
        run = execute(job, commands[job.program](job, w), envs[job.program], w)
        gpu = f", peak GPU {run.peak_gpu_mb:5.0f} MB" if run.peak_gpu_mb is not None else ""
        rss = f"peak RSS {run.peak_rss_mb:4.0f} MB"
        print(f"{run.wall_s:6.1f} s (CPU {run.cpu_s:5.1f} s), {rss}{gpu}", flush=True)
        runs.append(run)
        if job.kind == "cold" and job.repeat == 0:
            sampling[job.program] = class_sampling(job.program, job.class_dir, w.model)

    figs = figures(runs, w, {program: steps for program, (steps, _) in sampling.items()})
    print(f"\n{table(figs)}")
    print(
        "class images: "
        + "; ".join(f"{p} {steps} denoising steps ({sampler})" for p, (steps, sampler) in sampling.items())
        + f"; {CLASS_BATCH} per batch, guidance {recipe.guidance:g} in both"
    )
    logged = [r.step_ms for r in runs if r.program == "ours" and r.kind == "long" and r.step_ms]
    if logged:
        median, p90 = min(logged)
        print(f"ours, from its own log of the long run: step time median {median:.1f} ms, p90 {p90:.1f} ms "
              f"(steps after the first {WARM_STEPS}; diffusers' script logs no step times)")
    if any(figs[p]["steps_per_s"] is None or figs[p]["class_images_s"] <= 0 for p in PROGRAMS):
        print(
            "WARNING: a difference of wall times is not positive: noise exceeds the signal; raise --steps or "
            "--repeats"
        )
    load_after = load_average()
    print(f"\nload average after: {load_after:.2f} (includes these runs)")
    total = time.perf_counter() - start
    print(f"{total:.0f} s")

    if args.json:
        record = {
            "versions": info, "settings": {**vars(args), "diffusers_script": str(script), "long_factor": LONG,
                                           "resolution": w.resolution, "omp_num_threads": threads},
            "class_sampling": sampling, "load_average": {"before": load_before, "after": load_after},
            "runs": [asdict(r) for r in runs], "figures": figs, "total_s": total,
        }
        args.json.write_text(json.dumps(record, indent=2, default=str))


if __name__ == "__main__":
    main()
