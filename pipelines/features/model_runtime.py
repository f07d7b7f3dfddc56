"""How a transformer is held in memory: its dtype, quantization, device and sharding.

A feature space that runs a model (``language_model``, ``speech_model``, ``surprisal``) may set

* ``dtype``: ``float32``, ``bfloat16``, ``float16`` or ``auto`` (the default): bfloat16 on a GPU
  for a model of more than about a billion parameters (:data:`AUTO_HALF_MIN_PARAMS`; float16 on a
  GPU without bfloat16), float32 otherwise (always on a CPU);
* ``quantization``: ``8bit`` or ``4bit`` weights through bitsandbytes (a CUDA GPU only);
* ``device_map``: ``auto`` to shard the model over every visible GPU (and offload what does not
  fit to the CPU) through accelerate.

:func:`resolve_runtime` turns these keys, the model's config and the machine into a
:class:`ModelRuntime` (what is recorded in the manifest and hashed into the feature cache
key); :func:`load_kwargs` gives the matching ``from_pretrained`` arguments. Features are
always handed on as float32, whatever the model computes in.

Importing this module imports neither torch nor transformers.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Mapping

from pipelines.errors import ConfigError

__all__ = [
    "DTYPES",
    "QUANTIZATIONS",
    "DEVICE_MAPS",
    "AUTO_HALF_MIN_PARAMS",
    "ModelRuntime",
    "cache_fields",
    "approx_parameters",
    "resolve_device",
    "resolve_runtime",
    "runtime_of",
    "load_kwargs",
    "place",
    "input_device",
]

#: Values of ``features[].dtype``.
DTYPES = ("auto", "float32", "bfloat16", "float16")
#: Values of ``features[].quantization`` (None: full weights).
QUANTIZATIONS = ("8bit", "4bit")
#: Values of ``features[].device_map`` (None: the whole model on one device).
DEVICE_MAPS = ("auto",)
#: ``dtype: auto`` picks bfloat16 on a GPU above this many parameters.
AUTO_HALF_MIN_PARAMS = 1_000_000_000


@dataclass(frozen=True)
class ModelRuntime:
    """A model's resolved placement.

    Attributes
    ----------
    dtype : {"float32", "bfloat16", "float16"}
        What the weights and activations are computed in (a quantized model: its compute dtype).
    device : str
        ``"cpu"``, ``"cuda"``, ``"cuda:1"``..., or ``"auto"`` when ``device_map`` shards it.
    quantization : {"8bit", "4bit"} or None
    device_map : {"auto"} or None
    n_parameters : int
        Approximate parameter count read from the config (what ``dtype: auto`` looked at).
    """

    dtype: str
    device: str
    quantization: str | None = None
    device_map: str | None = None
    n_parameters: int = 0

    def as_dict(self) -> dict[str, Any]:
        """Plain values for the manifest."""
        return asdict(self)



def cache_fields(runtime: Mapping[str, Any]) -> dict[str, Any]:
    """What of a runtime (:meth:`ModelRuntime.as_dict`) changes the numbers: dtype, quantization,
    sharding and the kind of device (``cuda``, not ``cuda:1``)."""
    device = "auto" if runtime.get("device_map") else str(runtime["device"]).split(":")[0]
    return {"dtype": runtime["dtype"], "quantization": runtime.get("quantization"), "device": device}


def approx_parameters(config: Any) -> int:
    """About how many parameters a transformer config describes (embeddings + 12 h² per layer).

    Good to a few percent for GPT-, LLaMA- and BERT-shaped models; only compared with
    :data:`AUTO_HALF_MIN_PARAMS`.
    """
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden = _first_int(cfg, "hidden_size", "n_embd", "d_model")
    layers = _first_int(cfg, "num_hidden_layers", "n_layer", "num_layers", "encoder_layers")
    vocab = _first_int(cfg, "vocab_size")
    inter = _first_int(cfg, "intermediate_size", "n_inner", "ffn_dim", "d_ff", "encoder_ffn_dim") or 4 * hidden
    mlp = (3 if getattr(cfg, "hidden_act", "") in ("silu", "swiglu") else 2) * hidden * inter
    return int(vocab * hidden + layers * (4 * hidden * hidden + mlp))


def _first_int(cfg: Any, *names: str) -> int:
    for name in names:
        value = getattr(cfg, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return 0


def resolve_device(device: str) -> str:
    """``"auto"``: ``"cuda"`` when torch sees a GPU, else ``"cpu"``; anything else as given."""
    if device != "auto":
        return str(device)
    import torch  # heavy and optional: imported only when a model is placed

    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_runtime(config: Any, *, dtype: str = "auto", quantization: str | None = None,
                    device_map: str | None = None, device: str = "auto", origin: str = "features[]") -> ModelRuntime:
    """The placement a model gets on this machine, or a ConfigError naming the key and the fix.

    Parameters
    ----------
    config : transformers.PretrainedConfig
        The model's config (for its size).
    dtype, quantization, device_map : str or None
        The feature space's keys (see the module docstring).
    device : str
        ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:1"``...
    origin : str
        Names the config entry in messages (``features[lm]``).

    Returns
    -------
    ModelRuntime
    """
    if dtype not in DTYPES:
        raise ConfigError(f"{origin}.dtype: {dtype!r} is not a dtype: use one of {', '.join(DTYPES)}")
    if quantization is not None and quantization not in QUANTIZATIONS:
        raise ConfigError(f"{origin}.quantization: {quantization!r} is unknown: use one of "
                          f"{', '.join(QUANTIZATIONS)} or leave it out")
    if device_map is not None and device_map not in DEVICE_MAPS:
        raise ConfigError(f"{origin}.device_map: {device_map!r} is unknown: use 'auto' or leave it out")
    where = resolve_device(device)
    on_gpu = where.startswith("cuda")
    if quantization is not None:
        if not on_gpu:
            raise ConfigError(f"{origin}.quantization: {quantization!r} weights need a CUDA GPU (bitsandbytes) and "
                              f"this worker has none (device {where!r}): remove 'quantization' (and use "
                              "dtype: bfloat16 to halve the memory) or run the features step on a GPU worker")
        _check_bitsandbytes(origin, quantization)
    if device_map is not None:
        _check_accelerate(origin)
    n_params = approx_parameters(config)
    if dtype == "auto":
        gpu = on_gpu or (device_map is not None and _gpu_ok())
        dtype = "bfloat16" if quantization is not None or (gpu and n_params > AUTO_HALF_MIN_PARAMS) else "float32"
        if dtype == "bfloat16" and not _bf16_ok():
            dtype = "float16"  # a GPU older than Ampere has no bfloat16
    elif dtype == "float32" and quantization is not None:
        raise ConfigError(f"{origin}.dtype: float32 with quantization {quantization!r}: quantized weights compute "
                          "in half precision; use dtype: bfloat16 (or auto) or drop 'quantization'")
    return ModelRuntime(dtype=dtype, device="auto" if device_map else where, quantization=quantization,
                        device_map=device_map, n_parameters=n_params)


def runtime_of(model: str, revision: str | None = None, *, origin: str = "features[]", **keys: Any) -> ModelRuntime:
    """:func:`resolve_runtime` for a model folder or hub id, reading only its config.

    Raises
    ------
    ConfigError
        As :func:`resolve_runtime`.
    ModelError
        The model's config cannot be read (see ``safe_model_config``).
    """
    from pipelines.features.model_source import safe_model_config

    _, _, config = safe_model_config(model, revision, "model")
    return resolve_runtime(config, origin=origin, **keys)


def _bf16_ok() -> bool:
    """False only on a CUDA GPU that lacks bfloat16 (before Ampere)."""
    import torch  # heavy and optional

    return not torch.cuda.is_available() or bool(torch.cuda.is_bf16_supported())


def _gpu_ok() -> bool:
    import torch  # heavy and optional

    return bool(torch.cuda.is_available())


def _check_bitsandbytes(origin: str, quantization: str) -> None:
    try:
        import bitsandbytes  # noqa: F401  optional, GPU only: imported only to check it is there
    except ImportError as err:
        raise ConfigError(f"{origin}.quantization: {quantization!r} needs the bitsandbytes package, which is not "
                          "installed: pip install 'neuroflow[gpu]' on the GPU worker") from err


def _check_accelerate(origin: str) -> None:
    try:
        import accelerate  # noqa: F401  transformers needs it for device_map
    except ImportError as err:
        raise ConfigError(f"{origin}.device_map: 'auto' needs the accelerate package: pip install accelerate") from err


def load_kwargs(runtime: ModelRuntime) -> dict[str, Any]:
    """``from_pretrained`` arguments for ``runtime``: dtype, quantization config, device map.

    Without ``device_map`` or quantization the model is loaded on the CPU and moved with
    ``.to(runtime.device)`` by the caller (``"place"`` is then True).
    """
    import torch  # heavy and optional: imported only when a model loads

    dtype = getattr(torch, runtime.dtype)
    kwargs: dict[str, Any] = {"dtype": dtype}
    if runtime.quantization is not None:
        from transformers import BitsAndBytesConfig

        if runtime.quantization == "8bit":
            kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
        else:
            kwargs["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=dtype,
                                                                bnb_4bit_quant_type="nf4")
        kwargs["device_map"] = runtime.device_map or {"": runtime.device}
    elif runtime.device_map is not None:
        kwargs["device_map"] = runtime.device_map
    return kwargs


def place(net: Any, runtime: ModelRuntime) -> Any:
    """The loaded model in eval mode on its device (a sharded or quantized model is already placed)."""
    if runtime.device_map is None and runtime.quantization is None:
        net = net.to(device=runtime.device)
    return net.eval()


def input_device(net: Any, runtime: ModelRuntime) -> str:
    """Where a batch's inputs go: the device of the model's first parameters (its embeddings)."""
    if runtime.device_map is None and runtime.quantization is None:
        return runtime.device
    return str(next(net.parameters()).device)
