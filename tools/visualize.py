"""Pictures of a model and its training run, as PNG files (matplotlib, Agg backend).

    python -m tools.visualize features resnet18 --image cat.npy --out maps.png [--weights W]
    python -m tools.visualize kernels resnet18 --out hist.png [--weights W | --seed 0]
    python -m tools.visualize filters resnet18 --out filters.png [--weights W | --seed 0]
    python -m tools.visualize curves workdir/metrics.jsonl --out curves.png [--keys train/loss]

Without --weights the model is a random init from --seed (what the kernels look like at
initialisation). --weights takes a `nets.weights` .safetensors file (`tools.convert`'s output)
or a PyTorch state dict of the reference (see `tools.export.load_variables`). Images for
`features` are a .npy array [H, W, 3], already normalised.

Every figure is laid out on a grid of fixed-size panels, so its pixel size follows from the
panel count: PANEL_PX per feature map / filter panel, HIST_PX and CURVE_PX for the others.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import functools
import json
import math
import re

import haiku as hk
import jax
import numpy as np

import nets
from nets.registry import module_path

DPI = 100
PANEL_PX = 100  # one feature map
FILTER_PX = 50  # one first-layer filter
HIST_PX = (300, 200)  # (width, height) of one histogram
CURVE_PX = (400, 300)  # (width, height) of one curve
HIST_COLUMNS = 4
CURVE_COLUMNS = 3


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def _figure(columns: int, rows: int, panel_px: tuple[int, int]):
    plt = _pyplot()
    fig, axes = plt.subplots(rows, columns, squeeze=False,
                             figsize=(columns * panel_px[0] / DPI, rows * panel_px[1] / DPI),
                             dpi=DPI)
    for ax in axes.flat:
        ax.set_axis_off()
    return fig, axes


def _save(fig, path: str) -> str:
    fig.savefig(path, dpi=DPI)  # no bbox_inches="tight": the size stays the grid's
    _pyplot().close(fig)
    return path


# ---------------------------------------------------------------------------------------------
# Feature maps


def feature_maps(name: str, params, state, image, path: str,
                 layers=("stage1", "stage2", "stage3", "stage4"), k: int = 16,
                 **overrides) -> str:
    """The first k channels of the chosen maps of one image [H, W, C] (or [1, H, W, C]), one
    row per map, each map scaled to its own range. A layer is a stage ("stage2") or the dotted
    path of any module (as `kernel_statistics` and weight conversion name them, e.g.
    "layer2_0.conv1"), whose output (its first call's) is drawn. `params` / `state` are the
    model's (with or without the head: `features` does not use it)."""
    if k <= 0:
        raise ValueError(f"k must be positive, got {k}")
    image = np.asarray(image, np.float32)
    if image.ndim == 3:
        image = image[None]
    nets.layers.check_images(image, name, image.shape[-1])
    if image.shape[0] != 1:
        raise ValueError(f"feature_maps draws one image; got a batch of {image.shape[0]}")
    maps = _maps(name, params, state, image, layers, overrides)
    fig, axes = _figure(k, len(layers), (PANEL_PX, PANEL_PX))
    for row, layer in enumerate(layers):
        x = np.asarray(maps[layer][0], np.float32)
        for c in range(min(k, x.shape[-1])):
            axes[row, c].imshow(x[..., c], cmap="viridis", interpolation="nearest")
        axes[row, 0].set_axis_on()
        axes[row, 0].set_xticks([])
        axes[row, 0].set_yticks([])
        axes[row, 0].set_ylabel(layer, fontsize=8)
    return _save(fig, path)


def _maps(name: str, params, state, image, layers, overrides) -> dict:
    """The stage maps of `features`, plus the outputs of the modules named in `layers`,
    recorded as the forward calls them (`hk.intercept_methods`)."""
    stacked = nets.model_info(name).stacked_modules
    for layer in layers:
        if stacked and re.match(stacked, layer):
            raise ValueError(f"{layer!r} is inside {name}'s stacked blocks (one scan over "
                             f"them): build the model unstacked to draw it (e.g. "
                             f"scan_blocks=False where the model has that option)")
    called: set[str] = set()

    def record(next_f, args, kwargs, context):
        out = next_f(*args, **kwargs)
        if context.method_name == "__call__":
            layer = module_path(context.module.module_name)
            called.add(layer)
            if layer in layers and layer not in outputs:
                outputs[layer] = out
        return out

    def forward(images):
        with hk.intercept_methods(record):
            maps = nets.create(name, 0, **overrides).features(images, is_training=False)
        return maps, outputs

    outputs: dict = {}
    apply = functools.partial(hk.transform_with_state(forward).apply, rng=None)
    # Checks the layers before compiling.
    (stages, modules), _ = jax.eval_shape(apply, params, state, images=image)
    unknown = [layer for layer in layers if layer not in stages and layer not in modules]
    if unknown:
        close = {m for layer in unknown for m in difflib.get_close_matches(layer, called, 3)}
        hint = f"; modules with close paths: {sorted(close)}" if close else ""
        raise ValueError(f"{name} has no feature map or module {unknown}; its stages are "
                         f"{sorted(stages)}{hint}")
    maps = {**modules, **stages}  # a stage's name wins over a module of that path
    for layer in set(layers) - set(stages):
        if not isinstance(maps[layer], jax.ShapeDtypeStruct) or maps[layer].ndim != 4:
            shape = getattr(maps[layer], "shape", type(maps[layer]).__name__)
            raise ValueError(f"{name}'s module {layer!r} outputs {shape}, not a map "
                             f"[1, H, W, C]")
    outputs.clear()
    stages, modules = jax.jit(apply)(params, state, images=image)[0]
    return {**modules, **stages}


# ---------------------------------------------------------------------------------------------
# Kernels


@dataclasses.dataclass(frozen=True)
class LeafStatistics:
    module: str  # dotted path without the root, as weight conversion names it
    leaf: str
    shape: tuple[int, ...]
    mean: float
    std: float
    min: float
    max: float


def kernel_statistics(params) -> list[LeafStatistics]:
    """Mean, standard deviation, min and max of every parameter leaf, in float64, sorted by
    module path. The standard deviation is the population's (NumPy's default, ddof=0: divided
    by the element count, not by count - 1)."""
    rows = []
    for module in sorted(params):
        for leaf in sorted(params[module]):
            x = np.asarray(params[module][leaf], np.float64)
            rows.append(LeafStatistics(module_path(module) or module, leaf, x.shape,
                                       float(x.mean()), float(x.std()), float(x.min()),
                                       float(x.max())))
    return rows


def format_statistics(rows: list[LeafStatistics]) -> str:
    lines = [f"{'module':<40} {'leaf':<6} {'shape':<18} {'mean':>10} {'std':>10} {'min':>10} "
             f"{'max':>10}"]
    for r in rows:
        lines.append(f"{r.module:<40} {r.leaf:<6} {'x'.join(map(str, r.shape)) or '-':<18} "
                     f"{r.mean:>10.4g} {r.std:>10.4g} {r.min:>10.4g} {r.max:>10.4g}")
    return "\n".join(lines)


def _kernels(params) -> list[tuple[str, np.ndarray]]:
    """Conv kernels and dense weights (leaves named "w" with two or more axes), by path."""
    return [(module_path(m) or m, np.asarray(params[m]["w"])) for m in sorted(params)
            if "w" in params[m] and np.ndim(params[m]["w"]) >= 2]


def kernel_histograms(params, path: str, max_layers: int = 16, bins: int = 50) -> str:
    """Histograms of the conv kernels and dense weights of the first `max_layers` modules (by
    path), HIST_COLUMNS per row."""
    kernels = _kernels(params)[:max_layers]
    if not kernels:
        raise ValueError("no conv kernels or dense weights (leaves 'w' of rank >= 2) in params")
    rows = math.ceil(len(kernels) / HIST_COLUMNS)
    fig, axes = _figure(min(HIST_COLUMNS, len(kernels)), rows, HIST_PX)
    for ax, (module, w) in zip(axes.flat, kernels):
        ax.set_axis_on()
        ax.hist(w.ravel(), bins=bins)
        ax.set_title(module, fontsize=7)
        ax.tick_params(labelsize=6)
    fig.tight_layout()
    return _save(fig, path)


def first_layer_filters(params, path: str, module: str | None = None) -> str:
    """The first conv's kernels (k, k, 3, C) as C RGB tiles, each min-max normalised on its
    own. The first conv is the one kernel with 3 input channels, or `module` (a dotted path);
    video kernels (t, k, k, 3, C) show their middle frame."""
    candidates = {m: w for m, w in _kernels(params) if w.ndim in (4, 5) and w.shape[-2] == 3}
    if module is not None:
        if module not in candidates:
            raise ValueError(f"{module!r} is not a conv with 3 input channels; those are "
                             f"{sorted(candidates)}")
        candidates = {module: candidates[module]}
    if len(candidates) != 1:
        raise ValueError(f"expected one conv with 3 input channels, found {sorted(candidates)}; "
                         f"pass module=")
    (w,) = candidates.values()
    if w.ndim == 5:
        w = w[w.shape[0] // 2]
    c = w.shape[-1]
    columns = math.ceil(math.sqrt(c))
    fig, axes = _figure(columns, math.ceil(c / columns), (FILTER_PX, FILTER_PX))
    for i, ax in enumerate(axes.flat[:c]):
        tile = w[..., i].astype(np.float64)
        span = tile.max() - tile.min()
        tile = (tile - tile.min()) / span if span > 0 else np.full_like(tile, 0.5)
        ax.imshow(tile, interpolation="nearest")
    fig.subplots_adjust(0.02, 0.02, 0.98, 0.98, 0.1, 0.1)
    return _save(fig, path)


# ---------------------------------------------------------------------------------------------
# Training curves


def read_metrics(metrics_jsonl_path: str) -> dict[str, tuple[list[int], list[float]]]:
    """{scalar: (steps, values)} from a run's metrics.jsonl (training/metrics.py writes one JSON
    object per line: "step" and the scalars reported then; train and eval lines differ)."""
    series: dict[str, tuple[list[int], list[float]]] = {}
    with open(metrics_jsonl_path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            record = json.loads(line)
            if "step" not in record:
                raise ValueError(f"{metrics_jsonl_path}:{number}: no 'step' in {line.strip()!r}")
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    steps, values = series.setdefault(key, ([], []))
                    steps.append(int(record["step"]))
                    values.append(float(value))
    return series


def training_curves(metrics_jsonl_path: str, path: str, keys=None) -> str:
    """One curve per scalar (`keys`, default all) against the step, CURVE_COLUMNS per row."""
    series = read_metrics(metrics_jsonl_path)
    if not series:
        raise ValueError(f"{metrics_jsonl_path} holds no scalars")
    keys = list(keys) if keys else sorted(series)
    unknown = [k for k in keys if k not in series]
    if unknown:
        raise ValueError(f"no scalar {unknown} in {metrics_jsonl_path}; it has {sorted(series)}")
    fig, axes = _figure(min(CURVE_COLUMNS, len(keys)), math.ceil(len(keys) / CURVE_COLUMNS),
                        CURVE_PX)
    for ax, key in zip(axes.flat, keys):
        ax.set_axis_on()
        steps, values = series[key]
        ax.plot(steps, values, marker="." if len(steps) < 50 else None)
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


def main(argv=None) -> None:
    from tools.export import load_variables

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for command in ("features", "kernels", "filters"):
        p = commands.add_parser(command)
        p.add_argument("name")
        p.add_argument("--out", required=True)
        p.add_argument("--weights", default=None,
                       help="a nets.weights .safetensors file or a PyTorch state dict")
        p.add_argument("--seed", type=int, default=0, help="random init without --weights")
        if command == "features":
            p.add_argument("--image", required=True, help=".npy [H, W, 3], normalised")
            p.add_argument("--layers", nargs="*", default=["stage1", "stage2", "stage3",
                                                         "stage4"])
            p.add_argument("-k", type=int, default=16)
        if command == "kernels":
            p.add_argument("--max-layers", type=int, default=16)
    p = commands.add_parser("curves")
    p.add_argument("metrics", help="a run's metrics.jsonl")
    p.add_argument("--out", required=True)
    p.add_argument("--keys", nargs="*", default=None)
    args = parser.parse_args(argv)

    if args.command == "curves":
        print(training_curves(args.metrics, args.out, args.keys))
        return
    params, state = load_variables(args.name, args.weights, None, args.seed)
    if args.command == "features":
        print(feature_maps(args.name, params, state, np.load(args.image), args.out,
                           tuple(args.layers), args.k))
    elif args.command == "kernels":
        print(format_statistics(kernel_statistics(params)))
        print(kernel_histograms(params, args.out, args.max_layers))
    else:
        print(first_layer_filters(params, args.out))


if __name__ == "__main__":
    main()
