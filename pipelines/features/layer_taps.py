"""Running a transformer only as deep as the layers asked for.

A layer sweep needs every hidden state, but a single layer (the usual fit once the best layer
is known) needs only the layers below it: running the rest of the network, and its output
head, is wasted work (half of a 7B model's compute for its middle layer). The hidden states
are taken from forward hooks on the model's stack of layers (hidden state ``h`` is the input of
layer ``h``, i.e. the output of layer ``h - 1``), and the forward pass is stopped after the
deepest one asked for.

The stack is found by shape (the one ``ModuleList`` with ``n_layers`` blocks) and checked on
the first batch against the model's own ``output_hidden_states``: an architecture whose hidden
states are not its blocks' outputs (or a stack found wrongly) is run whole, as before. The
last hidden state is always taken from a whole pass (many models apply a final norm to it).
The hooks stay registered and act only for the thread that asked, so threads sharing a
model never see each other's batches.
"""
from __future__ import annotations

import logging
import threading
from typing import Any, Sequence

__all__ = ["LayerTaps", "WholePasses", "layer_stack", "hidden_states_to"]

log = logging.getLogger(__name__)
_FIRST_USE = threading.Lock()  # two threads meeting a model at once set up one set of hooks

#: The check of the hooks against the model's own hidden states runs on one row of the first
#: batch, its token inputs cut to this many tokens.
PROBE_TOKENS = 32


class _Reached(Exception):
    """Raised by the hook of the deepest layer asked for: the rest of the forward pass is skipped."""


def layer_stack(model: Any, n_layers: int) -> Any | None:
    """The model's stack of transformer blocks, or None when there is not exactly one.

    The stack is the ``torch.nn.ModuleList`` of ``n_layers`` modules of one class (``h`` in
    GPT-2, ``layers`` in LLaMA / OPT / Pythia / wav2vec2, ``layer`` in BERT, ``block`` in T5).
    """
    import torch

    found = [m for m in model.modules()
             if isinstance(m, torch.nn.ModuleList) and len(m) == n_layers and n_layers > 0
             and len({type(block) for block in m}) == 1]
    return found[0] if len(found) == 1 else None


def _tensor(value: Any) -> Any:
    return value[0] if isinstance(value, (tuple, list)) else value


class LayerTaps:
    """Forward hooks on a stack of blocks that hand over hidden states and stop the pass.

    Parameters
    ----------
    model : torch.nn.Module
        The model the stack belongs to.
    stack : torch.nn.ModuleList
        The model's blocks (:func:`layer_stack`); hidden state ``h`` (``0 <= h < len(stack)``)
        is the input of block ``h``.
    """

    def __init__(self, model: Any, stack: Any) -> None:
        self.model = model  # the hooks belong to this model (a copied LoadedModel may hold another)
        self.n_layers = len(stack)
        self._local = threading.local()
        self._handles = [stack[0].register_forward_pre_hook(self._before_first, with_kwargs=True)]
        self._handles += [block.register_forward_hook(self._after(i)) for i, block in enumerate(stack)]

    def _take(self, h: int, value: Any) -> None:
        state = getattr(self._local, "state", None)
        if state is None:  # another caller's whole pass: the hooks do nothing
            return
        wanted, got = state
        if h in wanted:
            got[h] = value
        if len(got) == len(wanted):
            raise _Reached

    def _before_first(self, module: Any, args: tuple, kwargs: dict) -> None:
        state = getattr(self._local, "state", None)
        if state is not None and 0 in state[0]:
            self._take(0, args[0] if args else kwargs["hidden_states"])

    def _after(self, i: int) -> Any:
        def hook(module: Any, args: tuple, output: Any) -> None:
            self._take(i + 1, _tensor(output))
        return hook

    def run(self, call: Any, wanted: Sequence[int]) -> dict[int, Any]:
        """Hidden states ``wanted`` (each below ``n_layers``) from ``call()``, stopped after the deepest."""
        if not wanted or max(wanted) >= self.n_layers or min(wanted) < 0:
            raise ValueError(f"hidden states {list(wanted)} are not all within 0..{self.n_layers - 1}")
        got: dict[int, Any] = {}
        self._local.state = (set(wanted), got)
        try:
            call()
        except _Reached:
            pass
        finally:
            self._local.state = None
        missing = set(wanted) - set(got)
        if missing:
            raise RuntimeError(f"the forward pass never reached hidden states {sorted(missing)}")
        return got

    def remove(self) -> None:
        """Take the hooks off the model."""
        for handle in self._handles:
            handle.remove()
        self._handles = []


