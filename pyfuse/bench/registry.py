"""Benchmark cases: what a family registers, and how `pyfuse bench` finds them.

A case module `pyfuse/bench/cases_<family>.py` decorates a generator with `@register_cases("<family>")`.
The generator receives `(device, quick)` and yields `BenchCase`s whose inputs are already on `device`;
with `quick=True` it yields fewer, smaller cases (the runner bounds repetitions by time on its own).
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field
from typing import Callable, Iterator, Mapping

import torch

__all__ = ["BenchCase", "register_cases", "backend_providers", "discover", "families", "generators", "select",
           "iter_cases"]


@dataclass(frozen=True)
class BenchCase:
    """One workload timed under several providers.

    providers: name -> zero-argument callable doing the whole op once (inputs captured). Names: `reference`,
        `pyfuse:<backend>`, or the peer's name (`peft`, `torch.topk`, `torch.compile`, ...).
    peers: the provider names that are peers; every `pyfuse:*` provider gets a speed-up against each of them.
    skipped: provider name -> why it cannot run here (peer not installed, backend unusable). Reported, never
        dropped silently.
    bytes_floor: bytes the op must move at least (inputs read once + outputs written once); effective GB/s is
        bytes_floor / median time.
    """

    family: str
    op: str
    params: str
    bytes_floor: int
    providers: Mapping[str, Callable[[], object]]
    peers: tuple[str, ...] = ()
    skipped: Mapping[str, str] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"{self.family}/{self.op}[{self.params}]"


_GENERATORS: dict[str, list[Callable[[torch.device, bool], Iterator[BenchCase]]]] = {}
_IMPORT_ERRORS: dict[str, str] = {}


def register_cases(family: str):
    """Decorator: register a `(device, quick) -> Iterator[BenchCase]` generator under `family`."""

    def decorate(fn):
        _GENERATORS.setdefault(family, []).append(fn)
        return fn

    return decorate


def backend_providers(device, make: Callable[[str], Callable[[], object]]):
    """Providers `pyfuse:<backend>` for every backend that can run on `device`, plus the skip reasons of the rest.

    `make(backend)` returns the zero-argument callable for that backend. Returns `(providers, skipped)`.
    Triton is benchmarked on GPUs only: its CPU interpreter is a test tool, not a contender.
    """
    from pyfuse._backend import backends

    device = torch.device(device)
    providers, skipped = {}, {}
    for name, status in backends().items():
        key = f"pyfuse:{name}"
        if name == "reference":
            continue  # cases add the plain-torch reference under the provider name `reference`
        if not status.usable:
            skipped[key] = status.reason
        elif device.type not in status.devices:
            skipped[key] = f"does not run on {device.type} tensors ({status.reason})"
        elif name == "triton" and device.type != "cuda":
            skipped[key] = f"{status.reason}: the interpreter is not benchmarked"
        else:
            providers[key] = make(name)
    return providers, skipped


def discover() -> dict[str, str]:
    """Import every `pyfuse.bench.cases_*` module once; returns module -> import error for those that failed."""
    import pyfuse.bench as pkg

    for info in pkgutil.iter_modules(pkg.__path__):
        if not info.name.startswith("cases_"):
            continue
        mod = f"{pkg.__name__}.{info.name}"
        if mod in _IMPORT_ERRORS:
            continue
        try:
            importlib.import_module(mod)
            _IMPORT_ERRORS[mod] = ""
        except Exception as e:  # a broken case module must not hide the other families
            _IMPORT_ERRORS[mod] = f"{type(e).__name__}: {e}"
    return {m: err for m, err in _IMPORT_ERRORS.items() if err}


def families() -> list[str]:
    return sorted(_GENERATORS)


def generators(family: str | None = None) -> list[tuple[str, Callable[[torch.device, bool], Iterator[BenchCase]]]]:
    """(family, generator) pairs, all families or one."""
    return [(fam, gen) for fam in families() if family in (None, fam) for gen in _GENERATORS[fam]]


def select(cases: Iterator[BenchCase], filter: str | None) -> Iterator[BenchCase]:
    """The cases whose name contains `filter` (all when None)."""
    return (case for case in cases if filter is None or filter in case.name)


def iter_cases(device, quick: bool, family: str | None = None, filter: str | None = None) -> Iterator[BenchCase]:
    """Registered cases, optionally restricted to one family and to names containing `filter`."""
    for _, gen in generators(family):
        yield from select(gen(torch.device(device), quick), filter)
