"""Registration of pyfuse's ``torch.library`` ops: a schema inferred from the annotated Python function, that
function as the CompositeExplicitAutograd kernel (it dispatches to the pyfuse backends itself), and a fake.

Why not ``torch.library.custom_op``: it does the same with the same decorator shape, but routes every call
through a Python autograd wrapper and a second dispatch that converts every argument again. Measured on the
2-core dev VM (torch 2.13, an ensemble ``next_token`` with 18 arguments, tiny vocabularies): 80-105 us per call
through custom_op against 51-68 us through this registration, the op's own body 33-44 us; for a B=1 ensemble
step over two 150k vocabularies that is ~10% of the call.

The ops have no autograd formula: given inputs that require grad, their floating outputs carry torch's
not-implemented node, whose backward raises (custom_op's wrapper raised at backward too).
"""
from __future__ import annotations

import functools

import torch

_LIB = torch.library.Library("pyfuse", "FRAGMENT")
DEFINED: list[str] = []  # names of the ops defined so far, in order


class LibraryOp:
    """A registered op ``pyfuse::<name>``: call it like the function it was made from; ``register_fake``
    decorates its fake (meta) implementation, as on a custom_op."""

    def __init__(self, name: str, fn):
        self.name = name
        functools.update_wrapper(self, fn)  # name, docstring, __wrapped__
        _LIB.define(name + torch.library.infer_schema(fn, mutates_args=()))
        _LIB.impl(name, fn, "CompositeExplicitAutograd")
        self.default = getattr(torch.ops.pyfuse, name).default
        DEFINED.append(name)

    def register_fake(self, fake):
        torch.library.register_fake(f"pyfuse::{self.name}", fake, lib=_LIB)
        return fake

    def __call__(self, *args):
        return self.default(*args)


def library_op(name: str):
    """Decorator: register the annotated function as the op ``pyfuse::<name>`` (no mutated arguments)."""
    return lambda fn: LibraryOp(name, fn)
