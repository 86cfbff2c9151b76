"""GCNet-R50 fine-tuned from a trained ResNet-50: GCNet's recipe (Cao et al. 2019, arXiv
1904.11492) as its detection configs run it (github.com/xvjiarui/GCNet and mmdetection's
configs/gcnet, Mask R-CNN R-50-FPN, GC r16 in stages c3-c5): the backbone starts from the
torchvision ResNet-50 ("modelzoo://resnet50"), the GC blocks are new (their last 1x1 conv starts
at zero, so the network starts as the ResNet-50), `frozen_stages=1` freezes the stem and stage 1
(here `freeze = ("conv1", "bn1", "layer1_")`), and mmdetection's 1x schedule trains it: SGD
momentum 0.9, weight decay 1e-4, lr 0.02 for 16 images (8 GPUs x 2), x0.1 after epochs 8 and
11 of 12, a linear warm-up over the first 500 iterations.

Here the task is classification (the detector's heads and COCO are not in this codebase): the
same schedule on ImageNet at batch 16, the ResNet-50 head kept (same 1000 classes). Differences
from the configs: our warm-up starts from 0 (mmdetection's from 0.001 x lr); mmdetection clips
the gradient norm at 35 in the GCNet repo's configs, not done here; frozen BatchNorm layers
keep their running statistics but normalise with batch statistics (mmdetection's ResNet uses
`norm_eval`, eval-mode BN, everywhere).

    python -m tools.convert --from torch resnet50.pth --model resnet50 --out resnet50.safetensors
    python train.py --config experiments/finetune_gcnet_resnet50.py \\
        --config.init_from=resnet50.safetensors

`:local` fine-tunes on the built-in dataset at 32 px from a ResNet-50 trained there:

    python train.py --config experiments/resnet50.py:local          # -> runs/resnet50-local
    python train.py --config experiments/finetune_gcnet_resnet50.py:local \\
        --config.init_from=runs/resnet50-local
"""

from __future__ import annotations

from experiments import common
from experiments.resnet import recipe

FROZEN_STAGES_1 = ("conv1", "bn1", "layer1_")    # mmdetection's frozen_stages=1: stem + stage 1
REQUIRED = (("init_from",
             "ResNet-50 weights: a nets.weights file (python -m tools.convert --from torch "
             "SRC --model resnet50 --out resnet50.safetensors) or the workdir of a resnet50 "
             "run (python train.py --config experiments/resnet50.py:local writes "
             "runs/resnet50-local)"),)


def get_config(arg=None):
    args = common.parse_arg(arg)
    c = recipe("gcnet_resnet50")
    c.required = REQUIRED
    c.init_from_any_model = True    # ResNet-50 weights start a GCNet-ResNet-50: its GC blocks fresh
    c.freeze = FROZEN_STAGES_1
    c.batch_size = 16
    c.num_epochs = 12.0
    c.optimizer.update(dict(
        name="sgd", base_lr=0.02, lr_batch_base=16, momentum=0.9, nesterov=False,
        weight_decay=1e-4, schedule="step", step_epochs=(8.0, 11.0), step_factor=0.1,
        warmup_epochs=500 * 16 / common.IMAGENET_TRAIN_EXAMPLES,
    ))
    c.eval_every = 80_000
    c.checkpoint_every = 10_000

    if "local" in args:
        common.local(c, size=32, batch=32, epochs=3.0)
        # The recipe's lr per image (common.local rescales to 256), its steps at 2/3 and 11/12.
        c.optimizer.update(dict(lr_batch_base=16, step_epochs=(2.0, 2.75), warmup_epochs=0.25))
    return c
