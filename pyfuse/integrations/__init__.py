"""Optional integrations with the merging libraries people already use.

- ``pyfuse.integrations.peft``: PEFT's merge functions on pyfuse and ``patch()`` for
  ``LoraModel.add_weighted_adapter`` (``pip install pyfuse[peft]``).
- ``pyfuse.integrations.mergekit``: ``install()`` puts pyfuse behind mergekit's task-arithmetic family of
  methods; console script ``pyfuse-mergekit`` (``pip install pyfuse[mergekit]``).

Nothing here is imported by ``import pyfuse``; each submodule imports its library only when used.
"""
