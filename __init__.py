"""subquad: vision and diffusion backbones on efficient attention.

``import subquad`` registers every model with timm: ``timm.create_model("agent_deit_tiny_patch16_224")``.

The import itself is light (no torch, timm, diffusers): the subpackages load on first use, and the
models are registered with timm as soon as timm is imported (at once when it already is), so that
``subquad --help`` answers without loading either.
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import os
import sys

__version__ = "0.1.0"
__all__ = ["accelerate_pipeline", "attention", "backbones", "kernels", "tasks"]

_SUBPACKAGES = ("attention", "backbones", "kernels", "tasks")


def __getattr__(name: str):
    if name in _SUBPACKAGES:
        return importlib.import_module(f"{__name__}.{name}")
    if name == "accelerate_pipeline":      # loads diffusers: only on first use
        return importlib.import_module(f"{__name__}.tasks.pipelines").accelerate_pipeline
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _leave_own_folder_off_sys_path() -> None:
    """The repository root is this package's own folder. ``python -m subquad...`` or a script run from the
    checkout puts it on sys.path, where its subfolders would also be top-level modules and shadow packages of
    the same name: ``kernels/`` hides Hugging Face's ``kernels``, which diffusers and transformers probe for and
    import. The subfolders are only ever ``subquad.kernels`` and the like, so the folder leaves sys.path."""
    here = os.path.dirname(os.path.realpath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.realpath(p or os.curdir) != here]


def _register_models() -> None:
    importlib.import_module(f"{__name__}.backbones")


class _RegisterWhenTimmLoads(importlib.abc.MetaPathFinder):
    """Registers subquad's models right after ``import timm`` completes, then steps aside.

    A lookup alone (``importlib.util.find_spec("timm")``, as libraries probe for optional packages) gets
    a spec whose loading registers the models, and the finder stays for the import that comes later."""

    _looking = False

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "timm" or self._looking:
            return None
        self._looking = True
        try:
            spec = importlib.util.find_spec("timm")
        finally:
            self._looking = False
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_register(module):
            if self in sys.meta_path:
                sys.meta_path.remove(self)
            exec_module(module)
            _register_models()

        spec.loader.exec_module = exec_then_register
        return spec


_leave_own_folder_off_sys_path()
if "timm" in sys.modules:
    _register_models()
else:
    sys.meta_path.insert(0, _RegisterWhenTimmLoads())
