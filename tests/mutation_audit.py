"""Mutation audit: plausible one-line bugs, each put into a copy of the tree, must make a test
fail. Not part of the suite (it runs test files once per mutation); run it after changing the
tests or the code a mutation names:

    python -m tests.mutation_audit                 # every mutation (about 8 minutes here)
    python -m tests.mutation_audit --only nfnet    # names containing "nfnet"

Prints one row per mutation: caught (with the first failing test), survived, or stale (the
code it mutates has changed: update the mutation). Exits 1 unless every mutation is caught.
"""

from __future__ import annotations

import argparse
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
from typing import NamedTuple

ROOT = pathlib.Path(__file__).resolve().parents[1]


class Mutation(NamedTuple):
    name: str
    path: str                    # relative to the repository root
    edits: tuple[tuple[str, str], ...]   # (old, new); each old must occur exactly once
    tests: tuple[str, ...]       # pytest arguments


MUTATIONS = (
    Mutation("train step: gradient ascent (+update)", "training/steps.py", (
        ("apply_updates(state.params, updates)",
         "apply_updates(state.params, jax.tree.map(lambda u: -u, updates))"),),
        ("tests/test_steps.py",)),
    Mutation("train step: EMA decay one step off", "training/steps.py", (
        ("ema_update(state.ema_params, params, state.step, decay)",
         "ema_update(state.ema_params, params, state.step + 1, decay)"),),
        ("tests/test_steps.py",)),
    Mutation("train step: EMA of the parameters before the update", "training/steps.py", (
        ("_ema(state, params, model_state, ema_decay)",
         "_ema(state, state.params, state.model_state, ema_decay)"),),
        ("tests/test_steps.py",)),
    Mutation("efficientnet: BatchNorm decay 0.99 -> 0.9", "nets/efficientnet.py", (
        ("bn_decay: float = 0.99,", "bn_decay: float = 0.9,"),),
        ("tests/test_keras_reference.py", "tests/test_efficientnet.py")),
    Mutation("shake-shake: stride-2 conv padding torch -> SAME", "nets/shake_shake.py", (
        ('3, self.stride, name=f"branch{i}_conv1")',
         '3, self.stride, padding="same", name=f"branch{i}_conv1")'),),
        ("tests/test_shake_shake.py",)),
    Mutation("p3d: res5 stride on the 3x3, not the 1x1", "nets/p3d.py", (
        ('self.planes, 1, self.stride, "conv1"',
         'self.planes, 1, 1 if self.kind == "2d" else self.stride, "conv1"'),
        ('self.planes, 3, 1, "conv_normal"', 'self.planes, 3, self.stride, "conv_normal"')),
        ("tests/test_p3d.py",)),
    Mutation("nfnet: official tanh GELU -> exact", "nets/nfnet.py", (
        ("jax.nn.gelu(x, approximate=True)", "jax.nn.gelu(x, approximate=False)"),),
        ("tests/test_nfnet.py", "tests/test_nfnet_official.py")),
    Mutation("nfnet: WSConv eps floor -> added", "nets/layers.py", (
        ("lax.rsqrt(jnp.maximum(fan_in * var, self.eps))", "lax.rsqrt(fan_in * var + self.eps)"),),
        ("tests/test_nfnet.py", "tests/test_nfnet_official.py")),
    Mutation("shufflenet v1: the stride-2 unit's pool excludes padding", "nets/shufflenet.py", (
        ("layers.avg_pool(x, 3, 2, padding=1)",
         "layers.avg_pool(x, 3, 2, padding=1, count_include_pad=False)"),),
        ("tests/test_shufflenet.py", "-k", "v1")),
    Mutation("randaugment: rotate 30 -> 45 degrees at magnitude 10", "data/randaugment.py", (
        ("m / MAX_LEVEL * 30.0", "m / MAX_LEVEL * 45.0"),),
        ("tests/test_randaugment.py",)),
    Mutation("summary: a depthwise conv's MACs counted as dense", "tools/summary.py", (
        ("math.prod(y.shape[1:]) * math.prod(w.shape[:-1])",
         "math.prod(y.shape[1:]) * math.prod(w.shape[:-2]) * x.shape[-1]"),),
        ("tests/test_tools_summary.py",)),
    Mutation("BatchNorm eps 1e-5 -> 1e-3 (torch models)", "nets/layers.py", (
        ("lax.rsqrt(var + self.eps)", "lax.rsqrt(var + max(self.eps, 1e-3))"),),
        ("tests/test_resnet_reference.py",)),
    Mutation("SAME padding: the extra pixel on the wrong side", "nets/layers.py", (
        ("pads.append((total // 2, total - total // 2))",
         "pads.append((total - total // 2, total // 2))"),),
        ("tests/test_layers.py", "tests/test_keras_reference.py")),
    Mutation("AGC after weight decay", "optim/agc.py", (
        ("        adaptive_grad_clip(clipping, eps, mask=clip_mask, stacked=stacked),\n", ""),
        ("decay_mask),\n", "decay_mask),\n"
         "        adaptive_grad_clip(clipping, eps, mask=clip_mask, stacked=stacked),\n")),
        ("tests/test_optim.py",)),
    Mutation("AGC eps 1e-3 -> 1e-6", "optim/agc.py", (
        ("adaptive_grad_clip(clipping, eps)", "adaptive_grad_clip(clipping, eps * 1e-3)"),),
        ("tests/test_optim.py",)),
    Mutation("warm-up rounded to whole steps", "training/optimizers.py", (
        ("warmup = cfg.warmup_epochs * steps_per_epoch",
         "warmup = round(cfg.warmup_epochs * steps_per_epoch)"),),
        ("tests/test_optim.py", "tests/test_experiments.py")),
    Mutation("label smoothing over the K - 1 wrong classes", "training/classification.py", (
        ("targets = optax.smooth_labels(targets, label_smoothing)",
         "targets = targets * (1 - label_smoothing) + label_smoothing / (targets.shape[-1] - 1)"),),
        ("tests/test_train.py", "-k", "smooth")),
    Mutation("evaluate: the registry's preprocessing, not the weights'", "tools/evaluate.py", (
        ("    cfg = eval_config({**source.eval_preprocessing,",
         "    cfg = eval_config({**nets.weights.reference_eval_preprocessing(source.model),"),),
        ("tests/test_evaluate_predict.py",)),
    Mutation("predict: the registry's crop fraction, not the weights'", "tools/predict.py", (
        ("    prepare = data.eval_preprocessor(loaded.data)",
         "    loaded.data.crop_fraction = 0.875; prepare = data.eval_preprocessor(loaded.data)"),),
        ("tests/test_evaluate_predict.py", "-k", "predictions_are")),
)


