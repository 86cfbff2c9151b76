"""ResNet-family outputs equal torchvision's and timm's on converted weights (random init with
BN statistics randomised, eval mode), for logits and the four stage maps."""

import functools

import jax
import numpy as np
import pytest

import nets
from tests import reference
from tests.helpers import jitted_apply, jitted_logits_and_features, random_images

SIZE = 64  # small, to keep compiles cheap; every layer still sees a >= 2x2 map


def _timm(name, **kwargs):
    return lambda: reference.timm().create_model(name, **kwargs)


def _timm_global_context(**kwargs):
    from timm.layers import GlobalContext

    return functools.partial(GlobalContext, **kwargs)


SHALLOW = dict(layers=(1, 1, 1, 1))  # one block per stage where the block is what is tested
# case: (our variant, its overrides, the reference model)
REFERENCES = {
    "resnet18": ("resnet18", {}, lambda: reference.torchvision().models.resnet18()),
    # resnet34: basic blocks at depths (3, 4, 6, 3), several per stage after the downsampling one
    "resnet34": ("resnet34", {}, lambda: reference.torchvision().models.resnet34()),
    "resnet50": ("resnet50", {}, lambda: reference.torchvision().models.resnet50()),
    "resnext50_32x4d": ("resnext50_32x4d", {},
                        lambda: reference.torchvision().models.resnext50_32x4d()),
    "seresnet50": ("seresnet50", {}, _timm("seresnet50")),
    "resnet50d": ("resnet50d", {}, _timm("resnet50d")),
    "resnest14d": ("resnest14d", {}, _timm("resnest14d")),
    "resnest50d": ("resnest50d", {}, _timm("resnest50d")),
    "skresnext50_32x4d": ("skresnext50_32x4d", {}, _timm("skresnext50_32x4d")),
    "cbam_resnet50": ("cbam_resnet50", {}, _timm("resnet50", block_args=dict(attn_layer="cbam"))),
    "gcresnet50t": ("gcresnet50t", {}, _timm("gcresnet50t")),
    # The SK basic block with split inputs; ResNeSt with one split (a sigmoid gate), 4 groups
    # and the pool before the 3x3; GC blocks after every block's last BN (timm's LayerNorm eps).
    "skresnet18-shallow": ("skresnet18", SHALLOW, _timm("skresnet18", layers=[1, 1, 1, 1])),
    "resnest50d_1s4x24d-shallow": ("resnest50d_1s4x24d", SHALLOW,
                                   _timm("resnest50d_1s4x24d", layers=[1, 1, 1, 1])),
    "gc-all-stages-shallow": (
        "gcnet_resnet50", dict(attention_stages=(1, 2, 3, 4), gc_layer_norm_eps=1e-6, **SHALLOW),
        lambda: reference.timm().create_model("resnet50", layers=[1, 1, 1, 1], block_args=dict(
            attn_layer=_timm_global_context(fuse_add=True, fuse_scale=False, rd_ratio=1 / 16)))),
}


def _reference_model(case, **kwargs):
    torch = reference.torch()
    torch.manual_seed(0)
    model = REFERENCES[case][2](**kwargs) if kwargs else REFERENCES[case][2]()
    reference.randomize_batchnorm(model.eval())
    with torch.no_grad():  # zero-initialised layers (GC's last conv) would hide their path
        for param in model.parameters():
            if not param.any():
                param.copy_(torch.randn_like(param) * 0.1)
    return model


def _stages(model):
    if hasattr(model, "layer1"):
        return [getattr(model, f"layer{i}") for i in range(1, 5)]
    return list(model.stages)  # timm's ByobNet


def _run_reference(model, images):
    """Logits and the outputs of the four stages (forward hooks)."""
    torch = reference.torch()
    maps = {}
    hooks = [stage.register_forward_hook(
        lambda m, inp, out, i=i: maps.__setitem__(f"stage{i}", out.numpy().transpose(0, 2, 3, 1)))
        for i, stage in enumerate(_stages(model), start=1)]
    with torch.no_grad():
        logits = model(torch.from_numpy(images.transpose(0, 3, 1, 2))).numpy()
    for hook in hooks:
        hook.remove()
    return logits, maps


