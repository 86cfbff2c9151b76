"""Reference weights (or a training run) -> one .safetensors file that `nets.weights.load` reads.

    python -m tools.convert --from torch resnet50.pth --model resnet50 --out resnet50.safetensors
    python -m tools.convert --from keras mobilenet.h5 --model mobilenet_v1 --out mnv1.safetensors
    python -m tools.convert --from nfnet F0_flat.npz --model nfnet_f0 --out nfnet_f0.safetensors
    python -m tools.convert --from efficientdet efficientdet-d0 --model efficientdet_d0 \
        --out efficientdet_d0.safetensors
    python -m tools.convert --from checkpoint WORKDIR --out run.safetensors [--ema]

Sources: torch, a PyTorch state dict of the model's torchvision / timm reference (.pth / .pt,
read with `torch.load(weights_only=True)`, or .safetensors); keras, a keras.applications file
(.h5 or .keras); nfnet, a flat .npz (or .safetensors) of the official NFNet Haiku tree; checkpoint,
a workdir of `train.py`; efficientdet, an official google/automl EfficientDet checkpoint (a TF
checkpoint's directory or prefix, read with TensorFlow, or a flat .npz / .safetensors of
{variable name: array}): its ExponentialMovingAverage weights where it has them, as the official
evaluation (--ema: required). Nothing is unpickled: the official NFNet releases
("F0_haiku.npz") are dill pickles despite their suffix and are refused with the one-off command
that flattens them.
"""

from __future__ import annotations

import argparse
import inspect
import os
import sys
import zipfile

import numpy as np

import nets
from nets import convert, weights
from nets.registry import module_path
from training import weight_sources

_NFNET_PICKLE = (
    "{src} is a pickle, not an .npz archive: the official NFNet releases (F0_haiku.npz ...) are "
    "dill-pickled Haiku trees despite their suffix, and unpickling runs arbitrary code, so this "
    "tool does not. If you trust the file, flatten it once where dill is installed:\n"
    "  python -c \"import dill, numpy as np; t = dill.load(open('{src}', 'rb')); "
    "np.savez('flat.npz', **{{m + '/' + k: np.asarray(v) for m, d in t.items() "
    "for k, v in d.items()}})\"\nand pass flat.npz.")


def _read_npz(src: str) -> dict[str, np.ndarray]:
    if src.endswith(".safetensors"):
        from safetensors.numpy import load_file

        return load_file(src)
    if not zipfile.is_zipfile(src):
        raise ValueError(_NFNET_PICKLE.format(src=src))
    with np.load(src, allow_pickle=False) as archive:
        return {key: archive[key] for key in archive.files}


def _read_tf_checkpoint(src: str) -> dict[str, np.ndarray]:
    """{variable name: array} of a TF checkpoint (a directory with a `checkpoint` file, or a
    prefix such as efficientdet-d0/model)."""
    try:
        import tensorflow as tf
    except ImportError as e:
        raise ImportError(f"{src} is a TF checkpoint, which needs TensorFlow to read "
                          "(pip install tensorflow-cpu), or pass a flat .npz") from e
    if os.path.isdir(src):
        src = tf.train.latest_checkpoint(src) or src
    reader = tf.train.load_checkpoint(src)
    return {name: reader.get_tensor(name) for name in reader.get_variable_to_shape_map()}


def _keras_overrides(model: str, params) -> dict:
    """from_keras converts a "notop" MobileNetV3 file for pre_logits=False without returning
    that option; the saved file must record it to be loadable."""
    info = nets.model_info(model)
    if ("pre_logits" in inspect.signature(info.builder).parameters
            and not any(module_path(m) == "pre_logits" for m in params)):
        return {"pre_logits": False}
    return {}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m tools.convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--from", dest="source", required=True,
                        choices=("torch", "keras", "nfnet", "efficientdet", "checkpoint"))
    parser.add_argument("src", help="the weights file (or, for checkpoint, the workdir)")
    parser.add_argument("--model", help="a registered name (nets.list_models()); for "
                                        "checkpoint, the run's model")
    parser.add_argument("--out", required=True, help="the .safetensors file to write")
    parser.add_argument("--num-classes", type=int, default=None,
                        help="the head's width (default: the source's)")
    parser.add_argument("--ema", action="store_true",
                        help="checkpoint, efficientdet: the EMA weights")
    args = parser.parse_args(argv)
    if not (os.path.exists(args.src) or os.path.exists(f"{args.src}.index")):  # a TF prefix
        parser.error(f"no such file or directory: {args.src}")
    if args.source != "checkpoint" and not args.model:
        parser.error(f"--from {args.source} needs --model")
    if args.model:
        nets.model_info(args.model)  # an unknown name fails here, with close names
    if args.source == "checkpoint" and args.num_classes is not None:
        parser.error("--num-classes does not apply to a checkpoint (its head is what it is)")

    overrides: dict = {}
    model = args.model
    eval_preprocessing = class_names = None   # a reference's: the registry's preprocessing
    if args.source == "torch":
        source = weight_sources.read(args.src, model=model, num_classes=args.num_classes)
        params, state = source.params, source.state
    elif args.source == "keras":
        params, state = convert.from_keras(model, args.src, args.num_classes)
        overrides = _keras_overrides(model, params)
    elif args.source == "nfnet":
        params, state = convert.from_nfnet_official(model, _read_npz(args.src), args.num_classes)
    elif args.source == "efficientdet":
        tensors = (_read_npz(args.src) if args.src.endswith((".npz", ".safetensors"))
                   else _read_tf_checkpoint(args.src))
        params, state = convert.from_efficientdet_official(model, tensors, args.num_classes,
                                                           ema=args.ema or None)
    else:
        source = weight_sources.read(args.src, ema=args.ema)
        if model and model != source.model:
            parser.error(f"{args.src} holds a {source.model} run, not {model}")
        model, overrides = source.model, source.overrides
        params, state = source.params, source.state
        # The file evaluates as the run did, and names its classes where the data is here.
        eval_preprocessing = source.eval_preprocessing
        class_names = weight_sources.dataset_class_names(source)

    metadata = {"source": f"{args.source}:{os.path.basename(args.src)}"}
    weights.save(args.out, params, state, model=model, overrides=overrides, metadata=metadata,
                 eval_preprocessing=eval_preprocessing, class_names=class_names)
    meta = weights.read_metadata(args.out)
    summary = {"model": model, "num_classes": meta["num_classes"], "overrides": overrides,
               "tensors": sum(len(leaves) for tree in (params, state) for leaves in tree.values()),
               "parameters": sum(int(np.prod(np.shape(v))) for leaves in params.values()
                                 for v in leaves.values()),
               "out": args.out}
    options = "".join(f", {k}={v!r}" for k, v in overrides.items())
    print(f"wrote {args.out}: {model} (num_classes={summary['num_classes']}{options}), "
          f"{summary['tensors']} tensors, {summary['parameters']:,} parameters")
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
