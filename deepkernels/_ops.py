"""The op pattern every kernel family uses, and loading of the compiled extensions.

Each op lives in namespace ``deepkernels`` and has four faces (see ../STYLE): a schema, a CUDA kernel
registered by ``deepkernels._C``, a CPU kernel that is the pure-torch reference, and a fake kernel
for torch.compile / CUDA graphs. A family module calls :func:`define_op` at import time; the package
``__init__`` calls :func:`load_extension` once every family is defined.

The SIMT emulator (``deepkernels._emu``, csrc/emulator) registers the same CUDA kernels, compiled for
the CPU, as the CPU kernels of namespace ``deepkernels_emu``. While emulation is on
(``DEEPKERNELS_EMULATE=1`` at import, or :func:`set_emulation` / :func:`emulate`), the CPU kernel of
each ``deepkernels`` op runs the emulated CUDA kernel instead of the reference.
"""
from __future__ import annotations

import contextlib
import os
import sys
from typing import Callable, Iterable, Iterator, Sequence

import torch

NAMESPACE = "deepkernels"
EMU_NAMESPACE = "deepkernels_emu"
lib = torch.library.Library(NAMESPACE, "DEF")
_emu_lib = torch.library.Library(EMU_NAMESPACE, "DEF")

_REFERENCES: dict[str, Callable] = {}
_CUDA_FALLBACK: set[str] = set()  # ops whose CUDA tensors run the reference (no compiled kernel)
_extension_error: str | None = "not loaded yet"
_emulator_error: str | None = "not loaded yet"
_emulate = os.environ.get("DEEPKERNELS_EMULATE") == "1"
_notice_printed = False


def define_op(name: str, schema: str, reference: Callable, fake: Callable) -> None:
    """Define ``deepkernels::name`` with ``schema`` (the part after the name), the reference as its
    CPU kernel and ``fake`` as its meta kernel. The CUDA kernel comes from the extension; where the
    extension lacks one, :func:`load_extension` registers the reference for CUDA tensors too.
    The same schema in ``deepkernels_emu`` receives the emulated kernel."""
    lib.define(name + schema)
    _emu_lib.define(name + schema)
    lib.impl(name, _cpu_kernel(name, reference), "CPU")
    torch.library.register_fake(f"{NAMESPACE}::{name}", fake, lib=lib)
    _REFERENCES[name] = reference


def _cpu_kernel(name: str, reference: Callable) -> Callable:
    def cpu_kernel(*args, **kwargs):
        if _emulate:
            if _emulator_error is not None:
                raise RuntimeError(f"deepkernels: emulation is on (DEEPKERNELS_EMULATE=1) but the emulator is "
                                   f"unavailable: {_emulator_error}")
            if has_emulated_kernel(name):
                return getattr(getattr(torch.ops, EMU_NAMESPACE), name)(*args, **kwargs)
        return reference(*args, **kwargs)

    cpu_kernel.__name__ = f"{name}_cpu"
    return cpu_kernel


def has_emulated_kernel(name: str) -> bool:
    """True when the emulator has a kernel for ``deepkernels::name`` (ops without a CUDA kernel run
    their reference under emulation too, as they do on CUDA tensors)."""
    return _emulator_error is None and torch._C._dispatch_has_kernel_for_dispatch_key(
        f"{EMU_NAMESPACE}::{name}", "CPU")


def emulator_available() -> bool:
    return _emulator_error is None


def emulator_error() -> str | None:
    return _emulator_error


def emulation_enabled() -> bool:
    return _emulate


def set_emulation(enabled: bool) -> bool:
    """Turn emulation of the CUDA kernels on CPU tensors on or off; returns the previous setting."""
    global _emulate
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled: expected a bool, got {type(enabled).__name__}")
    if enabled and _emulator_error is not None:
        raise RuntimeError(f"deepkernels: the emulator is unavailable: {_emulator_error}")
    previous, _emulate = _emulate, enabled
    return previous


