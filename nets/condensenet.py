"""CondenseNet (Huang, Liu, van der Maaten, Weinberger 2018, "CondenseNet: An Efficient DenseNet
using Learned Group Convolutions"), as the authors' code (github ShichenLiu/CondenseNet:
models/condensenet.py for training, models/condensenet_converted.py for inference, layers.py).

A DenseNet whose dense layers are BN-ReLU-1x1 conv (to 4k) - BN-ReLU-3x3 group conv (to k),
with no conv in the transitions (2x2 average pooling only), a growth rate that doubles per block
and a stem that is one 3x3 conv (stride 2 on ImageNet, 1 on CIFAR). The 1x1 conv is a *learned
group convolution*: its outputs form G groups (output o belongs to group o mod G, the authors'
interleaving) and each group learns which 1 / C of the inputs it reads (C, the condensation
factor). The network has two forms, chosen by `condensed`:

- `condensed=False`, the training form (`LearnedGroupConv`): the 1x1 conv has its dense weight
  and a 0/1 mask per (input, group) kept in the model *state* (not trained). Training condenses
  it in C - 1 stages (`condense`, driven by the step count: `condensation_stage`), each dropping
  per group the I / C inputs (I the layer's inputs) of smallest L1 weight within the group, with
  a group-lasso penalty (`group_lasso`) while condensing; the second half of training optimises
  with the masks fixed.
- `condensed=True`, the inference form the authors convert to (their CondenseConv /
  CondenseLinear): each 1x1 conv gathers the inputs its groups kept, applies a BatchNorm over
  them and a standard grouped 1x1 conv, then the index permute (`layers.channel_shuffle`, the
  authors' ShuffleLayer) restores the interleaved output order; the classifier reads half of
  the pooled features. `convert` turns a trained model into this form with the same outputs.
  This is the registered default: its parameter counts are the paper's (4.8M / 2.9M for
  CondenseNet-74 with C = G = 4 / 8 on ImageNet, 0.52M for CondenseNet-86 on CIFAR-10; the
  authors' README repeats them) and equal the authors' converted networks'.

Which inputs each converted layer gathers is architecture, not a parameter: `selection`, the
pairs (layer path, input indices) that `convert` returns. Without it every group reads I / C
consecutive inputs (for C = G, a plain grouped conv) and the classifier every other feature:
the untrained inference network, whose shapes are those of every converted one.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

from nets import layers
from nets.records import ModelInfo, Preprocessing

# The authors' init: every conv N(0, sqrt(2 / (k * k * out_channels))) (He over fan-out, also
# for grouped convs); BN scale 1, offset 0; the classifier PyTorch's nn.Linear default, bias 0.
CONV_INIT = hk.initializers.VarianceScaling(2.0, "fan_out", "normal")
CLASSIFIER = "classifier"
# The fraction of the pooled features the converted classifier reads (the authors'
# CondensingLinear(model, 0.5): the half with the largest L1 weight over the classes).
CLASSIFIER_KEEP = 0.5
# The group lasso clamps each group's squared norm here before the square root (layers.py
# `lasso_loss`), so that a dropped (all-zero) group has a finite gradient.
LASSO_MIN = 1e-6


def _bn(opts, name):
    return layers.BatchNorm(opts["bn_decay"], opts["bn_eps"], name=name)


class LearnedGroupConv(hk.Module):
    """The training form's 1x1 learned group convolution: a dense 1x1 conv (`w`, (1, 1, I, O))
    whose weight is multiplied by the mask (state `mask`, (I, G), 1 where group g reads input
    i; output channel o is in group o mod G). The mask starts all ones; `condense` edits it."""

    def __init__(self, out_channels: int, groups: int, name: str):
        super().__init__(name=name)
        self.out_channels, self.groups = out_channels, groups

    def __call__(self, x):
        c_in = x.shape[-1]
        if self.out_channels % self.groups:
            raise ValueError(f"{self.module_name}: {self.out_channels} output channels do not "
                             f"divide into {self.groups} groups")
        w = hk.get_parameter("w", (1, 1, c_in, self.out_channels), jnp.float32, init=CONV_INIT)
        mask = hk.get_state("mask", (c_in, self.groups), jnp.float32, init=jnp.ones)
        w = w * jnp.tile(mask, (1, self.out_channels // self.groups))  # column o: group o % G
        return layers.conv(x, w.astype(x.dtype), padding=0)


def default_selection(in_channels: int, groups: int, condense_factor: int) -> tuple[int, ...]:
    """The inputs an untrained converted layer gathers, group after group: group g reads the
    I / C inputs from g * I / C on (cyclically)."""
    kept = in_channels // condense_factor
    return tuple((g * kept + j) % in_channels for g in range(groups) for j in range(kept))


def default_classifier_selection(num_features: int) -> tuple[int, ...]:
    """The features an untrained converted classifier reads: CLASSIFIER_KEEP of them, evenly
    spread (so that every dense layer's output is read, as after a real conversion)."""
    kept = int(num_features * CLASSIFIER_KEEP)
    return tuple(int(i) for i in np.linspace(0, num_features, kept, endpoint=False))


class DenseLayer(hk.Module):
    """BN-ReLU-(dropout)-1x1 learned group conv to bottleneck * k - BN-ReLU-3x3 group conv to k;
    returns the k new channels. Condensed: the 1x1 conv is gather - BN - ReLU - grouped conv -
    index permute (the authors' CondenseConv), over the inputs `selection` lists."""

    def __init__(self, growth_rate: int, selection: Sequence[int] | None,
                 opts: Mapping[str, Any], name: str):
        super().__init__(name=name)
        self.growth_rate, self.selection, self.opts = growth_rate, selection, opts

    def __call__(self, x, is_training: bool):
        o = self.opts
        width = o["bottleneck"] * self.growth_rate
        c_in = x.shape[-1]
        for what, n in (("groups_1x1", o["groups_1x1"]), ("condense_factor",
                                                           o["condense_factor"])):
            if c_in % n:
                raise ValueError(f"{self.module_name}: {c_in} input channels do not divide by "
                                 f"{what}={n}")
        if o["condensed"]:
            selection = self.selection or default_selection(c_in, o["groups_1x1"],
                                                            o["condense_factor"])
            if len(selection) % o["groups_1x1"] or not all(0 <= i < c_in for i in selection):
                raise ValueError(f"{self.module_name}: the selection must list, for each of the "
                                 f"{o['groups_1x1']} groups alike, inputs in [0, {c_in})")
            if tuple(selection) != tuple(range(c_in)):  # (C = G's default reads all in order)
                x = x[..., np.asarray(selection)]
        x = jax.nn.relu(_bn(o, "norm1")(x, is_training))
        if is_training and o["dropout_rate"] > 0:
            x = hk.dropout(hk.next_rng_key(), o["dropout_rate"], x)
        if o["condensed"]:
            x = layers.Conv(width, 1, padding=0, groups=o["groups_1x1"], w_init=CONV_INIT,
                            name="conv1")(x)
            x = layers.channel_shuffle(x, o["groups_1x1"])
        else:
            x = LearnedGroupConv(width, o["groups_1x1"], name="conv1")(x)
        x = jax.nn.relu(_bn(o, "norm2")(x, is_training))
        return layers.Conv(self.growth_rate, 3, groups=o["groups_3x3"], w_init=CONV_INIT,
                           name="conv2")(x)


class DenseBlock(hk.Module):
    """Dense layers `denselayer1`, ...; each reads the concatenation of the block's input and
    the earlier layers' outputs, which is also the block's output."""

    def __init__(self, growth_rate: int, selections: Sequence[Sequence[int] | None],
                 opts: Mapping[str, Any], name: str):
        super().__init__(name=name)
        self.growth_rate, self.selections, self.opts = growth_rate, selections, opts

    def __call__(self, x, is_training: bool):
        for j, selection in enumerate(self.selections, start=1):
            new = DenseLayer(self.growth_rate, selection, self.opts, name=f"denselayer{j}")(
                x, is_training)
            x = jnp.concatenate([x, new], axis=-1)
        return x


class CondenseNet(hk.Module):
    """CondenseNet. `__call__` gives logits (pooled features when num_classes=0); `features`
    one map per dense block: "stage{i}" is the output of block i (the concatenation, before the
    transition's pooling), the last after the final BN and ReLU. Strides 2, 4, 8, 16, 32 for the
    ImageNet networks (stem stride 2, five blocks), 1, 2, 4 for the CIFAR ones.

    Args:
      stages: dense layers per block ((4, 6, 8, 10, 8) for CondenseNet-74).
      growth_rates: k of each block ((8, 16, 32, 64, 128)); the stem has 2 * k_1 channels.
      groups_1x1: G, the groups of each learned 1x1 conv; groups_3x3: those of each 3x3 conv.
      condense_factor: C; each group of a 1x1 conv keeps 1 / C of its inputs after condensing.
      bottleneck: the 1x1 conv's width as a multiple of k (4).
      stem_stride: 2 (ImageNet) or 1 (CIFAR).
      dropout_rate: dropout on the 1x1 conv's input while training (the authors' option, 0).
      condensed: the inference form (True) or the training form with masks (False).
      selection: for the inference form, the pairs (layer path, indices) that `convert` gives:
        "denseblock{i}/denselayer{j}" -> the inputs of that 1x1 conv, group after group, and
        "classifier" -> the features the classifier reads; None: `default_selection` and
        `default_classifier_selection`.
    The final pooling is the global mean (the authors' AvgPool2d(7) at 224 px, (8) at 32 px).
    """

    def __init__(self, stages: Sequence[int] = (4, 6, 8, 10, 8),
                 growth_rates: Sequence[int] = (8, 16, 32, 64, 128), groups_1x1: int = 4,
                 groups_3x3: int = 4, condense_factor: int = 4, bottleneck: int = 4,
                 stem_stride: int = 2, dropout_rate: float = 0.0, condensed: bool = True,
                 selection: Sequence[tuple[str, Sequence[int]]] | None = None,
                 num_classes: int = 1000, in_channels: int = 3, bn_decay: float = 0.9,
                 bn_eps: float = 1e-5, name: str = "condensenet"):
        super().__init__(name=name)
        stages, growth_rates = tuple(stages), tuple(growth_rates)
        if not stages or len(stages) != len(growth_rates):
            raise ValueError(f"stages {stages!r} and growth_rates {growth_rates!r} must be "
                             f"non-empty and of the same length (one entry per dense block)")
        for option, value in (("groups_1x1", groups_1x1), ("groups_3x3", groups_3x3),
                              ("condense_factor", condense_factor), ("bottleneck", bottleneck),
                              ("stem_stride", stem_stride), *(("stages", n) for n in stages),
                              *(("growth_rates", k) for k in growth_rates)):
            if int(value) != value or value < 1:
                raise ValueError(f"{option} must hold positive integers, got {value!r}")
        if not 0 <= dropout_rate < 1:
            raise ValueError(f"dropout_rate must be in [0, 1), got {dropout_rate!r}")
        if selection is not None and not condensed:
            raise ValueError("selection describes the condensed (inference) form; the training "
                             "form (condensed=False) keeps its masks in the model state")
        self.stages, self.growth_rates, self.stem_stride = stages, growth_rates, stem_stride
        self.selection = dict(selection or ())
        self.num_classes, self.in_channels = num_classes, in_channels
        self.opts = dict(groups_1x1=groups_1x1, groups_3x3=groups_3x3, bottleneck=bottleneck,
                         condense_factor=condense_factor, dropout_rate=dropout_rate,
                         condensed=condensed, bn_decay=bn_decay, bn_eps=bn_eps)

    @hk.name_like("__call__")
    def features(self, images, is_training: bool) -> dict[str, jax.Array]:
        layers.check_images(images, self.module_name, self.in_channels)
        x = layers.Conv(2 * self.growth_rates[0], 3, self.stem_stride, w_init=CONV_INIT,
                        name="init_conv")(images)
        maps, last = {}, len(self.stages)
        for i, (num_layers, k) in enumerate(zip(self.stages, self.growth_rates), start=1):
            selections = [self.selection.get(f"denseblock{i}/denselayer{j}")
                          for j in range(1, num_layers + 1)]
            x = DenseBlock(k, selections, self.opts, name=f"denseblock{i}")(x, is_training)
            if i < last:
                maps[f"stage{i}"] = x
                x = layers.avg_pool(x, 2, 2)
        maps[f"stage{last}"] = jax.nn.relu(_bn(self.opts, "norm_last")(x, is_training))
        return maps

    def __call__(self, images, is_training: bool):
        x = self.features(images, is_training)[f"stage{len(self.stages)}"]
        x = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
        if self.opts["condensed"]:  # the converted classifier reads the features it kept
            kept = self.selection.get(CLASSIFIER) or default_classifier_selection(x.shape[-1])
            x = x[:, np.asarray(kept)]
        if not self.num_classes:
            return x
        return layers.Linear(self.num_classes, b_init=jnp.zeros, name=CLASSIFIER)(x)


# ----------------------------------------------------------------------------------------------
# Condensation and conversion: pure functions on the training form's (params, state).


def condensation_stage(step, total_steps: int, condense_factor: int):
    """The condensing stage at `step` of `total_steps` (int or traced): the authors' schedule
    (LearnedGroupConv._check_drop at progress step / total): stage s in 0..C-1 from progress
    s / (2 (C - 1)) on, so the C - 1 condensations split the first half of training and the
    second half optimises the condensed network. Integer arithmetic, so exact at every step."""
    if int(total_steps) < 1 or int(condense_factor) < 1:
        raise ValueError(f"total_steps ({total_steps}) and condense_factor ({condense_factor}) "
                         f"must be positive")
    last = condense_factor - 1
    if last == 0:
        return step * 0
    return jnp.minimum(last, (2 * last * step) // total_steps)


def learned_convs(state) -> list[str]:
    """The modules of the training form's learned group convs (those with a `mask`)."""
    return sorted(m for m, leaves in state.items() if "mask" in leaves)


def _group_view(w, mask):
    """The masked 1x1 weight as (inputs, outputs per group, groups): output o = m * G + g."""
    w = w.reshape(w.shape[-2:])
    c_in, groups = mask.shape
    return (w * jnp.tile(mask, (1, w.shape[-1] // groups))).reshape(c_in, -1, groups)


def _condensed_mask(w, mask, stage, condense_factor: int):
    c_in = mask.shape[0]
    importance = jnp.sum(jnp.abs(_group_view(w, mask)), axis=1)          # (I, G): L1 per group
    key = jnp.where(mask > 0, importance, -1.0)  # the inputs already dropped sort first
    rank = jnp.argsort(jnp.argsort(key, axis=0, stable=True), axis=0)    # ascending, per group
    dropped = c_in - jnp.sum(mask, axis=0).astype(jnp.int32)
    target = (c_in // condense_factor) * jnp.clip(stage, 0, condense_factor - 1)
    return (rank >= jnp.maximum(dropped, target)).astype(mask.dtype)


def condense(params, state, stage, *, condense_factor: int):
    """The model state with every learned group conv's mask condensed to `stage` (int or traced,
    0..C-1): each group keeps exactly I - stage * I / C of its I inputs, dropping the inputs of
    smallest L1 norm of the (masked) weights within the group (the authors' `_dropping`, ties to
    the lower index). Idempotent, and stages never undo: a mask past `stage` stays as it is, one
    several stages behind catches up at once (the same inputs as one stage at a time, since the
    weights do not change in between). Parameters are unchanged; the masked weights keep their
    values (the mask multiplies them in the forward pass)."""
    new_state = dict(state)
    for module in learned_convs(state):
        mask = state[module]["mask"]
        new_state[module] = {**state[module], "mask": _condensed_mask(
            params[module]["w"], mask, stage, condense_factor)}
    return new_state


def condensed_stage(state, condense_factor: int):
    """The stage the masks are at (the fewest inputs any group has dropped, in units of I / C);
    0 for a model without learned group convs."""
    stages = [jnp.min(mask.shape[0] - jnp.sum(mask, axis=0)) // (mask.shape[0] // condense_factor)
              for mask in (state[m]["mask"] for m in learned_convs(state))]
    return jnp.min(jnp.stack(stages)).astype(jnp.int32) if stages else jnp.int32(0)


def condensing(state, condense_factor: int):
    """Whether condensation is under way: some mask is short of the last stage, C - 1."""
    return condensed_stage(state, condense_factor) < condense_factor - 1


def group_lasso(params, state):
    """The group-lasso penalty of the learned group convs (the authors' `lasso_loss`, summed):
    over every conv, group g and input i, sqrt(max(sum over g's outputs of w_oi^2, 1e-6)), on the
    masked weights. Training adds lambda times this while condensing (stage < C - 1; the
    authors' code stops at stage G - 1, the same for their C = G networks)."""
    total = jnp.zeros((), jnp.float32)
    for module in learned_convs(state):
        squares = jnp.sum(jnp.square(_group_view(params[module]["w"], state[module]["mask"])),
                          axis=1)
        total = total + jnp.sum(jnp.sqrt(jnp.maximum(squares, LASSO_MIN)))
    return total


def _layer_path(module: str) -> str:
    """"condensenet/denseblock2/denselayer3/conv1" -> "denseblock2/denselayer3"."""
    return "/".join(p for p in module.split("/")[1:-1] if not p.startswith("~"))


def convert(params, state, classifier_keep: float = CLASSIFIER_KEEP):
    """The training form's (params, state) -> (params, state, selection) of the condensed form
    (`nets.transformed(name, selection=selection)`), which computes the same eval-mode
    function, up to the classifier: it keeps the `classifier_keep` of the pooled features with
    the largest L1 weight over the classes (the authors' CondensingLinear, which prunes after
    training and so changes the outputs unless classifier_keep=1).

    Per learned group conv: its groups' kept inputs (ascending, group after group) are the
    layer's selection; the BatchNorm before it takes their entries; the grouped conv's weight
    holds group g's outputs (o = m * G + g) contiguously, which the index permute puts back.
    Every group must keep the same number of inputs (any stage, not only the last)."""
    if not 0 < classifier_keep <= 1:
        raise ValueError(f"classifier_keep must be in (0, 1], got {classifier_keep!r}")
    convs = learned_convs(state)
    if not convs:
        raise ValueError("these are not the training form's variables: no learned group conv "
                         "has a mask (build the model with condensed=False)")
    new_params = {m: dict(v) for m, v in params.items()}
    new_state = {m: dict(v) for m, v in state.items()}
    selection = []
    for module in convs:
        mask = np.asarray(state[module]["mask"]) > 0
        c_in, groups = mask.shape
        kept = [np.flatnonzero(mask[:, g]) for g in range(groups)]
        if len({len(k) for k in kept}) != 1:
            raise ValueError(f"{module}: its groups keep different numbers of inputs "
                             f"({[len(k) for k in kept]}); condense before converting")
        w = np.asarray(params[module]["w"], np.float32)
        per_group = w.reshape(c_in, w.shape[-1] // groups, groups)
        new_params[module] = {"w": np.concatenate(
            [per_group[k, :, g] for g, k in enumerate(kept)], axis=1)[None, None]}
        index = np.concatenate(kept)
        norm = module.rsplit("/", 1)[0] + "/norm1"
        new_params[norm] = {k: np.asarray(v)[index] for k, v in params[norm].items()}
        new_state[norm] = {k: np.asarray(v)[index] for k, v in state[norm].items()}
        del new_state[module]["mask"]
        if not new_state[module]:
            del new_state[module]
        selection.append((_layer_path(module), tuple(int(i) for i in index)))
    heads = [m for m in params if m.rsplit("/", 1)[-1] == CLASSIFIER]
    for head in heads:
        w = np.asarray(params[head]["w"])
        importance = np.abs(w).sum(axis=1)
        keep = int(w.shape[0] * classifier_keep)
        index = np.sort(np.argsort(-importance, kind="stable")[:keep])
        new_params[head] = {**params[head], "w": w[index]}
        selection.append((CLASSIFIER, tuple(int(i) for i in index)))
    return new_params, new_state, tuple(selection)


# ----------------------------------------------------------------------------------------------
# Registered variants: the inference form (condensed=True), whose counts are the paper's. The
# figures are those of the authors' models/condensenet_converted.py, counted with PyTorch
# (parameters with the 1000-class head, without it, BN running means + variances).


def _imagenet_variant(c: int, counts) -> ModelInfo:
    with_head, no_head, bn_stats = counts
    return ModelInfo(
        name=f"condensenet74_c{c}_g{c}", family="condensenet", builder=CondenseNet,
        config=dict(stages=(4, 6, 8, 10, 8), growth_rates=(8, 16, 32, 64, 128), groups_1x1=c,
                    groups_3x3=c, condense_factor=c),
        reference="paper:CondenseNet (Huang et al. 2018) / ShichenLiu/CondenseNet",
        reference_params=with_head, reference_params_no_head=no_head,
        reference_bn_stat_elems=bn_stats, feature_strides=(2, 4, 8, 16, 32),
        classifier=CLASSIFIER)


# The authors' CIFAR-10 normalisation (main.py); 32 px images are evaluated whole.
CIFAR10_STATS = Preprocessing(mean=(0.4914, 0.4824, 0.4467), std=(0.2471, 0.2435, 0.2616),
                              crop_fraction=1.0)

VARIANTS = (
    _imagenet_variant(4, (4773944, 3740944, 63456)),   # the paper's 4.8M parameters
    _imagenet_variant(8, (2935416, 1902416, 63456)),   # the paper's 2.9M
    # CondenseNet-86 (C = G = 4) for CIFAR-10: 3 blocks of 14 layers (86 = 3 * 14 * 2 + 2);
    # 516202 parameters with its 10-class head (the paper's 0.52M; tests/test_condensenet.py).
    ModelInfo(name="condensenet86_cifar", family="condensenet", builder=CondenseNet,
              config=dict(stages=(14, 14, 14), growth_rates=(8, 16, 32), stem_stride=1),
              reference="paper:CondenseNet (Huang et al. 2018) / ShichenLiu/CondenseNet",
              train_size=32, test_size=32, preprocessing=CIFAR10_STATS,
              feature_strides=(1, 2, 4), classifier=CLASSIFIER,
              task_metadata=dict(num_classes=10)),
)
