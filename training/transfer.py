"""Transfer learning: start a run from other weights and freeze chosen parts of the model.

    source = training.weight_sources.read("runs/resnet50-local")   # or a weights file
    loaded = transfer.merge(params, state, source, head=nets.head_module("resnet50"))
    frozen_params, frozen_state = transfer.frozen_masks(("conv1", "bn1", "layer1_"), params, state)

`merge` loads non-strictly, as torch's `load_state_dict(strict=False)` does: every leaf of the
model that the source has under the same Haiku path and shape is taken (parameters and BatchNorm
statistics alike), the others keep their fresh init. So resnet50 weights start a gcnet_resnet50,
whose GC blocks stay fresh: the fine-tuning GCNet (Cao et al. 2019) does from a trained ResNet-50.
The classifier keeps its fresh init when asked (`reset_head`) or when its shape differs (another
num_classes); any other shape mismatch means the source is another architecture, an error.

Freezing matches regular expressions (`re.match`) against module paths without the root
(`nets.registry.module_path`: "layer1_0.conv1"); e.g. ("conv1", "bn1", "layer1_") is ResNet's
stem and stage 1, mmdetection's `frozen_stages=1` that GCNet's detection configs use. The
optimizer zeroes the updates of frozen leaves (`training.optimizers.optimizer(frozen=...)`) and
the train step keeps their BatchNorm running statistics (and EMA); frozen BatchNorm layers still
normalise with the batch's statistics in training, unless config.bn_eval (mmdetection's
`norm_eval=True`: every BatchNorm uses its running statistics, `nets.layers.batch_norm_eval`).

A detector starts from its backbone classifier's weights (`as_backbone`; the registry row's
`backbone`, e.g. efficientnet_b0 for efficientdet_d0): config.init_from names them, the rest
of the detector starts fresh.
"""

from __future__ import annotations

import re
from typing import NamedTuple

import numpy as np

import nets
from nets.registry import module_path
from training import weight_sources

_SHOWN = 5   # names listed in a log line or error; whole lists can be hundreds long


class Loaded(NamedTuple):
    """What `merge` did: the merged trees, the number of leaves taken from the source, the names
    ("params/<module>/<leaf>") of the model's leaves that kept their fresh init because the
    source lacks them (`missing`), why the head kept its fresh init (None when it was loaded),
    and the names of the source's arrays the model has no place for (`unexpected`)."""

    params: dict
    state: dict
    loaded: int
    total: int
    missing: list[str]
    head_fresh: str | None
    unexpected: list[str]

    def summary(self) -> str:
        parts = [f"loaded {self.loaded} of {self.total} arrays (parameters and BN statistics)"]
        if self.head_fresh:
            parts.append(f"the head keeps its fresh init ({self.head_fresh})")
        if self.missing:
            parts.append(f"fresh, not in the source ({len(self.missing)}): {_few(self.missing)}")
        if self.unexpected:
            parts.append(f"ignored from the source ({len(self.unexpected)}): "
                         f"{_few(self.unexpected)}")
        return "; ".join(parts)


def _few(names: list[str]) -> str:
    return ", ".join(names[:_SHOWN]) + (", ..." if len(names) > _SHOWN else "")


