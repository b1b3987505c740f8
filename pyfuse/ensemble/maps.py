"""Device tables derived from a vocabulary map, for the union-vocabulary ops.

A vocabulary map is any object with ``union_size: int`` and ``to_union``: one int32 tensor ``[V_m]`` per
model (model token id -> union id, -1 = ignored; many-to-one allowed), and optionally ``from_union``: one
int32 tensor ``[U]`` per model (union id -> the model's canonical token, -1 when none). ``VocabMap``
(pyfuse.ensemble.vocab) is one; ``SimpleVocabMap`` below builds one from tensors directly.

The ops never scatter into the union (float atomics would make the result order-dependent): they gather
through a reverse index, union id -> the model ids mapping to it, in ascending model-id order (CSR).
"""
from __future__ import annotations

import dataclasses

import torch

# Fixed-point sums use 2**-40 units in int64; every sum stays below 2**62 while V_m, U <= 2**22.
MAX_VOCAB = 1 << 22
MAX_MODELS = 8  # the present-models bit pattern of a union id is one byte


@dataclasses.dataclass
class SimpleVocabMap:
    """A vocabulary map from tensors, for callers without tokenizers. ``from_union`` defaults to the
    lowest model id of each union id."""

    to_union: list
    union_size: int
    from_union: list | None = None

    @property
    def num_models(self) -> int:
        return len(self.to_union)


