"""The tests' Triton interpreter, sped up: see patch_the_language_once_per_launch. conftest.py applies it, and
ranks.py in every rank it spawns."""

import importlib.util
import os


def interpreted() -> bool:
    """Whether the Triton kernels run under Triton's interpreter: on CPU tensors, where no GPU is (conftest.py
    sets TRITON_INTERPRET=1 there)."""
    return os.environ.get("TRITON_INTERPRET") == "1" and importlib.util.find_spec("triton") is not None


def patch_the_language_once_per_launch() -> None:
    """Triton's interpreter patches triton.language (the modules tl and tl.core a function sees) for a kernel's
    launch and restores it after; it patches them again, never to restore, at every call of a @triton.jit
    helper inside the kernel (ours, and triton.language's own such as tl.sum's combine function), which changes
    nothing once those modules are patched and costs most of an interpreted step (inspect.getmembers of the
    language, thousands of times). Here a helper's call within a launch patches only modules the launch has not
    patched yet: the kernels run as before, 3 to 4 times as fast."""
    if not interpreted():
        return
    import inspect

    import triton.language as tl
    from triton.runtime import interpreter

    patch_lang = getattr(interpreter, "_patch_lang", None)
    if patch_lang is None or hasattr(patch_lang, "__wrapped__"):  # another Triton: as it comes; or done already
        return
    launch = {"patched": None}  # the modules patched in the launch under way, or None between launches
    seen = {}  # id of a function's globals: the language modules among them, which _patch_lang patches

    def langs_of(fn) -> frozenset:
        key = id(fn.__globals__)
        if key not in seen:
            seen[key] = frozenset(id(v) for v in fn.__globals__.values() if inspect.ismodule(v) and v in (tl, tl.core))
        return seen[key]

    class _Patched:
        @staticmethod
        def restore() -> None:
            pass

    def patch_once(fn):
        langs = langs_of(fn)
        if launch["patched"] is None:  # a launch: patched, and restored when it ends
            scope = patch_lang(fn)
            restore = scope.restore

            def restore_and_end() -> None:
                launch["patched"] = None
                restore()

            launch["patched"], scope.restore = set(langs), restore_and_end
            return scope
        if langs <= launch["patched"]:  # a helper whose language is patched
            return _Patched
        launch["patched"] |= langs
        return patch_lang(fn)

    patch_once.__wrapped__ = patch_lang  # tests/test_triton.py checks that it is in effect
    interpreter._patch_lang = patch_once
