"""The config schema every experiment fills in, and the `:local` shrink.

An experiment file defines `get_config(arg)` and returns a ConfigDict built from `base()`; the
trainer locks it, so `--config.field=value` can change a field but never add one (a mistyped key
is an error with a suggestion).
"""

from __future__ import annotations

import ml_collections

from nets.registry import BIAS, CLASSIFIER_BIAS, CLASSIFIER_WEIGHT, GAIN, WEIGHT

IMAGENET_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
IMAGENET_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)
IMAGENET_TRAIN_EXAMPLES = 1_281_167


def base() -> ml_collections.ConfigDict:
    """Every field the trainer reads, with neutral defaults."""
    c = ml_collections.ConfigDict()
    c.task = "classification"       # training/tasks.py: "classification", "distillation" or
                                    # "detection"
    c.model = ""
    c.model_kwargs = ml_collections.ConfigDict()  # keyword overrides for nets.create

    c.data = ml_collections.ConfigDict(dict(
        name="imagenet2012",        # TFDS name[:version]
        data_dir="",                # "" -> $TFDS_DATA_DIR or ~/tensorflow_datasets
        train_split="train",
        eval_split="validation",
        num_classes=1000,
        train_size=224,
        test_size=224,
        eval_preprocess="resize_shorter_crop",   # or "resize_crop_32" (NFNet), "crop_resize"
        crop_fraction=0.875,        # resize_shorter_crop: shorter side to test_size / this
        image_ops="torchvision",    # or "tf": whose crop sampler and resize (data/augment.py)
        interpolation="bilinear",
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        random_resized_crop=True,
        min_area=0.08,
        flip=True,
        pad_crop=0,                 # > 0 (with random_resized_crop=False): the CIFAR papers'
                                    # translation, the image padded by this many px and cropped
        pad_fill="mean",            # back at a random offset; fill "mean", "zeros", "reflect"
        mixup_alpha=0.0,            # > 0: rows mix two images, lambda ~ Beta(alpha, alpha)
        cutmix=False,               # with MixUp: half the rows MixUp, half CutMix
        randaugment_layers=0,       # RandAugment (TF1 AutoAugment ops, data/randaugment.py)
        randaugment_magnitude=0.0,  # may exceed the nominal maximum 10
        augment_before_mix=False,   # RandAugment on each image before mixing, else on the mix
        augment_on_device=False,    # RandAugment, mixing and normalisation inside the jitted
                                    # step (data/device_augment.py): the host decodes, crops,
                                    # resizes and draws; same images (bit for bit on XLA:CPU)
        workers=0,                  # grain worker processes decoding and augmenting; 0: threads
                                    # in the trainer's process, -1: one process per core
        skip_unreadable=False,      # True: replace undecodable train images by the next readable
                                    # example of the permutation (counted), mask them in eval
        max_image_pixels=89_478_485,  # larger images are unreadable (PIL's bomb limit); 0: none
        # Detection (data/detection.py): the official EfficientDet input pipeline.
        scale_min=0.1,              # scale jitter: the image fits r * train_size,
        scale_max=2.0,              # r ~ U(scale_min, scale_max); then crop / pad to train_size
        max_boxes=100,              # ground truth per image, padded (label -1) or truncated
        eval_annotations="",        # a COCO instances json for the mAP's ground truth;
                                    # "": built from the eval split (boxes as the dataset has them)
    ))

    c.batch_size = 256              # global, over all devices and hosts
    c.eval_batch_size = 256          # a multiple of 1, 2, 4, ..., 256 devices (masked at the end)
    c.num_epochs = 90.0
    c.num_steps = 0                 # > 0 overrides num_epochs
    c.label_smoothing = 0.0

    c.optimizer = ml_collections.ConfigDict(dict(
        name="sgd",                 # "sgd", "sgd_agc" (the NFNet optimizer) or "rmsprop" (TF1's)
        base_lr=0.1,                # peak lr = base_lr * batch_size / lr_batch_base
        lr_batch_base=256,
        momentum=0.9,
        nesterov=False,
        weight_decay=1e-4,
        # parameter roles (nets.registry.ROLES) with weight decay: all but skip gains
        decay_roles=(WEIGHT, GAIN, BIAS, CLASSIFIER_WEIGHT, CLASSIFIER_BIAS),
        agc_clipping=0.01,          # sgd_agc only
        agc_eps=1e-3,
        rms_decay=0.9,              # rmsprop only
        rms_eps=1e-3,
        schedule="cosine",          # "cosine", "cosine_global_step" (the official
                                    # EfficientDet's), "step" or "exponential"
        warmup_epochs=0.0,
        warmup_init=0.0,            # cosine_global_step: the warm-up's first lr, per
                                    # lr_batch_base images like base_lr
        grad_clip_norm=0.0,         # > 0 (sgd, rmsprop): each gradient clipped to this norm,
                                    # then all of them to this global norm
        step_epochs=(30.0, 60.0, 80.0),   # "step": lr x step_factor at each
        step_factor=0.1,
        decay_epochs=2.4,           # "exponential": lr x decay_rate every decay_epochs (staircase)
        decay_rate=0.97,
    ))
    c.ema_decay = 0.0               # > 0: keep an EMA of params and model state (tf1 warm-up)

    # Transfer learning (training/transfer.py); used only when a run starts fresh.
    c.init_from = ""                # a nets.weights file, a training workdir or a PyTorch
                                    # state dict of `model` (training/weight_sources.py)
    c.init_from_ema = False         # checkpoints: start from the run's EMA weights
    c.reset_head = False            # keep the fresh head even where its shape fits
    c.init_from_any_model = False   # weights of another model than `model`: load the leaves
                                    # that fit by name and shape (else an error)
    c.freeze = ()                   # regexes re.match-ed against module paths without the
                                    # root ("layer1_0.conv1"); zero updates, BN stats kept
    c.bn_eval = False               # True: every BatchNorm uses its running statistics in
                                    # training too, and keeps them (small-batch fine-tuning)

    # Knowledge distillation (training/distill.py): read by task "distillation".
    c.distill = ml_collections.ConfigDict(dict(
        teacher="",                 # the teacher's model; "": the one its weights are for
        teacher_from="",            # a nets.weights file, a training workdir or a PyTorch
                                    # state dict of `teacher` (training/weight_sources.py)
        teacher_ema=False,          # checkpoints: the teacher's EMA weights
        alpha=0.5,                  # weight of CE(student, targets); 1 - alpha: the soft term
        temperature=4.0,            # T: both softmaxes at logits / T; the soft term x T^2
    ))

    # CondenseNet's condensation (training/condensation.py): read by task "condensation".
    c.condensation = ml_collections.ConfigDict(dict(
        group_lasso_lambda=0.0,     # weight of the group lasso on the learned group convs,
                                    # added to the loss while condensing (first half)
    ))

    # Detection (training/detection.py): read by task "detection".
    c.detection = ml_collections.ConfigDict(dict(
        focal_alpha=0.25,           # the official loss (detection/losses.py)
        focal_gamma=1.5,
        huber_delta=0.1,
        box_loss_weight=50.0,
        iou_loss_type="",           # "": none; "iou", "giou", "diou" or "ciou" (added x weight)
        iou_loss_weight=1.0,
        nms="gaussian",             # evaluation: "gaussian" (soft-NMS, the official COCO
                                    # evaluation) or "hard" (IoU 0.5), per class, top 100
    ))

    # ((field, what to pass), ...): fields this experiment cannot run without; an empty one
    # stops train.py with a message saying what to pass (a default of "" still loads).
    c.required = ()

    c.compute_dtype = "auto"        # "auto": bfloat16 on accelerators, float32 on CPU
    c.seed = 0
    c.log_every = 50
    c.eval_every = 0                # 0: evaluate only at the end
    c.checkpoint_every = 1000
    c.keep_checkpoints = 3          # the newest N checkpoints are kept (>= 1)
    c.keep_every_steps = 0          # > 0: also keep every checkpoint at a multiple of it
    c.resume_with_changes = False   # resume although the config changes the run's meaning
                                    # (training/resume.py; the differences are logged)
    return c


def local(c: ml_collections.ConfigDict, *, size: int = 32, batch: int = 64,
          epochs: float = 10.0) -> ml_collections.ConfigDict:
    """The same architecture and recipe shape, on the built-in dataset (scikit-learn's digits
    prepared as a TFDS array_record dataset) at `size` px: a few minutes on a 2-core CPU."""
    c.data.update(dict(
        name="sklearn_digits", train_split="train", eval_split="test", num_classes=10,
        train_size=size, test_size=size, eval_preprocess="resize_shorter_crop",
        crop_fraction=1.0,
        # Digits are not mirror-symmetric and fill the frame: mild crops, no flips.
        random_resized_crop=True, min_area=0.5, flip=False, randaugment_layers=0, pad_crop=0,
        workers=0,                  # 32 px images: threads beat starting processes
    ))
    c.batch_size = batch
    c.eval_batch_size = 120
    c.num_epochs = epochs
    c.optimizer.lr_batch_base = 256
    c.log_every = 10
    c.checkpoint_every = 100
    c.eval_every = 0
    c.compute_dtype = "auto"
    return c


def parse_arg(arg: str | None) -> set[str]:
    """`--config file.py:local,foo` -> {"local", "foo"}."""
    return {a for a in (arg or "").split(",") if a}
