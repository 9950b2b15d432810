"""camel.devices: the device names, and the backend module that computes on each.

"cpu" is camel/backend_cpu.py (NumPy), "mps" camel/backend_mps.py (the Metal kernels, on
whichever shim camel.metal loaded); both implement the same functions with the same
signatures. A storage's device follows from its type: np.ndarray on "cpu",
camel.metal.DeviceArray on "mps". The Tensor (camel/tensor.py) and the ops
(camel/functional.py) both ask here; this module knows neither.
"""

import importlib

import numpy as np

DEVICES = ("cpu", "mps")
_backends = {}  # device -> backend module, filled on first use


def canonical_device(device):
    """The device name camel uses. 'cuda' is an alias of 'mps' on the CUDA shim (an NVIDIA
    GPU running the same Metal kernels, translated to PTX), so PyTorch-style code runs
    unchanged there; tensors then report device 'mps'. Elsewhere 'cuda' is an error that
    says what to write."""
    if device != "cuda":
        return device
    from camel import metal

    try:
        shim = metal.shim()
        where = f"the {shim} shim ({metal.device_name()})"
    except metal.MetalError as e:
        shim, where = None, f"no GPU shim ({e})"
    if shim == "cuda":
        return "mps"
    raise ValueError(
        f"[tensor] device 'cuda' is an alias of 'mps' on the CUDA shim (NVIDIA GPUs run "
        f"camel's Metal kernels translated to PTX); this process runs {where}: write "
        "device='mps' for the GPU kernels here, or 'cpu'. On Linux with an NVIDIA driver, "
        "CAMEL_SHIM=cuda selects the CUDA shim."
    )


def get_backend(device):
    """The backend module of a device: camel.backend_cpu or camel.backend_mps."""
    backend = _backends.get(device)
    if backend is not None:
        return backend
    if not isinstance(device, str):  # x.to(torch.float32) habits: dtypes are not devices
        raise TypeError(
            f"[tensor] a device is a string such as 'cpu' or 'mps', got {device!r}; camel has "
            "no dtype conversion (make a new tensor: camel.tensor(t.numpy(), dtype=...))"
        )
    if device == "cuda":
        return get_backend(canonical_device(device))
    if device == "cpu":
        from camel import backend_cpu

        _backends["cpu"] = backend_cpu
        return backend_cpu
    if device == "mps":
        try:
            _backends["mps"] = importlib.import_module("camel.backend_mps")
            return _backends["mps"]
        except ImportError as e:
            raise RuntimeError(
                f"[tensor] device 'mps' is not available: importing camel.backend_mps failed "
                f"({e}). It needs camel/backend_mps.py and a built shim (see README)."
            ) from e
    raise ValueError(f"[tensor] unknown device {device!r}: camel knows {DEVICES}")


def device_of(storage):
    """'cpu' for an np.ndarray, 'mps' for a camel.metal.DeviceArray."""
    if isinstance(storage, np.ndarray):
        return "cpu"
    if isinstance(storage, np.generic):  # a backend bug worth a clear message
        raise TypeError(
            f"[tensor] a backend returned the NumPy scalar {storage!r}; storages must be "
            "arrays (wrap 0-d results with np.asarray)"
        )
    return "mps"
