"""A per-module summary of a registered model: output shape, parameters and multiply-adds.

    python -m tools.summary resnet50 [--size 224] [--num-classes N (default: the variant's)]

    from tools.summary import summary, format_table
    print(format_table(summary("resnet50")))

The module walk is Haiku's own (`hk.experimental.eval_summary`, which traces under
`jax.eval_shape`: nothing is computed). Multiply-adds are those of convs,
deformable convs and dense layers (norms, activations, pools and bilinear sampling are not
counted), each charged to the module that calls the conv or owns the dense layer; the table's
total is `bench.inference.multiply_adds`.
Parameters are the ones a module owns directly (not its children's), so the rows add up to the
model's total.

Blocks stacked under `hk.layer_stack` (NFNet stages) have one row for the whole stack: its
parameters and MACs are all the stacked blocks', its output shape one block's (the total is the
reference's, e.g. 6.977 GMACs for NFNet-F0 at 192 px as params.json gives).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from unittest import mock

import haiku as hk
import jax

import nets
from nets import deformable, layers
from nets.registry import module_path


@dataclasses.dataclass(frozen=True)
class Row:
    """One module of the model, in call order. `module` is the dotted path without the root
    (the names weight conversion uses); the root's row carries the Haiku name of the model."""

    module: str
    kind: str  # the module's class
    output_shapes: tuple[tuple[int, ...], ...]  # one shape per array the call returned
    params: int  # parameters owned by this module itself
    macs: int  # multiply-adds of this module's own convs / dense layers, one example


def _shapes(tree) -> tuple[tuple[int, ...], ...]:
    leaves = jax.tree.leaves(tree, is_leaf=lambda x: hasattr(x, "shape"))
    return tuple(tuple(leaf.shape) for leaf in leaves if hasattr(leaf, "shape"))


class _Counter:
    """Multiply-adds per module, counted while the forward is traced.

    eval_summary traces init, then apply; only the apply trace is counted (`phase`, set by the
    forward itself). It traces under `jax.disable_jit`, where `lax.scan` runs its body once per
    step, so the blocks of an `hk.layer_stack` are each counted. Inside a stack, module names
    are relative to the stack's own transform: counts are keyed by (stack number, name).
    """

    def __init__(self):
        self.phase = "init"
        self.macs: dict[tuple[int | None, str], int] = {}
        self.stacks: list[int] = []  # the numbers of the layer stacks being traced
        self.num_stacks = 0

    def add(self, where: str, count: int) -> None:
        if self.phase != "apply":
            return
        stack = self.stacks[-1] if self.stacks else None
        self.macs[stack, where] = self.macs.get((stack, where), 0) + count

    def patches(self):
        conv, linear, deform = layers.conv, layers.Linear.__call__, deformable.deform_conv
        layer_stack = hk.layer_stack

        def counting(fn):
            def counted(x, w, *args, **kwargs):
                y = fn(x, w, *args, **kwargs)
                # Per example (the batch is 1): out pixels x k x k x C_in / groups x C_out.
                self.add(hk.experimental.current_name(),
                         math.prod(y.shape[1:]) * math.prod(w.shape[:-1]))
                return y
            return counted

        def counting_linear(module, x):
            y = linear(module, x)
            self.add(module.module_name, x.shape[-1] * y.shape[-1])
            return y

        def stack(num_layers, *args, **kwargs):
            decorate = layer_stack(num_layers, *args, **kwargs)

            def wrap(fn):
                stacked = decorate(fn)

                def call(*a, **k):
                    if self.phase == "apply":
                        self.stacks.append(self.num_stacks)
                        self.num_stacks += 1
                    try:
                        return stacked(*a, **k)
                    finally:
                        if self.phase == "apply":
                            self.stacks.pop()
                return call
            return wrap

        return (mock.patch.object(layers, "conv", counting(conv)),
                mock.patch.object(deformable, "deform_conv", counting(deform)),
                mock.patch.object(layers.Linear, "__call__", counting_linear),
                mock.patch.object(hk, "layer_stack", stack))