@contextlib.contextmanager
def emulate(enabled: bool = True) -> Iterator[None]:
    """``with deepkernels.emulate(): ...`` runs ops on CPU tensors through the emulated CUDA kernels."""
    previous = set_emulation(enabled)
    try:
        yield
    finally:
        set_emulation(previous)


def emulator_stats() -> dict:
    """Emulated launches since import: ``{"launches", "ctas", "switches", "seconds", "kernels": {name: n}}``."""
    if _emulator_error is not None:
        return {"launches": 0, "ctas": 0, "switches": 0, "seconds": 0.0, "kernels": {}}
    return sys.modules[f"{__package__}._emu"].stats()


def _import_emulator() -> None:
    """Import deepkernels._emu (registers the emulated kernels in deepkernels_emu). DEEPKERNELS_EMULATOR_LIB
    names another build of it, e.g. the AddressSanitizer one of `make memcheck`."""
    path = os.environ.get("DEEPKERNELS_EMULATOR_LIB")
    if not path:
        from . import _emu  # noqa: F401
        return
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"{__package__}._emu", path)
    if spec is None or not os.path.isfile(path):
        raise ImportError(f"DEEPKERNELS_EMULATOR_LIB={path}: no such extension module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)


def load_extension() -> None:
    global _extension_error, _emulator_error
    if os.environ.get("DEEPKERNELS_FORCE_REFERENCE") == "1":
        _extension_error = "DEEPKERNELS_FORCE_REFERENCE=1"
    else:
        try:
            from . import _C  # noqa: F401  (registers the CUDA kernels)

            _extension_error = None
        except ImportError as exc:  # not built, or built against another torch
            _extension_error = f"{type(exc).__name__}: {exc}"
    try:
        _import_emulator()
        _emulator_error = None
    except ImportError as exc:
        _emulator_error = f"{type(exc).__name__}: {exc}"
    if _emulate and _emulator_error is not None:
        print(f"deepkernels: DEEPKERNELS_EMULATE=1 but the emulator is unavailable ({_emulator_error}); "
              "ops on CPU tensors will raise.", file=sys.stderr)
    for name, reference in _REFERENCES.items():
        if not torch._C._dispatch_has_kernel_for_dispatch_key(f"{NAMESPACE}::{name}", "CUDA"):
            lib.impl(name, reference, "CUDA")
            _CUDA_FALLBACK.add(name)
    if _extension_error is not None:
        _print_notice_once()


def _print_notice_once() -> None:
    global _notice_printed
    if _notice_printed or os.environ.get("DEEPKERNELS_QUIET") == "1":
        return
    _notice_printed = True
    print(f"deepkernels: CUDA extension unavailable ({_extension_error.splitlines()[0]}); "
          "ops run on the pure-torch references.", file=sys.stderr)


def extension_loaded() -> bool:
    return _extension_error is None


def extension_error() -> str | None:
    return _extension_error


def has_cuda_kernel(name: str) -> bool:
    """True when ``deepkernels::name`` runs a compiled kernel (not the reference) on CUDA tensors."""
    return name in _REFERENCES and name not in _CUDA_FALLBACK


def runs_reference(name: str, t: torch.Tensor) -> bool:
    """True when ``deepkernels::name`` on tensors like ``t`` runs its reference (the CPU kernel, which
    refuses bad index values) rather than a (CUDA or emulated) kernel, which trusts them."""
    if t.device.type == "cpu":
        return not (_emulate and has_emulated_kernel(name))
    if t.device.type == "cuda":
        return not has_cuda_kernel(name)
    return True


# ----------------------------------------------------------------------------------------------
# Host-side argument checks shared by the families. Each raises before any launch with a message
# naming the argument, what was expected and what was given.

def _fmt_dtypes(dtypes: Iterable[torch.dtype]) -> str:
    return " or ".join(str(d).replace("torch.", "") for d in dtypes)


def check_tensor(name: str, t, *, dtypes: Sequence[torch.dtype] | None = None, ndim: int | None = None,
                 shape: Sequence[int | None] | None = None, device: torch.device | None = None,
                 contiguous: bool = False, inner_contiguous: bool = False) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if dtypes is not None and t.dtype not in dtypes:
        raise ValueError(f"{name}: expected dtype {_fmt_dtypes(dtypes)}, got {str(t.dtype).replace('torch.', '')}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name}: expected {ndim} dims, got {t.dim()} (shape {tuple(t.shape)})")
    if shape is not None:
        if t.dim() != len(shape) or any(s is not None and s != a for s, a in zip(shape, t.shape)):
            want = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
            raise ValueError(f"{name}: expected shape {want}, got {list(t.shape)}")
    if device is not None and t.device != device:
        raise ValueError(f"{name}: expected a tensor on {device}, got {t.device}")
    if contiguous and not t.is_contiguous():
        raise ValueError(f"{name}: expected a contiguous tensor, got strides {t.stride()} for shape {tuple(t.shape)}")
    if inner_contiguous and t.dim() > 0 and t.size(-1) > 1 and t.stride(-1) != 1:
        raise ValueError(f"{name}: expected unit stride in the last dim, got strides {t.stride()}")


def device_checks_enabled() -> bool: return os.environ.get("DEEPKERNELS_CHECK", "") not in ("", "0")


def _type_name(value) -> str:
    return type(value).__name__


def check_int(name: str, value, *, min_value: int | None = None, max_value: int | None = None) -> int:
    """An int argument (numpy / 0-dim-free integer types via __index__; never a bool, a float or a string);
    returns it as a Python int. TypeError for another type, ValueError outside [min_value, max_value]."""
    bad = isinstance(value, bool) or isinstance(value, torch.Tensor) or not hasattr(type(value), "__index__")
    if not bad:
        try:
            index = int(value.__index__())
        except (TypeError, ValueError):  # e.g. a numpy array that is not an integer scalar
            bad = True
    if bad:
        shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
        raise TypeError(f"{name}: expected an int, got {_type_name(value)} {shown}")
    value = index
    if min_value is not None and value < min_value:
        raise ValueError(f"{name}: expected an int >= {min_value}, got {value}")
    if max_value is not None and value > max_value:
        raise ValueError(f"{name}: expected an int <= {max_value}, got {value}")
    return value


def check_bool(name: str, value) -> bool:
    """A bool argument: True/False (or a numpy bool); never a string, an int or None taken by truthiness."""
    if isinstance(value, bool):
        return value
    if type(value).__name__ == "bool_":  # numpy.bool_
        return bool(value)
    raise TypeError(f"{name}: expected a bool (True or False), got {_type_name(value)} {value!r}")


def check_dtype_arg(name: str, value, allowed: Sequence[torch.dtype]) -> torch.dtype:
    """A torch.dtype argument among ``allowed`` (TypeError for a string or another type)."""
    if not isinstance(value, torch.dtype):
        raise TypeError(f"{name}: expected a torch.dtype ({_fmt_dtypes(allowed)}), got {_type_name(value)} {value!r}")
    if value not in allowed:
        raise ValueError(f"{name}: expected {_fmt_dtypes(allowed)}, got {str(value).replace('torch.', '')}")
    return value


def check_pair(name: str, value) -> tuple:
    """A (tensor, tensor) pair such as DeepGEMM's (fp8 data, scales) operands."""
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        got = f"a {_type_name(value)} of length {len(value)}" if isinstance(value, (tuple, list)) else _type_name(value)
        raise TypeError(f"{name}: expected a pair (fp8 tensor, fp32 scale tensor), got {got}")
    return tuple(value)


def check_index_values(name: str, t: torch.Tensor, low: int, high: int, what: str = "values") -> None:
    """Every element of integer tensor ``t`` in [low, high) (a host read: one sync on a CUDA tensor).
    ValueError naming the argument, the range, the offending range and the first bad position."""
    if t.numel() == 0 or t.device.type == "meta":  # meta: no values (shape-only tracing)
        return
    bad = (t < low) | (t >= high)
    if bool(bad.any()):
        first = int(bad.reshape(-1).nonzero()[0])
        where = tuple(int(i) for i in torch.unravel_index(torch.tensor(first), tuple(t.shape))) if t.dim() > 1 \
            else (first,)
        raise ValueError(f"{name}: expected {what} in [{low}, {high}), got {int(t.reshape(-1)[first])} at index "
                         f"{list(where) if len(where) > 1 else where[0]} (values span [{int(t.min())}, {int(t.max())}])")


def run_device_checks(t: torch.Tensor) -> bool:
    """Whether a wrapper validates the values of index/count tensor ``t`` itself. CPU tensors are checked by
    the references (the CPU kernels); under emulation (the CUDA kernels on CPU tensors) and on CUDA the values
    are trusted unless DEEPKERNELS_CHECK=1 (read on each call; one host sync per check). Never while
    torch.compile traces (a data-dependent read)."""
    if not device_checks_enabled():
        return False
    try:
        if torch.compiler.is_compiling():
            return False
    except AttributeError:  # pragma: no cover - older torch
        pass
    return t.device.type != "meta"


def check_same_device(**tensors: torch.Tensor) -> None:
    devices = {name: t.device for name, t in tensors.items() if isinstance(t, torch.Tensor)}
    if len(set(devices.values())) > 1:
        first, device = next(iter(devices.items()))
        name, other = next((n, d) for n, d in devices.items() if d != device)
        listing = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"{name}: expected a tensor on {device} (the device of {first}; all tensors on one "
                         f"device), got {other} ({listing})")