def merge(params, state, source: weight_sources.Source, *, head: str | None,
          reset_head: bool = False) -> Loaded:
    """`params` and `state` (a fresh init) with every leaf the source has at the same path and
    shape replaced by the source's (as numpy arrays of the fresh leaf's dtype). `head` is the
    classifier's module path (nets.head_module); it keeps its fresh init when
    `reset_head` or when its shape differs. Any other shape mismatch is a ValueError naming the
    leaves."""
    loaded, missing, mismatched, head_shapes = 0, [], [], None

    def fill(collection, fresh, found):
        nonlocal loaded, head_shapes
        out = {}
        for module, leaves in fresh.items():
            out[module] = {}
            for leaf, value in leaves.items():
                name = f"{collection}/{module}/{leaf}"
                theirs = found.get(module, {}).get(leaf)
                out[module][leaf] = value
                if theirs is None:
                    if module != head or not reset_head:
                        missing.append(name)
                elif module == head and (reset_head or np.shape(theirs) != np.shape(value)):
                    if leaf == "w" and np.shape(theirs) != np.shape(value):
                        head_shapes = (np.shape(theirs), np.shape(value))
                elif np.shape(theirs) != np.shape(value):
                    mismatched.append(f"{name}: source {tuple(np.shape(theirs))} vs model "
                                      f"{tuple(np.shape(value))}")
                else:
                    out[module][leaf] = np.asarray(theirs, dtype=value.dtype)
                    loaded += 1
        return out

    new_params, new_state = fill("params", params, source.params), fill("state", state,
                                                                         source.state)
    if mismatched:
        raise ValueError(nets.introspect.mismatch_report(
            f"{source.description} does not fit this model beyond its head (only the "
            f"classifier {head} may change shape):", mismatched=mismatched))
    unexpected = sorted(f"{collection}/{module}/{leaf}"
                        for collection, theirs, ours in (("params", source.params, params),
                                                         ("state", source.state, state))
                        for module, leaves in theirs.items() for leaf in leaves
                        if leaf not in ours.get(module, {}))
    head_fresh = None
    if head is not None and head in params:
        if reset_head:
            head_fresh = "reset_head"
        elif head_shapes is not None:
            head_fresh = (f"{head}/w is {tuple(head_shapes[0])} in the source, "
                          f"{tuple(head_shapes[1])} here")
    total = sum(len(leaves) for tree in (params, state) for leaves in tree.values())
    return Loaded(new_params, new_state, loaded, total, missing, head_fresh, unexpected)


def as_backbone(source: weight_sources.Source, params, state, module: str = "backbone"
                ) -> weight_sources.Source:
    """A classifier's weights re-rooted under the model's `module` (a detector's backbone,
    e.g. efficientnet_b0 -> efficientdet_d0's "backbone"), for `merge`: each source module goes
    where the model has a module at `module` + its path; the rest (the classifier's head and
    top) keeps its own name, so `merge` lists it as unexpected."""
    ours = {module_path(m): m for tree in (params, state) for m in tree}

    def reroot(tree):
        return {ours.get(f"{module}.{module_path(m)}", m): leaves for m, leaves in tree.items()}

    return source._replace(params=reroot(source.params), state=reroot(source.state),
                           description=f"{source.description} as the {module}")


class Masks(NamedTuple):
    """True for each frozen leaf of the parameters and of the model state."""

    params: dict
    state: dict


def frozen_masks(patterns, params, state) -> Masks:
    """(params mask, state mask): True for every leaf of a module whose path without the root
    matches one of `patterns` (re.match). A pattern that matches no module is a ValueError that
    shows what the paths look like."""
    patterns = tuple(patterns)
    compiled = []
    for pattern in patterns:
        try:
            compiled.append(re.compile(pattern))
        except re.error as e:
            raise ValueError(f"freeze pattern {pattern!r} is not a regular expression: {e}"
                             ) from None
    paths = sorted({module_path(m) for m in (*params, *state)})
    unmatched = [p for p, c in zip(patterns, compiled, strict=True)
                 if not any(c.match(path) for path in paths)]
    if unmatched:
        tops = sorted({path.split(".")[0] for path in paths})
        example = next((path for path in paths if "." in path), paths[0])
        raise ValueError(
            f"freeze pattern(s) {unmatched} match no module (re.match on the module path "
            f"without the root); the top-level modules are {', '.join(tops[:12])}"
            f"{', ...' if len(tops) > 12 else ''} and nested paths look like {example!r}")

    def mask(tree):
        return {m: {leaf: any(c.match(module_path(m)) for c in compiled) for leaf in leaves}
                for m, leaves in tree.items()}

    return Masks(mask(params), mask(state))