def summary(name: str, size: int | None = None, num_classes: int | None = None,
            **overrides) -> list[Row]:
    """Rows for every module of the variant's eval-mode forward on one image (one clip for
    video models) of `size` pixels (default: the variant's train size), in call order."""
    info = nets.model_info(name)  # unknown names raise a ValueError that lists close ones
    nets.check_overrides(info, overrides)
    images = nets.introspect.example_images(name, 1, size, **overrides)
    counter = _Counter()

    def forward(x):
        counter.phase = "init" if hk.running_init() else "apply"
        return nets.create(name, num_classes, **overrides)(x, is_training=False)

    patches = counter.patches()
    with patches[0], patches[1], patches[2], patches[3]:
        invocations = hk.experimental.eval_summary(forward)(images)
        params, _ = jax.eval_shape(
            lambda x: hk.transform_with_state(forward).init(jax.random.key(0), x), images)

    # Module names: inside a layer stack they are relative to the stack (they do not start
    # with the root's name); the stack's LiftingModule call comes just before its layers'.
    root = invocations[0].module_details.module.module_name
    stack_names: list[str] = []

    def resolve(module_name: str) -> tuple[str, int | None]:
        if module_name == root or module_name.startswith(root + "/") or not stack_names:
            return module_name, None
        return f"{stack_names[-1]}/{module_name}", len(stack_names) - 1

    # One row per module: its first __call__ (helper methods of the root such as `features`
    # also show up as invocations), else its first call.
    chosen: dict[str, object] = {}
    key_of: dict[tuple[int | None, str], str] = {}
    for inv in invocations:
        module = inv.module_details.module
        full, stack = resolve(module.module_name)
        if type(module).__name__ == "LiftingModule":
            stack_names.append(full)
        key_of[stack, module.module_name] = full
        if full not in chosen or (inv.module_details.method_name == "__call__"
                                  and chosen[full].module_details.method_name != "__call__"):
            chosen[full] = inv  # the dict keeps the order of each module's first call

    # MACs land on the module whose scope ran the conv; a scope without a row of its own
    # (a plain function's name scope) is charged to its nearest ancestor that has one.
    macs_by_module: dict[str, int] = {}
    for (stack, where), count in counter.macs.items():
        owner = where
        while (stack, owner) not in key_of and "/" in owner:
            owner = owner.rsplit("/", 1)[0]
        if (stack, owner) not in key_of:
            raise RuntimeError(f"multiply-adds counted in scope {where!r}, which is inside no "
                               f"module of {name}")
        full = key_of[stack, owner]
        macs_by_module[full] = macs_by_module.get(full, 0) + count

    unclaimed = sorted(set(params) - set(chosen))
    if unclaimed:
        raise RuntimeError(f"parameters of {name} in modules the summary did not see: "
                           f"{', '.join(unclaimed[:5])}")
    # A stack's LiftingModule returns the stacked parameters, not activations.
    lifting = {k for k, inv in chosen.items()
               if type(inv.module_details.module).__name__ == "LiftingModule"}
    return [Row(module=module_path(key) or key,
                kind="layer_stack" if key in lifting else type(inv.module_details.module).__name__,
                output_shapes=() if key in lifting else _shapes(inv.output_spec),
                params=sum(math.prod(v.shape) for v in params.get(key, {}).values()),
                macs=macs_by_module.get(key, 0))
            for key, inv in chosen.items()]


def totals(rows: list[Row]) -> tuple[int, int]:
    """(parameters, multiply-adds) of the whole model."""
    return sum(r.params for r in rows), sum(r.macs for r in rows)


def _format_shapes(shapes) -> str:
    return ", ".join("x".join(map(str, s)) for s in shapes) or "-"


def format_table(rows: list[Row]) -> str:
    """A plain-text table with a totals line."""
    header = ("module", "kind", "output", "params", "MACs")
    body = [(r.module, r.kind, _format_shapes(r.output_shapes), f"{r.params:,}", f"{r.macs:,}")
            for r in rows]
    params, macs = totals(rows)
    foot = ("total", "", "", f"{params:,}", f"{macs:,}")
    widths = [max(len(line[i]) for line in (header, *body, foot)) for i in range(5)]

    def fmt(line):
        left = [c.ljust(w) for c, w in zip(line[:3], widths[:3])]
        right = [c.rjust(w) for c, w in zip(line[3:], widths[3:])]
        return "  ".join(left + right).rstrip()

    rule = "-" * len(fmt(tuple("-" * w for w in widths)))
    return "\n".join([fmt(header), rule, *map(fmt, body), rule, fmt(foot),
                      f"{macs / 1e9:.3f} GMACs per example, {params / 1e6:.3f} M parameters"])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("name", help="a registered model (python -c 'import nets; "
                                     "print(nets.list_models())')")
    parser.add_argument("--size", type=int, default=None,
                        help="input pixels (default: the model's train size)")
    parser.add_argument("--num-classes", type=int, default=None,
                        help="default: ImageNet's 1000, a COCO detector's 90")
    args = parser.parse_args(argv)
    if args.size is not None and args.size <= 0:
        parser.error(f"--size must be positive, got {args.size}")
    print(format_table(summary(args.name, args.size, args.num_classes)))


if __name__ == "__main__":
    main()