def build_reverse_index(to_union: torch.Tensor, union_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """CSR reverse map of one model: ``(rev_offsets int32 [U+1], rev_ids int32 [nnz])``; the model ids of
    union id u are ``rev_ids[rev_offsets[u]:rev_offsets[u+1]]``, ascending. Ids mapped to -1 are left out."""
    to_union = to_union.to(torch.int64)
    ids = torch.nonzero(to_union >= 0).flatten()
    targets = to_union[ids]
    order = torch.sort(targets * to_union.numel() + ids).indices  # by (union id, model id)
    counts = torch.bincount(targets, minlength=union_size)
    offsets = torch.zeros(union_size + 1, dtype=torch.int64, device=to_union.device)
    offsets[1:] = torch.cumsum(counts, 0)
    return offsets.to(torch.int32), ids[order].to(torch.int32)


@dataclasses.dataclass
class EnsembleTables:
    """Everything the kernels read about the map, on one device. Host ints are computed once here so
    that a call never synchronises with the device."""

    union_size: int
    to_union: list  # int32 [V_m]
    rev_offsets: list  # int32 [U+1]
    rev_ids: list  # int32 [nnz_m]
    from_union: list  # int32 [U]
    present: torch.Tensor  # uint8 [U]: bit m set when model m has a token for the union id
    first_ids: list  # int32 [U]: the model's only id of u, -1 when it has none or several (CPU fast path)
    multi: list  # int32 [n, 2]: (union id, model id) of every id of a union id with several (CPU fast path)
    valid_counts: tuple  # mapped ids per model
    max_mult: tuple  # longest reverse list per model
    row_layout: list = dataclasses.field(default_factory=list)  # model 0's, see row_layout(); [] when none
    # int32 [n, 2] per model: (union id, its single id) ascending, for a later model whose single ids cover at
    # most 1 in SPARSE_SHARE union ids (CPU fast path: its terms are added pair by pair); [0, 2] otherwise.
    sparse: list = dataclasses.field(default_factory=list)

    @property
    def num_models(self) -> int:
        return len(self.to_union)


def _multi_ids(offsets: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """int32 [n, 2] (union id, model id) of every entry of the reverse lists longer than one, in CSR order:
    the CPU kernel sums these few itself; its vectorised gather reads only the single ids (first_ids)."""
    off = offsets.to(torch.int64)
    counts = off[1:] - off[:-1]
    owner = torch.repeat_interleave(torch.arange(off.numel() - 1), counts)
    several = (counts > 1)[owner]
    return torch.stack([owner[several].to(torch.int32), ids[several]], dim=1).contiguous()


def _pack16(flags: torch.Tensor) -> torch.Tensor:
    """int64 [ceil(n / 16)]: bit j of word k is flags[16 k + j]."""
    pad = -flags.numel() % 16
    lanes = torch.nn.functional.pad(flags, (0, pad)).view(-1, 16).to(torch.int64)
    return (lanes << torch.arange(16)).sum(dim=1)


def _as_int32(x: torch.Tensor) -> torch.Tensor:
    """int64 values in [0, 2^32) to int32 with the same bits."""
    return torch.where(x >= 1 << 31, x - (1 << 32), x).to(torch.int32)


def row_layout(fwd: torch.Tensor, counts: torch.Tensor, first: torch.Tensor, multi: torch.Tensor) -> list:
    """The CPU kernel's layout for writing model 0's exponentials straight into the key row (int32 CPU tensors,
    as ensemble.h's Args row_* fields), or [] when the map does not suit it.

    Per vector of 16 model ids: which are the first (lowest) id of their union id, and which belong to a union
    id with several ids (many-to-one members); the union id of its first first-id lane when those lanes' union
    ids are consecutive (the kernel then writes them with one compress and store), else -1 (written one by
    one); the members before it (the kernel keeps the members' values apart, compacted in id order). Per 16
    union ids: where the model has exactly one id. Per many-to-one pair of ``multi``: its member rank.
    ``VocabMap`` numbers model 0's text tokens in id order, so nearly every vector is consecutive; a map whose
    vectors are mostly not (more than 1 in 8) gets [] and the kernel's gather path."""
    V = fwd.numel()
    ids = torch.arange(V, dtype=torch.int64)
    u = fwd.to(torch.int64).clamp(min=0)
    valid = fwd >= 0
    first_lane = valid & (first.to(torch.int64)[u] == ids)
    member = valid & (counts[u] > 1)
    pad = -V % 16
    fa = torch.nn.functional.pad(first_lane, (0, pad)).view(-1, 16)
    uu = torch.nn.functional.pad(u, (0, pad)).view(-1, 16)
    has = fa.any(dim=1)
    start = uu.gather(1, fa.to(torch.int8).argmax(dim=1, keepdim=True)).squeeze(1)
    consecutive = ~(fa & (uu != start[:, None] + fa.cumsum(dim=1) - 1)).any(dim=1)
    if int((has & ~consecutive).sum()) * 8 > fa.shape[0]:
        return []
    start = torch.where(has & consecutive, start, torch.full_like(start, -1))
    bits = _pack16(first_lane) | (_pack16(member) << 16)
    per_vector = torch.nn.functional.pad(member, (0, pad)).view(-1, 16).sum(dim=1)
    mstart = torch.cumsum(per_vector, 0) - per_vector
    rank = torch.cumsum(member.to(torch.int64), 0) - 1
    slot = rank[multi[:, 1].to(torch.int64)] if multi.numel() else torch.zeros(0, dtype=torch.int64)
    return [_as_int32(bits), start.to(torch.int32), mstart.to(torch.int32), _as_int32(_pack16(counts == 1)),
            slot.to(torch.int32)]


SPARSE_SHARE = 4


def sparse_pairs(single: torch.Tensor, m: int) -> torch.Tensor:
    """int32 [n, 2]: (union id, model id) where model m > 0 has exactly one id, when those cover at most 1 in
    SPARSE_SHARE union ids; else [0, 2]. The CPU key pass then adds that model's terms pair by pair: its 16-lane
    gathers over the union would be mostly masked-off lanes, which cost as much as real ones."""
    u = torch.nonzero(single >= 0).flatten()
    if m == 0 or u.numel() * SPARSE_SHARE > single.numel():
        return torch.zeros(0, 2, dtype=torch.int32)
    return torch.stack([u.to(torch.int32), single[u]], dim=1).contiguous()


def _tables(to_union, union_size: int, from_union, device) -> EnsembleTables:
    fields = {k: [] for k in ("to_union", "rev_offsets", "rev_ids", "from_union", "first_ids", "multi")}
    present = torch.zeros(union_size, dtype=torch.int32)
    valid, mult, layout, sparse = [], [], [], []
    for m, fwd in enumerate(to_union):
        fwd = fwd.detach().to("cpu", torch.int32).contiguous()
        off, ids = build_reverse_index(fwd, union_size)
        counts = (off[1:] - off[:-1]).to(torch.int64)
        first = torch.full((union_size,), -1, dtype=torch.int32)
        has = counts > 0
        first[has] = ids[off[:-1].to(torch.int64)[has]]
        present |= has.to(torch.int32) << m
        canon = first if from_union is None else from_union[m].detach().to("cpu", torch.int32).contiguous()
        single = torch.where(counts == 1, first, torch.full_like(first, -1))
        valid.append(int(ids.numel()))
        mult.append(int(counts.max()) if union_size else 0)
        multi = _multi_ids(off, ids)
        if torch.device(device).type == "cpu":
            if m == 0:
                layout = row_layout(fwd, counts, first, multi)
            sparse.append(sparse_pairs(single, m))
        else:
            sparse.append(torch.zeros(0, 2, dtype=torch.int32, device=device))
        for key, t in (("to_union", fwd), ("rev_offsets", off), ("rev_ids", ids), ("from_union", canon),
                       ("first_ids", single), ("multi", multi)):
            fields[key].append(t.to(device))
    return EnsembleTables(union_size=union_size, present=present.to(torch.uint8).to(device),
                          valid_counts=tuple(valid), max_mult=tuple(mult), row_layout=layout, sparse=sparse,
                          **fields)


def check_map(vmap) -> None:
    """Validate a vocabulary map's structure (shapes, dtypes, id ranges); raises ValueError/TypeError."""
    for attr in ("to_union", "union_size"):
        if not hasattr(vmap, attr):
            raise TypeError(f"vmap must have attribute {attr!r} (a VocabMap or SimpleVocabMap)")
    U = vmap.union_size
    if isinstance(U, bool) or not isinstance(U, int) or not 1 <= U <= MAX_VOCAB:
        raise ValueError(f"vmap.union_size must be an int in [1, {MAX_VOCAB}], got {U!r}")
    maps = list(vmap.to_union)
    if not 1 <= len(maps) <= MAX_MODELS:
        raise ValueError(f"vmap.to_union must hold 1 to {MAX_MODELS} tensors, got {len(maps)}")
    for m, fwd in enumerate(maps):
        if not isinstance(fwd, torch.Tensor) or fwd.dim() != 1 or fwd.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"vmap.to_union[{m}] must be a 1-D int32 tensor")
        if not 1 <= fwd.numel() <= MAX_VOCAB:
            raise ValueError(f"vmap.to_union[{m}] must have 1 to {MAX_VOCAB} entries, got {fwd.numel()}")
        if fwd.numel() and (int(fwd.min()) < -1 or int(fwd.max()) >= U):
            raise ValueError(f"vmap.to_union[{m}] entries must be -1 or union ids in [0, {U})")
    back = getattr(vmap, "from_union", None)
    if back is not None:
        if len(back) != len(maps):
            raise ValueError(f"vmap.from_union must hold {len(maps)} tensors, got {len(back)}")
        for m, rev in enumerate(back):
            if not isinstance(rev, torch.Tensor) or tuple(rev.shape) != (U,):
                raise ValueError(f"vmap.from_union[{m}] must be an int32 tensor of shape [{U}]")
            if int(rev.min()) < -1 or int(rev.max()) >= maps[m].numel():
                raise ValueError(f"vmap.from_union[{m}] entries must be -1 or ids in [0, {maps[m].numel()})")


def tables_for(vmap, device) -> EnsembleTables:
    """The device tables of ``vmap``, built and validated once per map and device and cached on the map
    (attribute ``_pyfuse_tables``; a plain attribute read, so compiled callers trace it). Do not mutate a
    map's tensors after its first use."""
    device = torch.device(device)
    cache = getattr(vmap, "_pyfuse_tables", None)
    if cache is not None and device in cache:
        return cache[device]
    check_map(vmap)
    tables = _tables(list(vmap.to_union), vmap.union_size, getattr(vmap, "from_union", None), device)
    if cache is None:
        cache = {}
        object.__setattr__(vmap, "_pyfuse_tables", cache)
    cache[device] = tables
    return tables

def synthetic_map(vocab_sizes, *, overlap: float = 0.7, many_to_one: float = 0.02, padding: int = 64,
                  seed: int = 0, ordered: bool = True) -> SimpleVocabMap:
    """A random vocabulary map for tests and benchmarks: every later model shares a fraction ``overlap`` of its
    ids (at random positions) with the union built so far and adds the rest as new ids; a fraction
    ``many_to_one`` of each model's ids repeats another id of the same model; the last ``padding`` ids of each
    model (when V_m > 2 * padding) are padded rows mapped to -1.

    ordered: union ids are numbered as ``VocabMap`` numbers them, in order of first appearance (model 0's ids in
    its id order, then each later model's new ids in its id order); False numbers them at random, a layout
    VocabMap never builds (every model's ids scattered over the union)."""
    gen = torch.Generator().manual_seed(seed)
    to_union, U = [], 0
    for V in vocab_sizes:
        pad = padding if V > 2 * padding else 0
        n = V - pad
        shared = 0 if U == 0 else min(int(round(overlap * n)), U)
        fwd = torch.arange(U, U + n - shared)  # new ids (numbered for now: see the renumbering below)
        if shared:
            old = torch.randperm(U, generator=gen)[:shared]
            fwd = torch.cat([old, fwd])[torch.randperm(n, generator=gen)]
        dup = torch.rand(n, generator=gen) < many_to_one
        src = torch.randint(0, n, (n,), generator=gen)
        fwd = torch.where(dup, fwd[src], fwd)
        U = max(U, int(fwd.max()) + 1)
        to_union.append(torch.cat([fwd, torch.full((pad,), -1, dtype=torch.int64)]).to(torch.int32))
    # Renumber by first appearance, model by model (dropping the ids only a repeat pointed at), then shuffle
    # if asked.
    seen = torch.cat(to_union).long()
    seen = seen[seen >= 0]
    first = torch.full((U,), seen.numel(), dtype=torch.long).scatter_reduce_(0, seen, torch.arange(seen.numel()),
                                                                              "amin")
    U = int((first < seen.numel()).sum())
    number = torch.empty_like(first)
    number[torch.argsort(first)] = torch.arange(first.numel())
    if not ordered:
        number = torch.cat([torch.randperm(U, generator=gen), number.new_full((first.numel() - U,), -1)])[number]
    to_union = [torch.where(f >= 0, number[f.long().clamp(min=0)], -1).to(torch.int32) for f in to_union]
    return SimpleVocabMap(to_union, U)