def check_out_buffer(name: str, out: torch.Tensor, **inputs) -> None:
    """An output buffer a kernel writes: no two of its elements share memory (not an expanded / broadcast
    view), and it does not overlap any of ``inputs`` (tensors read by the same call; None ignored).
    ValueError naming ``name`` (and the input it overlaps). Meta tensors have no memory, and tracing
    (torch.compile) has no addresses: skipped."""
    if out.device.type == "meta" or torch.compiler.is_compiling():
        return
    if torch._debug_has_internal_overlap(out) == 1:
        raise ValueError(f"{name}: expected an output tensor whose elements do not share memory, got an expanded / "
                         f"broadcast view (shape {list(out.shape)}, strides {list(out.stride())}); pass a fresh tensor")
    if out.numel() == 0:
        return
    lo, hi = _byte_span(out)
    for other, t in inputs.items():
        if isinstance(t, torch.Tensor) and t.device == out.device and t.numel() > 0 and t.device.type != "meta":
            t_lo, t_hi = _byte_span(t)
            if lo < t_hi and t_lo < hi:
                raise ValueError(f"{name}: expected an output tensor that does not overlap the input {other}, got "
                                 f"one sharing its memory (bytes [{lo:#x}, {hi:#x}) vs [{t_lo:#x}, {t_hi:#x}))")


def _byte_span(t: torch.Tensor) -> tuple[int, int]:
    """[first, last + 1) byte addresses a strided tensor can touch."""
    start = t.data_ptr()
    low = sum((s - 1) * st for s, st in zip(t.shape, t.stride()) if st < 0)
    high = sum((s - 1) * st for s, st in zip(t.shape, t.stride()) if st > 0)
    return start + low * t.element_size(), start + (high + 1) * t.element_size()


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def check_multiple(name: str, value: int, multiple: int) -> None:
    if value % multiple != 0:
        raise ValueError(f"{name}: expected a multiple of {multiple}, got {value}")


__all__ = ["define_op", "load_extension", "extension_loaded", "extension_error", "has_cuda_kernel",
           "has_emulated_kernel", "runs_reference", "emulator_available", "emulator_error", "emulation_enabled",
           "set_emulation", "emulate", "emulator_stats",
           "check_tensor", "check_same_device", "check_multiple", "ceil_div", "device_checks_enabled", "check_int",
           "check_bool", "check_dtype_arg", "check_pair", "check_index_values", "run_device_checks",
           "check_out_buffer"]
