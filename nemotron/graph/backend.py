"""The backend function behind the ``nemotron`` entry point.

Not decorated with ``torch._dynamo.register_backend``: the entry point registers it under the same
name, and a second registration fails with "duplicate name".
"""
from __future__ import annotations

KNOWN_OPTIONS: frozenset = frozenset()  # passes and their switches arrive with the compiler issue


def nemotron_backend(gm, example_inputs, *, mode=None, options=None, **kwargs):
    """torch.compile backend: today, Inductor's ``compile_fx`` on the graph as Dynamo traced it.

    ``mode`` is passed through to Inductor's mode table; ``options`` must be empty for now (unknown
    keys raise, so a typo never silently compiles something else).
    """
    from torch._inductor.compile_fx import compile_fx
    from torch._inductor import list_mode_options

    options = dict(options or {})
    unknown = sorted(set(options) - KNOWN_OPTIONS)
    if unknown:
        raise ValueError(f"options: unknown key(s) {unknown} for backend 'nemotron'; known: {sorted(KNOWN_OPTIONS)}")
    patches = list_mode_options(mode) if mode else {}
    return compile_fx(gm, example_inputs, config_patches=patches or None)