class WholePasses:
    """The verdict for a model whose hidden states must come from whole passes (no usable stack)."""

    def __init__(self, model: Any) -> None:
        self.model = model


def _agrees(taps: LayerTaps, model: Any, probe: dict[str, Any]) -> bool:
    """Do the hooks hand over the model's own hidden states 0..n_layers - 1 for the input ``probe``?"""
    import torch

    wanted = list(range(taps.n_layers))
    try:
        got = taps.run(lambda: model(**probe, output_hidden_states=False), wanted)
    except Exception as err:  # any failure means: run this model whole
        log.info("layer taps failed (%s): the model is run whole", err)
        return False
    own = model(**probe, output_hidden_states=True).hidden_states
    if len(own) != taps.n_layers + 1:
        return False
    for h in wanted:
        a, b = got[h].float(), own[h].float()
        scale = float(b.abs().max()) + 1e-6
        if a.shape != b.shape or not torch.allclose(a, b, rtol=1e-3, atol=1e-3 * scale):
            return False
    return True


def _probe(inputs: dict[str, Any]) -> dict[str, Any]:
    """One row of a batch (token inputs cut to ``PROBE_TOKENS``): the input the hooks are checked on."""
    probe = {}
    for key, value in inputs.items():
        value = value[:1] if getattr(value, "ndim", 0) >= 1 else value
        if key in ("input_ids", "attention_mask", "token_type_ids") and getattr(value, "ndim", 0) == 2:
            value = value[:, :PROBE_TOKENS]
        probe[key] = value
    return probe


def _set_up(owner: Any, inputs: dict[str, Any]) -> None:
    """Find the stack, check the hooks on a probe of this batch, and cache them (or a WholePasses verdict) on ``owner``."""
    model, n_layers = owner.model, int(owner.n_layers)
    probe = _probe(inputs)
    stack = layer_stack(model, n_layers)
    taps = LayerTaps(model, stack) if stack is not None else None
    if taps is not None and not _agrees(taps, model, probe):
        taps.remove()
        taps = None
    if taps is None:
        log.info("model %s: hidden states are taken from whole passes", getattr(owner, "name", "?"))
    owner.layer_taps = taps if taps is not None else WholePasses(model)


def _without_cache(model: Any, inputs: dict[str, Any]) -> dict[str, Any]:
    """``inputs`` plus ``use_cache=False`` where the model takes it: nothing is generated from a
    feature pass, so a key/value cache would be memory for nothing."""
    import inspect

    return {**inputs, "use_cache": False} if "use_cache" in inspect.signature(model.forward).parameters else inputs


def hidden_states_to(owner: Any, inputs: dict[str, Any], hs_index: Sequence[int]) -> list[Any]:
    """Hidden states ``hs_index`` of one batch, the model run only as deep as the deepest.

    Parameters
    ----------
    owner : LoadedModel or LoadedSpeechModel
        Holds ``model`` and ``n_layers``; its ``layer_taps`` attribute caches the hooks
        (:class:`WholePasses` once they are found not to apply: the model is then always run
        whole). Hooks or verdict made for another model (a copied ``owner``) are made anew.
    inputs : dict
        Keyword inputs of ``owner.model`` (on its device); ``use_cache=False`` is added where
        the model takes it.
    hs_index : sequence of int
        Hidden-state indices in ``0..n_layers``.

    Returns
    -------
    list of torch.Tensor, one per entry of ``hs_index``, as the model computes them.
    """
    import torch

    model, n_layers = owner.model, int(owner.n_layers)
    inputs = _without_cache(model, inputs)

    def unset() -> bool:
        return getattr(owner.layer_taps, "model", None) is not model

    with torch.inference_mode():
        if max(hs_index) < n_layers and unset():
            with _FIRST_USE:
                if unset():
                    _set_up(owner, inputs)
        if max(hs_index) >= n_layers or isinstance(owner.layer_taps, WholePasses):
            out = model(**inputs, output_hidden_states=True)
            return [out.hidden_states[h] for h in hs_index]
        got = owner.layer_taps.run(lambda: model(**inputs, output_hidden_states=False),
                                   sorted(set(hs_index)))
        return [got[h] for h in hs_index]
