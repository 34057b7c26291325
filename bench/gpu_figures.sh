#!/usr/bin/env bash
# The README's GPU speed figures in one run, about 6-8 minutes on an H100-class GPU:
#   W1 + W3  ours and diffusers' train_dreambooth.py side by side (bench/vs_diffusers.py): SD 1.5 full
#            UNet at 512 px in bf16, 1 instance + 1 class row, 200 class images of "a photo of dog";
#   W1 small-GPU recipe: ours with gradient checkpointing (and 8-bit Adam where bitsandbytes imports);
#   W4       ours end to end: 200 class images + 800 steps + the pipeline saved;
#   floors   bench/floors.py.
# The model is the published SD 1.5 architecture with random weights (bench/full_size_sd15.py):
# speed and memory do not depend on the weights, and nothing is downloaded.
#
#   bash bench/gpu_figures.sh PATH/TO/train_dreambooth.py [OUT]
#   DRY_RUN=1 bash bench/gpu_figures.sh ...   # the same steps on the tiny CPU model, to check the script
#
# Everything printed is also in OUT/log.txt (default bench/.cache/gpu). A machine without this
# project's packages: see docs/performance-floors.md, "Measuring on a GPU".
set -euo pipefail
script=${1:?usage: bash bench/gpu_figures.sh PATH/TO/train_dreambooth.py [OUT]}
out=${2:-bench/.cache/gpu}
mkdir -p "$out"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1

if [[ -n "${DRY_RUN:-}" ]]; then
  model_args=() size=32 precision=no steps=10 class_images=8 long_steps=20
else
  model_args=(--model "$out/sd15") size=512 precision=bf16 steps=40 class_images=200 long_steps=800
fi

{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "no nvidia-smi"
  python -c "import torch, diffusers, transformers; print('torch', torch.__version__, '| diffusers', \
diffusers.__version__, '| transformers', transformers.__version__)"
  [[ -n "${DRY_RUN:-}" ]] || python bench/full_size_sd15.py "$out/sd15" --dtype fp16

  echo "== W1 + W3: side by side with diffusers' script"
  python bench/vs_diffusers.py --diffusers-script "$script" "${model_args[@]}" --resolution "$size" \
    --mixed-precision "$precision" --steps "$steps" --class-images "$class_images" --repeats 1 \
    --json "$out/w1_w3.json"
  model=${model_args[1]:-bench/.cache/vs_diffusers/model_sd}

  echo "== W4: ours end to end ($class_images class images, $long_steps steps, pipeline saved)"
  rm -rf "$out/class" "$out/w4"
  python bench/timed.py W4 -- python -m dreambooth.cli train --model "$model" \
    --instance-dir bench/.cache/vs_diffusers/photos --class-noun dog --identifier sks --prior-preservation \
    --num-class-images "$class_images" --class-dir "$out/class" --resolution "$size" \
    --mixed-precision "$precision" --max-steps "$long_steps" --run-dir "$out/w4"

  echo "== W1 small-GPU recipe: ours, gradient checkpointing (+ 8-bit Adam where bitsandbytes imports)"
  adam8=()
  python -c "import bitsandbytes" 2>/dev/null && adam8=(--use-8bit-adam) || echo "no bitsandbytes: AdamW"
  rm -rf "$out/recipe"
  python bench/timed.py W1-small-GPU -- python -m dreambooth.cli train --model "$model" \
    --instance-dir bench/.cache/vs_diffusers/photos --class-noun dog --identifier sks --prior-preservation \
    --num-class-images "$class_images" --class-dir "$out/class" --resolution "$size" \
    --mixed-precision "$precision" --max-steps "$steps" --gradient-checkpointing "${adam8[@]}" \
    --validation-images 0 --run-dir "$out/recipe"

  echo "== floors"
  python bench/floors.py
  date -u
} 2>&1 | tee "$out/log.txt"
