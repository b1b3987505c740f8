"""Whole-model merging: ``merge_state_dicts`` and ``merge_models`` apply a preset tensor by tensor.

Everything is checked before the first tensor is merged (keys, shapes, dtypes, devices, tied weights,
the method and its knobs), so a mistake never costs a half-finished merge. Float tensors (float32, float16,
bfloat16) are merged; every other entry (integer buffers, bool masks) is copied from the base.
"""
from __future__ import annotations

import copy
import hashlib
import inspect
from typing import Iterator, Mapping, Sequence

import torch

from pyfuse._validate import FLOAT_DTYPES
from pyfuse.merge.presets import FUNCTIONS, PRESETS


def tensor_seed(seed: int, name: str) -> int:
    """A 64-bit seed for one named tensor. Each tensor needs its own key: the Philox counter is the element
    index, so equally shaped tensors merged with one key would all drop the same positions."""
    digest = hashlib.blake2b(f"{int(seed)}/{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def _alias_key(t: torch.Tensor) -> tuple:
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)


def _check(base_sd, sds, method: str, knobs: dict) -> dict:
    """Validate everything; return {key: earlier key it is tied to} for base entries sharing storage."""
    if method not in PRESETS:
        raise ValueError(f"method must be one of {', '.join(map(repr, PRESETS))}; got {method!r}")
    try:
        inspect.signature(FUNCTIONS[method]).bind(None, [], **knobs)
    except TypeError as e:
        raise TypeError(f"invalid knobs for method {method!r}: {e}") from None
    if not isinstance(base_sd, Mapping):
        raise TypeError(f"base_sd must be a mapping of names to tensors, got {type(base_sd).__name__}")
    if isinstance(sds, Mapping) or not isinstance(sds, Sequence) or len(sds) == 0:
        raise TypeError("sds must be a non-empty sequence of state dicts (one per model)")
    for name, t in base_sd.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"base_sd[{name!r}] must be a torch.Tensor, got {type(t).__name__}")
        if t.is_floating_point() and t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"base_sd[{name!r}] has dtype {t.dtype}; merging supports float32, float16 and "
                            f"bfloat16 (cast the models first)")
    problems = []
    for i, sd in enumerate(sds):
        if not isinstance(sd, Mapping):
            raise TypeError(f"sds[{i}] must be a mapping of names to tensors, got {type(sd).__name__}")
        missing = [k for k in base_sd if k not in sd]
        extra = [k for k in sd if k not in base_sd]
        if missing:
            problems.append(f"sds[{i}] lacks {len(missing)} key(s) of base_sd: {missing[:5]}")
        if extra:
            problems.append(f"sds[{i}] has {len(extra)} key(s) not in base_sd: {extra[:5]}")
        for k, b in base_sd.items():
            t = sd.get(k)
            if t is None or not b.is_floating_point():
                continue
            if not isinstance(t, torch.Tensor):
                problems.append(f"sds[{i}][{k!r}] is a {type(t).__name__}, not a tensor")
            elif t.shape != b.shape:
                problems.append(f"{k!r}: sds[{i}] has shape {tuple(t.shape)}, base has {tuple(b.shape)}")
            elif t.dtype != b.dtype:
                problems.append(f"{k!r}: sds[{i}] has dtype {t.dtype}, base has {b.dtype}")
            elif t.device != b.device:
                problems.append(f"{k!r}: sds[{i}] is on {t.device}, base on {b.device}")
    if problems:
        raise ValueError("state dicts do not match:\n  " + "\n  ".join(problems))

    tied, first = {}, {}
    for k, b in base_sd.items():
        if b.is_floating_point():
            owner = first.setdefault(_alias_key(b), k)
            if owner != k:
                tied[k] = owner
    for k, owner in tied.items():
        for i, sd in enumerate(sds):
            if _alias_key(sd[k]) != _alias_key(sd[owner]):
                raise ValueError(f"base ties {k!r} to {owner!r} (shared storage) but sds[{i}] does not; "
                                 f"tie or untie them the same way in every model")
    return tied


def _progress(items: list, enabled: bool, desc: str):
    if enabled:
        try:
            from tqdm.auto import tqdm
        except ImportError:
            return items
        return tqdm(items, desc=desc, unit="tensor")
    return items


def _merged(base_sd, sds, method: str, knobs: dict, tied: dict, progress: bool) -> Iterator[tuple]:
    """Yield (key, merged tensor) for the float entries of base_sd that are not tied to an earlier one."""
    seed = knobs.pop("seed", None)
    fn = FUNCTIONS[method]
    keys = [k for k, t in base_sd.items() if t.is_floating_point() and k not in tied]
    for k in _progress(keys, progress, f"pyfuse {method}"):
        if seed is not None:
            knobs["seed"] = tensor_seed(seed, k)
        yield k, fn(base_sd[k], [sd[k] for sd in sds], **knobs)


def merge_state_dicts(base_sd: Mapping[str, torch.Tensor], sds: Sequence[Mapping[str, torch.Tensor]],
                      method: str = "ties", *, progress: bool = True, **knobs) -> dict:
    """Merge the state dicts ``sds`` into ``base_sd`` with the preset ``method`` and its ``knobs``.

    ``knobs`` are the preset's keyword arguments (``weights``, ``density``, ``lam``...). A ``seed`` for the
    random methods is combined with each tensor's name (``tensor_seed``), so every tensor gets its own
    Philox stream and the result does not depend on the order of the keys. Returns a new dict in
    ``base_sd``'s key order: merged float tensors, clones of the other entries; keys whose base tensors share
    storage (tied weights) share one merged tensor.
    """
    tied = _check(base_sd, sds, method, knobs)
    out = dict(_merged(base_sd, sds, method, dict(knobs), tied, progress))
    for k, t in base_sd.items():
        if k in tied:
            out[k] = out[tied[k]]
        elif k not in out:
            out[k] = t.clone()
    return {k: out[k] for k in base_sd}


def merge_models(base_model: torch.nn.Module, models: Sequence[torch.nn.Module], method: str = "ties", *,
                 inplace: bool = False, progress: bool = True, **knobs) -> torch.nn.Module:
    """Merge ``models`` into ``base_model`` (same architecture) with the preset ``method``.

    Returns a merged deep copy of ``base_model``, or ``base_model`` itself updated tensor by tensor when
    ``inplace=True`` (peak extra memory: one tensor). Parameters and float buffers are merged, other
    buffers kept. See ``merge_state_dicts`` for ``knobs`` and seeding.
    """
    if not isinstance(base_model, torch.nn.Module):
        raise TypeError(f"base_model must be a torch.nn.Module, got {type(base_model).__name__}")
    if isinstance(models, torch.nn.Module) or not isinstance(models, Sequence):
        raise TypeError("models must be a sequence of torch.nn.Module")
    for i, m in enumerate(models):
        if not isinstance(m, torch.nn.Module):
            raise TypeError(f"models[{i}] must be a torch.nn.Module, got {type(m).__name__}")
    if not isinstance(inplace, bool):
        raise TypeError(f"inplace must be a bool, got {type(inplace).__name__}")
    base_sd = base_model.state_dict()
    sds = [m.state_dict() for m in models]
    tied = _check(base_sd, sds, method, knobs)
    target = base_model if inplace else copy.deepcopy(base_model)
    target_sd = target.state_dict()  # detached tensors sharing the target's storage
    with torch.no_grad():
        for k, merged in _merged(base_sd, sds, method, dict(knobs), tied, progress):
            target_sd[k].copy_(merged)
    return target
