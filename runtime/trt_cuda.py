"""TensorRT and cuda-python, imported only when an engine is built or run; each missing one names the extra.

    trt, cudart = import_tensorrt(), import_cudart()
    name, cc = current_gpu(cudart)                     # ("NVIDIA H100 80GB HBM3", "9.0")
    ptr = cuda_call(cudart, cudart.cudaMalloc(1024), "cudaMalloc")
"""
from __future__ import annotations

from .trt_plan import TensorRTError

INSTALL_HINT = "pip install 'nanogpt-deploy[tensorrt]' (TensorRT needs an NVIDIA GPU and driver)"


def import_tensorrt():
    try:
        import tensorrt
    except ImportError as e:
        raise TensorRTError(f"the tensorrt package is not installed ({e}); {INSTALL_HINT}") from None
    return tensorrt


def import_cudart():
    """cuda-python's runtime API: `cuda.bindings.runtime` (cuda-python >= 12.6), else the older `cuda.cudart`."""
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart
        except ImportError as e:
            raise TensorRTError(f"cuda-python is not installed ({e}); {INSTALL_HINT}") from None
    return cudart


def cuda_call(cudart, result, what: str):
    """cuda-python returns (error, *values); raise on error, return the value(s)."""
    err, rest = (result[0], result[1:]) if isinstance(result, tuple) else (result, ())
    if err != cudart.cudaError_t.cudaSuccess:
        name = cudart.cudaGetErrorName(err)[1]
        name = name.decode() if isinstance(name, bytes) else str(name)
        raise TensorRTError(f"CUDA {what} failed: {name}")
    return rest[0] if len(rest) == 1 else (rest or None)


def current_gpu(cudart, device: int = 0) -> tuple[str, str]:
    """(name, compute capability "major.minor") of CUDA device `device`, with a clear error when there is none."""
    err, count = cudart.cudaGetDeviceCount()
    if err != cudart.cudaError_t.cudaSuccess or count == 0:
        raise TensorRTError("no CUDA GPU is visible (cudaGetDeviceCount found none); TensorRT engines are built "
                            "and run on an NVIDIA GPU: use the onnxruntime backend on this machine")
    if not 0 <= device < count:
        raise TensorRTError(f"CUDA device {device} does not exist; this machine has devices 0..{count - 1}")
    prop = cuda_call(cudart, cudart.cudaGetDeviceProperties(device), "cudaGetDeviceProperties")
    name = prop.name.decode(errors="replace") if isinstance(prop.name, bytes) else str(prop.name)
    return name.rstrip("\x00").strip(), f"{prop.major}.{prop.minor}"
