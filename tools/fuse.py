"""Fold every BatchNorm of a model's weights into the conv before it (`nets.fusion`) and write
the fused weights as a nets.weights file (its overrides say fused=True).

    python -m tools.fuse --weights resnet50.safetensors --out resnet50_fused.safetensors
    python -m tools.fuse --weights resnet50.pth --model resnet50 --out resnet50_fused.safetensors

    params, state = nets.weights.load("resnet50_fused.safetensors")
    f = nets.transformed("resnet50", fused=True)     # eval mode only
"""

from __future__ import annotations

import argparse

import nets
from training import weight_sources


def fuse_file(weights: str, out: str, model: str | None = None,
              num_classes: int | None = None) -> str:
    """Reads `weights` (anything `training.weight_sources.read` reads; a PyTorch state dict
    needs `model`), writes the fused weights to `out` and returns the model's name."""
    source = weight_sources.read(weights, model=model, num_classes=num_classes)
    model = model or source.model
    overrides = dict(source.overrides) if model == source.model else {}
    if overrides.get("fused"):
        raise ValueError(f"{weights} is already fused")
    params, state = weight_sources.variables(source, model, num_classes, **overrides)
    params, state = nets.fusion.fuse(model, params, state, num_classes, **overrides)
    nets.weights.save(out, params, state, model=model, num_classes=num_classes,
                      overrides={**overrides, "fused": True})
    return model


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", required=True,
                        help="a nets.weights .safetensors file, a training workdir or a "
                             "PyTorch state dict (with --model)")
    parser.add_argument("--out", required=True, help="the fused weights (.safetensors)")
    parser.add_argument("--model", default=None, help="default: the weights file's model")
    parser.add_argument("--num-classes", type=int, default=None)
    args = parser.parse_args(argv)
    model = fuse_file(args.weights, args.out, args.model, args.num_classes)
    meta = nets.weights.read_metadata(args.out)
    overrides = {k: v for k, v in meta["overrides"].items() if k != "fused"}
    plan = nets.fusion.plan(model, meta["num_classes"], **overrides)
    print(f"wrote {args.out}: {len(plan.folded)} BatchNorms folded into their convs, "
          f"{len(plan.affine)} kept as affines")


if __name__ == "__main__":
    main()
