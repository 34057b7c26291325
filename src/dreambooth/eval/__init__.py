"""Evaluation: the paper's metrics (DINO, CLIP-I, CLIP-T, PRES, DIV), failure-mode flags and reports.

Entry points: :func:`scoring.score_subject` / :func:`scoring.summarise` and
:func:`report.write_report` score images that already exist; :func:`evaluate.run_eval`
(``dreambooth eval``) first samples a model and its pretrained base on the DreamBench prompts;
:func:`dreambooth.dreambench.run_dreambench` (``dreambooth dreambench``), a recipe above both
fine-tuning and evaluation, trains and evaluates every subject of a dataset. Nothing is
re-exported here on purpose: ``dreambooth.eval.metrics`` and ``prompts`` must stay light to import (the pocket
scorers use them), while the entry points pull in torch, transformers and diffusers (about 7 s).
"""
