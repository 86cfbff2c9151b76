"""NFNet F0-F7 and F0+-F7+ (Brock et al. 2021), exact to the official DeepMind code.

`../shared/reference/nfnet_spec.md` describes the reference; section numbers below point there.
Deliberate differences, each an option or invisible in outputs:
- The blocks after the first of each stage are identical in shape, so they run under
  `hk.layer_stack` (a scan) with their per-block constants (beta, stochastic-depth rate) as arrays:
  compile time no longer grows with depth. Their parameters are stacked along a leading axis;
  `nets.convert.from_nfnet_official` / `to_nfnet_official` convert to and from the flat layout.
- WSConv standardises its weight in float32 before casting it to the compute dtype (the official
  code standardises bf16 weights under its bf16 policy).
- `remat=True` rematerialises each block in the backward pass (memory for compute).
- On XLA:CPU, convs inside the scan compute their gradients as matmuls (`layers.conv`'s
  "cpu_loop" lowering): XLA:CPU's own conv gradients run 6-35x slower inside loops.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import haiku as hk
import jax
import jax.numpy as jnp

from nets import layers
from nets.records import ModelInfo, Preprocessing

# §5: gamma such that gamma * f(x) has unit second moment for x ~ N(0, 1) (official base.py).
GAMMA = {
    "identity": 1.0, "celu": 1.270926833152771, "elu": 1.2716004848480225,
    "gelu": 1.7015043497085571, "leaky_relu": 1.70590341091156,
    "log_sigmoid": 1.9193484783172607, "relu": 1.7139588594436646,
    "relu6": 1.7131484746932983, "selu": 1.0008515119552612, "sigmoid": 4.803835391998291,
    "silu": 1.7881293296813965, "soft_sign": 2.338853120803833,
    "softplus": 1.9203323125839233, "tanh": 1.5939117670059204,
}
GAMMA["gelu_exact"] = GAMMA["gelu"]  # timm's dm_nfnet: erf GELU with the tanh-GELU gamma
_FUNCTIONS = {
    "identity": lambda x: x, "celu": jax.nn.celu, "elu": jax.nn.elu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=True),  # the official jax.nn.gelu default
    "gelu_exact": lambda x: jax.nn.gelu(x, approximate=False),
    "leaky_relu": jax.nn.leaky_relu, "log_sigmoid": jax.nn.log_sigmoid, "relu": jax.nn.relu,
    "relu6": jax.nn.relu6, "selu": jax.nn.selu, "sigmoid": jax.nn.sigmoid, "silu": jax.nn.silu,
    "soft_sign": jax.nn.soft_sign, "softplus": jax.nn.softplus, "tanh": jnp.tanh,
}


# Where WSConv's eps goes: the official floor on N * var, or timm's eps added to var.
WS_CONVENTIONS = {"official": dict(eps=1e-4, eps_mode="floor"),
                  "timm": dict(eps=1e-5, eps_mode="add")}


def scaled_activation(name: str):
    if name not in GAMMA:
        raise ValueError(f"unknown NFNet activation {name!r}; known: {sorted(GAMMA)}")
    fn, gamma = _FUNCTIONS[name], GAMMA[name]
    return lambda x: fn(x) * gamma


@dataclasses.dataclass(frozen=True)
class BlockSpec:
    """One NF block's constants (§3.1, §3.2)."""

    stage: int
    index: int  # within the stage
    in_channels: int
    out_channels: int
    width: int  # of the grouped 3x3 convs: group_width * groups
    groups: int
    stride: int
    projection: bool  # shortcut through a 1x1 conv (first block of every stage)
    beta: float  # 1 / expected std of the block's input
    stochastic_depth_rate: float


def block_table(depths: Sequence[int], widths: Sequence[int], alpha: float = 0.2,
                stochastic_depth_rate: float = 0.25, width_multiplier: float = 1.0,
                expansion: float = 0.5, group_width: int = 128) -> list[BlockSpec]:
    """Every block's constants, in order; a pure function of the architecture."""
    specs, expected_std, total, index = [], 1.0, sum(depths), 0
    in_channels = widths[0] // 2  # the stem's output (not scaled by the width multiplier)
    for stage, (stage_width, depth, stage_stride) in enumerate(zip(widths, depths, (1, 2, 2, 2))):
        for i in range(depth):
            out_channels = int(stage_width * width_multiplier)
            # The bottleneck comes from the output width, rounded down to whole groups.
            groups = int(out_channels * expansion) // group_width
            if groups < 1:
                raise ValueError(f"stage {stage + 1} is narrower than one group of {group_width}")
            stride = stage_stride if i == 0 else 1
            specs.append(BlockSpec(
                stage=stage, index=i, in_channels=in_channels, out_channels=out_channels,
                width=groups * group_width, groups=groups, stride=stride,
                projection=stride > 1 or in_channels != out_channels, beta=1.0 / expected_std,
                stochastic_depth_rate=stochastic_depth_rate * index / total))
            in_channels, index = out_channels, index + 1
            if i == 0:  # a transition block re-normalises the signal through its shortcut
                expected_std = 1.0
            expected_std = math.sqrt(expected_std ** 2 + alpha ** 2)
    return specs


