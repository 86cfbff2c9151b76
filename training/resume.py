"""What a resumed run may change: the config saved with the checkpoint against the new one.

A difference in what the run computes (model, data, augmentation, optimizer, schedule, batch,
seed, steps, ...) would make the resumed run and its reported results another config's, so it is
an error listing every difference unless `config.resume_with_changes` is set (then each is
logged). Fields that only change how the run is observed or stored, or that apply to fresh runs
only, are listed as harmless and logged.
"""

from __future__ import annotations

import json
from typing import Any, NamedTuple

# Dotted config fields a resume may change freely.
HARMLESS = frozenset({
    "log_every", "eval_every", "checkpoint_every", "keep_checkpoints", "keep_every_steps",
    "eval_batch_size", "resume_with_changes",
    "data.data_dir", "data.workers",
    "data.augment_on_device",   # where the batch augmentation runs, not what it computes
    # Read by fresh runs only: a resumed run restores its weights.
    "init_from", "init_from_ema", "init_from_any_model", "reset_head",
})

_MISSING = object()


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(_flatten(value, name + "."))
        else:
            out[name] = value
    return out


def _show(value) -> str:
    return "(absent)" if value is _MISSING else json.dumps(value)


class Changes(NamedTuple):
    """'field: saved -> new' lines, split by whether they change the run's meaning."""

    meaningful: list[str]
    harmless: list[str]


def changes(saved: dict, current: dict) -> Changes:
    """The fields whose values differ between the saved config and the current one (both as
    `json.loads(config.to_json())` gives them)."""
    old, new = _flatten(saved), _flatten(current)
    meaningful, harmless = [], []
    for name in sorted(old.keys() | new.keys()):
        a, b = old.get(name, _MISSING), new.get(name, _MISSING)
        if a == b:
            continue
        line = f"{name}: {_show(a)} -> {_show(b)}"
        # A field the saved config lacks is one a newer code version added: not a change.
        (harmless if name in HARMLESS or a is _MISSING else meaningful).append(line)
    return Changes(meaningful, harmless)
