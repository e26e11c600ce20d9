"""The tests' Triton interpreter, sped up: see patch_the_language_once_per_launch. conftest.py applies it, and
ranks.py in every rank it spawns."""

import importlib.util
import os


def patch_the_language_once_per_launch() -> None:
    """Triton's interpreter patches triton.language for a kernel's launch and restores it after; it patches it
    again, never to restore, at every call of a @triton.jit helper inside the kernel, which changes nothing (the
    language is patched already) and costs most of an interpreted step (inspect.getmembers of the language,
    thousands of times). Here a helper's call within a launch skips that: the kernels run as before, 3 to 4 times
    as fast."""
    if os.environ.get("TRITON_INTERPRET") != "1" or importlib.util.find_spec("triton") is None:
        return
    from triton.runtime import interpreter

    patch_lang = getattr(interpreter, "_patch_lang", None)
    if patch_lang is None:  # another Triton: as it comes
        return
    launch = {"globals": None}

    class _Patched:
        @staticmethod
        def restore() -> None:
            pass

    def patch_once(fn):
        if launch["globals"] is fn.__globals__:  # a helper of the kernel being launched, whose language is patched
            return _Patched
        scope = patch_lang(fn)
        outer, restore = launch["globals"], scope.restore

        def restore_and_end() -> None:
            launch["globals"] = outer
            restore()

        launch["globals"], scope.restore = fn.__globals__, restore_and_end
        return scope

    interpreter._patch_lang = patch_once
