"""Which device pagedlm can run on here, and if CUDA is unusable, why, in words a user can
act on: no NVIDIA driver, a driver older than the CUDA runtime, a CPU-only torch, or no GPU."""
import ctypes

import torch


def cuda_driver_version():
    """The CUDA version the NVIDIA driver supports (e.g. 13000), or None when no driver is installed."""
    try:
        libcuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None
    version = ctypes.c_int(0)
    if libcuda.cuDriverGetVersion(ctypes.byref(version)) != 0:
        return None
    return version.value


def _version_text(v):
    return f"{v // 1000}.{v % 1000 // 10}"


def cuda_unavailable_reason():
    """None when torch can use a CUDA GPU; otherwise one sentence saying why not."""
    if torch.cuda.is_available():
        return None
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU-only build; install a CUDA build of torch"
    driver = cuda_driver_version()
    if driver is None:
        return "no NVIDIA driver found (libcuda.so.1 is not installed)"
    needed = _runtime_version()
    if needed and driver < needed:
        return (f"the NVIDIA driver supports CUDA {_version_text(driver)}, older than the CUDA "
                f"{_version_text(needed)} this build needs; update the driver")
    return "no CUDA GPU is visible (check CUDA_VISIBLE_DEVICES and nvidia-smi)"


def _runtime_version():
    """The newer of torch's CUDA version and pagedlm's compiled runtime, as an int (13000)."""
    versions = []
    if torch.version.cuda:
        major, minor = (int(x) for x in torch.version.cuda.split(".")[:2])
        versions.append(major * 1000 + minor * 10)
    from pagedlm import _C
    if _C.cuda_compiled:
        versions.append(_C.cuda_runtime_version)
    return max(versions, default=0)


def resolve_device(requested=None):
    """torch.device for `requested` ("cpu", "cuda", "cuda:1", None: CUDA when usable, else the
    CPU); ValueError naming `device` when it cannot be used here."""
    if requested is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(requested)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"device: {requested!r} is not a device (use 'cpu', 'cuda' or 'cuda:N')") from err
    if device.type == "cuda":
        reason = cuda_unavailable_reason()
        if reason:
            raise ValueError(f"device: {requested!r} asked for, but {reason}")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device: {requested!r} asked for, but only {torch.cuda.device_count()} "
                             "CUDA device(s) are visible")
    elif device.type != "cpu":
        raise ValueError(f"device: {requested!r} is not supported (use 'cpu', 'cuda' or 'cuda:N')")
    return device