def _haiku_linear_init(shape, dtype):
    """hk.Linear's default: truncated normal with stddev 1/sqrt(fan_in)."""
    return hk.initializers.TruncatedNormal(1.0 / math.sqrt(shape[0]))(shape, dtype)


class NFBlock(hk.Module):
    """Pre-activation bottleneck with two grouped 3x3 convs, SE and SkipInit (§3.3)."""

    def __init__(self, spec: BlockSpec, alpha: float, se_ratio: float, activation: str,
                 ws_convention: str, in_loop: bool = False, name: str | None = None):
        super().__init__(name=name)
        self.spec, self.alpha, self.se_ratio = spec, alpha, se_ratio
        self.act = scaled_activation(activation)
        self.conv = functools.partial(layers.WSConv, **WS_CONVENTIONS[ws_convention],
                                      lowering="auto_in_loop" if in_loop else "auto")

    def __call__(self, x, beta, stochastic_depth_rate, is_training):
        spec = self.spec
        out = self.act(x) * beta
        if spec.projection:
            shortcut = out
            if spec.stride > 1:  # hk.avg_pool SAME: the padding is not averaged in
                shortcut = layers.avg_pool(out, 2, 2, ceil_mode=True, count_include_pad=False)
            shortcut = self.conv(spec.out_channels, 1, name="conv_shortcut")(shortcut)
        else:
            shortcut = x
        out = self.conv(spec.width, 1, name="conv0")(out)
        out = self.conv(spec.width, 3, spec.stride, groups=spec.groups,
                        name="conv1")(self.act(out))
        out = self.conv(spec.width, 3, groups=spec.groups, name="conv1b")(self.act(out))
        out = self.conv(spec.out_channels, 1, name="conv2")(self.act(out))
        hidden = max(1, int(spec.out_channels * self.se_ratio))
        out = 2.0 * layers.SqueezeExcite(hidden, w_init=_haiku_linear_init, name="se")(out)
        out = layers.stochastic_depth(out, stochastic_depth_rate, is_training, scale_at="none")
        skip_gain = hk.get_parameter("skip_gain", (), jnp.float32, init=jnp.zeros)
        return out * skip_gain.astype(out.dtype) * self.alpha + shortcut