@pytest.mark.parametrize("case", sorted(REFERENCES))
def test_logits_and_stage_maps_equal_the_reference(case):
    name, overrides, _ = REFERENCES[case]
    model = _reference_model(case)
    images = random_images(2, SIZE)
    ref_logits, ref_maps = _run_reference(model, images)
    params, state = nets.convert.from_torch(name, model.state_dict(), **overrides)
    (logits, maps), _ = jitted_logits_and_features(name, **overrides)(params, state, None,
                                                                      images)
    assert np.abs(ref_logits).max() > 0.1  # a meaningful comparison, not of zeros
    np.testing.assert_allclose(logits, ref_logits, atol=1e-4, rtol=0)
    for stage, ref_map in ref_maps.items():
        np.testing.assert_allclose(maps[stage], ref_map, atol=1e-4, rtol=1e-4,
                                   err_msg=stage)


@pytest.mark.parametrize("case", ["resnet18", "resnest14d", "skresnet18-shallow"])
def test_training_mode_outputs_and_running_statistics_equal_the_reference(case):
    """Batch statistics everywhere, including the BNs inside split and selective-kernel
    attention, which see one pooled value per image."""
    torch = reference.torch()
    name, overrides, _ = REFERENCES[case]
    model = _reference_model(case).train()
    images = random_images(4, 32, seed=3)
    params, state = nets.convert.from_torch(name, model.state_dict(), **overrides)
    logits, new_state = jitted_apply(name, **overrides)(params, state, None, images,
                                                        is_training=True)
    with torch.no_grad():
        ref = model(torch.from_numpy(images.transpose(0, 3, 1, 2))).numpy()
    np.testing.assert_allclose(logits, ref, atol=1e-4)
    _, ref_state = nets.convert.from_torch(name, model.state_dict(), **overrides)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5),
                 new_state, ref_state)


def test_dilated_resnet50_equals_torchvision():
    tv = reference.torchvision()
    torch = reference.torch()
    torch.manual_seed(0)
    model = tv.models.resnet50(replace_stride_with_dilation=[False, True, True]).eval()
    reference.randomize_batchnorm(model)
    images = random_images(1, 32)
    ref_logits, _ = _run_reference(model, images)
    dilate = (False, True, True)
    params, state = nets.convert.from_torch("resnet50", model.state_dict(),
                                            replace_stride_with_dilation=dilate)
    logits, _ = jitted_apply("resnet50", replace_stride_with_dilation=dilate)(
        params, state, None, images, is_training=False)
    np.testing.assert_allclose(logits, ref_logits, atol=1e-4)


def test_conversion_infers_num_classes_and_accepts_a_dataparallel_prefix():
    torch = reference.torch()
    model = reference.torchvision().models.resnet18(num_classes=7)
    state_dict = {f"module.{k}": v for k, v in model.state_dict().items()}
    params, _ = nets.convert.from_torch("resnet18", state_dict)
    assert params["resnet/fc"]["w"].shape == (512, 7)
    np.testing.assert_array_equal(params["resnet/fc"]["w"], model.fc.weight.detach().numpy().T)
    no_head = {k: v for k, v in model.state_dict().items() if not k.startswith("fc.")}
    params, _ = nets.convert.from_torch("resnet18", no_head)
    assert "resnet/fc" not in params
    del torch


def test_conversion_of_another_models_weights_lists_what_does_not_fit():
    tv = reference.torchvision()
    with pytest.raises(ValueError) as error:
        nets.convert.from_torch("resnet50", tv.models.resnet18().state_dict())
    message = str(error.value)
    assert "cannot convert this state dict into resnet50" in message
    assert "missing" in message and "layer1.0.conv3.weight" in message
    assert "shape mismatch" in message and "layer1.0.conv1.weight" in message
    with pytest.raises(ValueError, match=r"unexpected \(\d+\): .*layer1.0.bn3.bias"):
        nets.convert.from_torch("resnet18", tv.models.resnet50().state_dict())
