"""torch.optim without the ~2-4 s import of ``torch._dynamo`` on a path that never compiles.

``torch.optim`` wraps ``Optimizer.add_param_group`` (called by every optimizer's
``__init__``), ``zero_grad``, ``state_dict``, ``load_state_dict`` and each optimizer's
``step`` in decorators that *import* ``torch._dynamo`` on their first call, only to
tell ``torch.compile`` not to trace into them. An audit compiles nothing, yet paid
for that import (sympy, torch.fx, the inductor config: about 3.7 s on 2 CPU cores)
the moment it built its Adam.

:class:`EagerOptimizerMixin` calls the undecorated methods while ``torch._dynamo`` is
not loaded. That is exact, not an approximation: nothing can be compiling before
``torch._dynamo`` is imported (``torch.compile`` imports it), and the decorators'
only other effect, grad mode off during ``step``, is kept. Once ``torch._dynamo`` is
loaded (someone compiles), every call goes through torch's own decorated methods.
:class:`Adam`, :class:`AdamW` and :class:`SGD` are the torch optimizers with the mixin
(``isinstance(opt, torch.optim.Adam)`` holds; ``state_dict`` is the same).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import torch
import torch.optim.optimizer as _torch_optimizer


def _probe() -> None:  # pragma: no cover - never called, only wrapped
    return None


def _wrapper_codes() -> frozenset[Any]:
    """Code objects of torch's lazy dynamo-disabling wrappers (and of the step hook
    wrapper, which the subclass's own step gets again from ``Optimizer.__init__``)."""
    codes = set()
    makers: list[Callable[[], Any]] = [
        lambda: torch._disable_dynamo(_probe),  # creating it imports nothing
        lambda: _torch_optimizer._use_grad_for_differentiable(_probe),
        lambda: torch.optim.Optimizer.profile_hook_step(_probe),
    ]
    for make in makers:
        try:
            codes.add(make().__code__)
        except Exception:  # noqa: BLE001, S110 - a torch without one of them: that layer is not peeled
            pass
    return frozenset(codes)


_WRAPPER_CODES = _wrapper_codes()
try:  # the wrapper running the step hooks, which this class's own step gets as well
    _HOOK_CODES = frozenset({torch.optim.Optimizer.profile_hook_step(_probe).__code__})
except Exception:  # noqa: BLE001 - a torch without it (pragma: no cover)
    _HOOK_CODES = frozenset()


def dynamo_loaded() -> bool:
    """Whether ``torch._dynamo`` has been imported in this process."""
    return "torch._dynamo" in sys.modules


def undecorated(function: Any, codes: frozenset[Any] = _WRAPPER_CODES) -> Any:
    """``function`` without torch's dynamo-disabling (and step hook) wrappers; any other
    decorator is kept."""
    while getattr(function, "__code__", None) in codes and hasattr(function, "__wrapped__"):
        function = function.__wrapped__
    return function


class EagerOptimizerMixin:
    """Put before a ``torch.optim.Optimizer`` subclass in the bases: its bookkeeping
    methods and ``step`` then run without importing ``torch._dynamo`` (see the module)."""

    def _eager_call(self, name: str, *args: Any, **kwargs: Any) -> Any:
        method = getattr(super(), name)
        if dynamo_loaded():
            return method(*args, **kwargs)
        return undecorated(method.__func__)(self, *args, **kwargs)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        self._eager_call("add_param_group", param_group)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self._eager_call("zero_grad", set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return self._eager_call("state_dict")

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._eager_call("load_state_dict", state_dict)


class EagerStepMixin(EagerOptimizerMixin):
    """:class:`EagerOptimizerMixin` and the wrapped optimizer's ``step`` too (with grad
    mode as ``_use_grad_for_differentiable`` sets it)."""

    defaults: dict[str, Any]

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        # This class's step runs the step hooks already (Optimizer.__init__ wraps it).
        method = super().step.__func__  # type: ignore[misc]
        if dynamo_loaded():
            return undecorated(method, _HOOK_CODES)(self, closure)
        with torch.set_grad_enabled(bool(self.defaults.get("differentiable", False))):
            return undecorated(method)(self, closure)


class Adam(EagerStepMixin, torch.optim.Adam):
    """``torch.optim.Adam`` that imports ``torch._dynamo`` only once something compiles."""


class AdamW(EagerStepMixin, torch.optim.AdamW):
    """``torch.optim.AdamW`` that imports ``torch._dynamo`` only once something compiles."""


class SGD(EagerStepMixin, torch.optim.SGD):
    """``torch.optim.SGD`` that imports ``torch._dynamo`` only once something compiles."""