class NFNet(hk.Module):
    """Normalizer-free network. `__call__` gives logits (pooled features when num_classes=0),
    `features` the four stage outputs (strides 4, 8, 16, 32), `signal_propagation` the average
    channel variance of the residual stream after every block (the paper's SPP).

    Args:
      depths, widths: blocks and output channels per stage (§1).
      alpha: residual branch scale; stochastic_depth_rate: the maximum rate, block i of N gets
        rate * i / N; drop_rate: dropout before the classifier (§6).
      activation: a name in GAMMA ("gelu" = tanh-approximate GELU, the official default);
      se_ratio: SE hidden units per output channel; width_multiplier scales the stage widths.
      ws_convention: "official" (eps 1e-4 floors N * var) or "timm" (eps 1e-5 added to var,
        timm's ScaledStdConv2d), see layers.WSConv.
      remat: rematerialise every block in the backward pass.
      scan_blocks: run the blocks after each stage's first as a scan (compile time independent
        of depth); False unrolls them (XLA:CPU runs a train step of F0 about 1.3x faster
        unrolled, see BENCHMARKS.md). Parameters are the same either way.
    """

    def __init__(self, depths: Sequence[int] = (1, 2, 6, 3),
                 widths: Sequence[int] = (256, 512, 1536, 1536), num_classes: int = 1000,
                 alpha: float = 0.2, stochastic_depth_rate: float = 0.25,
                 drop_rate: float = 0.2, activation: str = "gelu", se_ratio: float = 0.5,
                 width_multiplier: float = 1.0, final_conv_multiplier: float = 2.0,
                 ws_convention: str = "official", remat: bool = False,
                 scan_blocks: bool = True, in_channels: int = 3, name: str = "nfnet"):
        super().__init__(name=name)
        if ws_convention not in WS_CONVENTIONS:
            raise ValueError(f"ws_convention must be one of {sorted(WS_CONVENTIONS)}, "
                             f"got {ws_convention!r}")
        self.specs = block_table(depths, widths, alpha, stochastic_depth_rate, width_multiplier)
        self.depths, self.widths = tuple(depths), tuple(widths)
        self.num_classes, self.alpha, self.drop_rate = num_classes, alpha, drop_rate
        self.activation, self.act = activation, scaled_activation(activation)
        self.se_ratio, self.final_conv_multiplier = se_ratio, final_conv_multiplier
        self.remat, self.scan_blocks, self.in_channels = remat, scan_blocks, in_channels
        # Partials, not methods: a Haiku method call would add its name to the module paths.
        self._conv = functools.partial(layers.WSConv, **WS_CONVENTIONS[ws_convention])
        self._block = functools.partial(NFBlock, alpha=alpha, se_ratio=se_ratio,
                                        activation=activation, ws_convention=ws_convention)

    def _maybe_remat(self, block):
        # is_training (argument 3) is a Python bool, not an array.
        return hk.remat(block, static_argnums=(3,)) if self.remat else block

    @hk.name_like("__call__")
    def _stages(self, images, is_training: bool, collect_variance: bool = False):
        """[(stage output, per-block residual-stream variances)] for the four stages."""
        layers.check_images(images, self.module_name, self.in_channels)
        x = images
        for i, (channels, stride) in enumerate(zip((16, 32, 64), (2, 1, 1))):  # §2
            x = self.act(self._conv(channels, 3, stride, name=f"stem_conv{i}")(x))
        x = self._conv(self.widths[0] // 2, 3, 2, name="stem_conv3")(x)

        def variance(x):
            return jnp.mean(jnp.var(x.astype(jnp.float32), axis=(0, 1, 2)))

        outputs = []
        for stage in range(len(self.depths)):
            first, *rest = [s for s in self.specs if s.stage == stage]
            block = self._block(first, name=f"stage{stage + 1}_block0")
            x = self._maybe_remat(block)(x, first.beta, first.stochastic_depth_rate,
                                         is_training)
            variances = [variance(x)] if collect_variance else []
            if rest:
                def body(x, beta, rate, spec=rest[0]):
                    block = self._block(spec, in_loop=self.scan_blocks, name="block")
                    x = self._maybe_remat(block)(x, beta, rate, is_training)
                    return x, (variance(x) if collect_variance else None)

                per_block = (jnp.asarray([s.beta for s in rest], jnp.float32),
                             jnp.asarray([s.stochastic_depth_rate for s in rest], jnp.float32))
                # Unrolled blocks keep the stacked parameters and names of scanned ones. An
                # unroll beyond the length leaves a loop of zero trips and every block in the
                # remainder; unroll == length would keep them inside a one-trip loop, where
                # XLA:CPU's conv gradients are slow.
                unroll = 1 if self.scan_blocks else len(rest) + 1
                x, ys = hk.layer_stack(len(rest), with_per_layer_inputs=True, unroll=unroll,
                                       name=f"stage{stage + 1}_blocks")(body)(x, *per_block)
                if collect_variance:
                    variances.extend(ys)
            outputs.append((x, variances))
        return outputs

    def features(self, images, is_training: bool) -> dict[str, jax.Array]:
        return {f"stage{s + 1}": x for s, (x, _) in enumerate(self._stages(images, is_training))}

    def signal_propagation(self, images) -> jax.Array:
        """Average channel variance of the residual stream after each block (eval mode)."""
        return jnp.stack([v for _, vs in self._stages(images, False, True) for v in vs])

    def __call__(self, images, is_training: bool):
        x, _ = self._stages(images, is_training)[-1]
        x = self._conv(int(self.final_conv_multiplier * x.shape[-1]), 1, name="final_conv")(x)
        x = jnp.mean(self.act(x).astype(jnp.float32), axis=(1, 2))
        if is_training and self.drop_rate > 0:
            x = hk.dropout(hk.next_rng_key(), self.drop_rate, x)
        if self.num_classes:
            x = layers.Linear(self.num_classes, w_init=hk.initializers.RandomNormal(0.01),
                              b_init=jnp.zeros, name="linear")(x)
        return x


# ----------------------------------------------------------------------------------------------
# Names of the reference implementations.

_TIMM_BLOCK = {"conv0": "conv1", "conv1": "conv2", "conv1b": "conv2b", "conv2": "conv3",
               "conv_shortcut": "downsample.conv", "se": "attn_last"}


def torch_name(path: str, config: Mapping[str, Any]) -> str | list[str]:
    """Our dotted module path -> timm's dm_nfnet module name(s); a stacked module maps to one
    name per stacked block."""
    m = re.fullmatch(r"stem_conv(\d)", path)
    if m:
        return f"stem.conv{int(m[1]) + 1}"
    if path in ("final_conv", "linear"):
        return {"final_conv": "final_conv", "linear": "head.fc"}[path]
    m = re.fullmatch(r"stage(\d)_(block0|blocks\.block)((?:\.\w+)*)", path)
    if not m:
        raise KeyError(path)
    stage = int(m[1]) - 1
    inner = ".".join(_TIMM_BLOCK.get(p, p) for p in m[3].lstrip(".").split(".") if p)
    suffix = f".{inner}" if inner else ""
    if m[2] == "block0":
        return f"stages.{stage}.0{suffix}"
    return [f"stages.{stage}.{i}{suffix}" for i in range(1, config["depths"][stage])]


def official_name(path: str, config: Mapping[str, Any]) -> str | list[str]:
    """Our dotted module path -> the official code's module name(s) without "~" markers
    (e.g. "nf_block_3/conv1", "nf_block_3/squeeze_excite/linear_1")."""
    if re.fullmatch(r"stem_conv\d|final_conv|linear", path):
        return path
    m = re.fullmatch(r"stage(\d)_(block0|blocks\.block)((?:\.\w+)*)", path)
    if not m:
        raise KeyError(path)
    stage, depths = int(m[1]) - 1, config["depths"]
    renames = {"se": "squeeze_excite", "fc1": "linear", "fc2": "linear_1"}
    inner = "".join(f"/{renames.get(p, p)}" for p in m[3].lstrip(".").split(".") if p)
    first = sum(depths[:stage])  # global index of the stage's first block

    def block(index):  # Haiku names the first instance "nf_block", then "nf_block_1", ...
        return f"nf_block{f'_{index}' if index else ''}{inner}"

    if m[2] == "block0":
        return block(first)
    return [block(first + i) for i in range(1, depths[stage])]


# ----------------------------------------------------------------------------------------------
# Variants (§1, §9). reference_params from the spec's measured table; no BatchNorm.

TRAIN_TEST_SIZE = {0: (192, 256), 1: (224, 320), 2: (256, 352), 3: (320, 416),
                   4: (384, 512), 5: (416, 544), 6: (448, 576), 7: (480, 608)}
DROP_RATE = {0: 0.2, 1: 0.3, 2: 0.4, 3: 0.4, 4: 0.5, 5: 0.5, 6: 0.5, 7: 0.5}
RAND_AUGMENT_MAGNITUDE = {0: 5, 1: 10, 2: 10, 3: 15, 4: 15, 5: 15, 6: 15, 7: 15}  # 4 layers
WIDTHS, WIDTHS_PLUS = (256, 512, 1536, 1536), (384, 768, 2048, 2048)
PARAMS = {False: (71_489_284, 61_144_972), True: (118_824_516, 101_532_492)}  # F0, per k
# §14: eval resizes the whole image to test_size + 32 (bicubic) and centre-crops test_size.
_PREPROCESSING = {k: Preprocessing(crop_fraction=s[1] / (s[1] + 32), interpolation="bicubic",
                                   eval_preprocess="resize_crop_32", image_ops="tf")
                  for k, s in TRAIN_TEST_SIZE.items()}


def _variant(k: int, plus: bool) -> ModelInfo:
    widths = WIDTHS_PLUS if plus else WIDTHS
    total = PARAMS[plus][0] + k * PARAMS[plus][1]
    head = 2 * widths[-1] * 1000 + 1000
    train, test = TRAIN_TEST_SIZE[k]
    return ModelInfo(
        name=f"nfnet_f{k}{'plus' if plus else ''}", family="nfnet", builder=NFNet,
        config=dict(depths=tuple(d * (k + 1) for d in (1, 2, 6, 3)), widths=widths,
                    drop_rate=DROP_RATE[k]),
        reference=f"deepmind-research:nfnets F{k}{'+' if plus else ''}",
        reference_params=total, reference_params_no_head=total - head,
        reference_bn_stat_elems=0, train_size=train, test_size=test,
        preprocessing=_PREPROCESSING[k], classifier="linear", stacked_modules=r"stage\d_blocks\b",
        torch_name=torch_name, official_name=official_name)


VARIANTS = tuple(_variant(k, plus) for plus in (False, True) for k in range(8))