def _copy_tree(destination: pathlib.Path) -> None:
    ignore = shutil.ignore_patterns(".venv", ".git", "runs", "__pycache__", "*.egg-info")
    shutil.copytree(ROOT, destination, ignore=ignore)


def run(mutation: Mutation, work: pathlib.Path) -> tuple[str, str]:
    """(outcome, detail) of one mutation in a fresh copy of the tree."""
    copy = work / re.sub(r"\W+", "_", mutation.name)
    _copy_tree(copy)
    source = copy / mutation.path
    text = source.read_text()
    for old, new in mutation.edits:
        if text.count(old) != 1:
            return "stale", f"{mutation.path} no longer has exactly one {old!r}"
        text = text.replace(old, new)
    source.write_text(text)
    # `python -m pytest` in the copy puts the copy first on sys.path, ahead of an editable
    # install of the original tree; the probe makes sure.
    probe = subprocess.run([sys.executable, "-c", f"import {mutation.path.split('/')[0]} as m; "
                            "print(m.__file__)"], cwd=copy, capture_output=True, text=True)
    if not probe.stdout.startswith(str(copy)):
        return "error", f"the copy's modules were not imported: {probe.stdout}{probe.stderr}"
    result = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:xdist", "-p",
                             "no:cacheprovider", "-q", "-x", *mutation.tests],
                            cwd=copy, capture_output=True, text=True)
    failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", result.stdout, re.MULTILINE)
    shutil.rmtree(copy)
    if result.returncode == 0:
        return "survived", "all of " + " ".join(mutation.tests) + " passed"
    return "caught", failed[0] if failed else result.stdout.strip().splitlines()[-1]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default="", help="run the mutations whose name contains this")
    args = parser.parse_args(argv)
    chosen = [m for m in MUTATIONS if args.only in m.name]
    outcomes = []
    with tempfile.TemporaryDirectory(prefix="mutation-audit-") as work:
        for mutation in chosen:
            outcome, detail = run(mutation, pathlib.Path(work))
            outcomes.append(outcome)
            print(f"| {mutation.name} | {outcome} | {detail} |", flush=True)
    return 0 if all(o == "caught" for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
