"""Build deepkernels: a torch CUDAExtension when torch has CUDA and a toolkit is found, else pure Python.

Environment:
  DEEPKERNELS_CUDA_ARCHS   ";"-separated list, default "80;89+PTX;90a" (90a -> sm_90a: wgmma/TMA code;
                           "+PTX" also embeds that arch's PTX, which newer GPUs (sm_100, sm_120) JIT-compile)
  DEEPKERNELS_SKIP_CUDA=1  pure-Python install (ops run on the torch references)
  DEEPKERNELS_REQUIRE_CUDA=1  fail instead of falling back when no toolkit is found (CI, make)
  CUDA_HOME                toolkit to use; else torch's pip toolchain (site-packages/nvidia/cu13), else /usr/local/cuda
  MAX_JOBS, NVCC_THREADS   parallel compile jobs / nvcc's per-file arch threads
  DEEPKERNELS_SKIP_EMULATOR=1  do not build deepkernels._emu (the SIMT emulator: the same kernel sources
                           compiled as host C++ with the host compiler; needs only the toolkit's headers)
  DEEPKERNELS_ONLY_EMULATOR=1  build only deepkernels._emu (`make memcheck` / `make racecheck`)
  DEEPKERNELS_EMULATOR_SANITIZE=address|thread  build the emulator with AddressSanitizer (memcheck) or
                           ThreadSanitizer (racecheck); Python then runs with the sanitizer's runtime in LD_PRELOAD
"""
import glob
import os
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCHS = "80;89+PTX;90a"


def log(msg):
    print(f"[deepkernels setup] {msg}", file=sys.stderr, flush=True)


def pip_cuda_toolkit():
    """The toolkit the nvidia-cuda-nvcc/-crt/-nvvm/-cccl wheels install next to torch's CUDA 13 libs."""
    try:
        import nvidia  # namespace package from the nvidia-* wheels
    except ImportError:
        return None
    for base in getattr(nvidia, "__path__", []):
        root = os.path.join(base, "cu13")
        if os.path.isfile(os.path.join(root, "bin", "nvcc")):
            return root
    return None


def resolve_cuda_home():
    if os.environ.get("CUDA_HOME"):
        return os.environ["CUDA_HOME"], "CUDA_HOME"
    pip_root = pip_cuda_toolkit()
    if pip_root:
        return pip_root, "pip wheels (nvidia-cuda-nvcc)"
    if os.path.isfile("/usr/local/cuda/bin/nvcc"):
        return "/usr/local/cuda", "/usr/local/cuda"
    return None, "none found"


def parse_archs(spec):
    """"80;89+PTX;90a" -> (cubin archs, PTX archs) = (["80", "89", "90a"], ["89"])."""
    cubins, ptx = [], []
    for arch in spec.split(";"):
        arch = arch.strip()
        if arch.endswith("+PTX"):
            arch = arch[: -len("+PTX")]
            ptx.append(arch)
        if arch:
            cubins.append(arch)
    return cubins, ptx


def gencode_flags(cubins, ptx):
    flags = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in cubins]
    return flags + [f"-gencode=arch=compute_{a},code=compute_{a}" for a in ptx]


def cuda_extension():
    if os.environ.get("DEEPKERNELS_ONLY_EMULATOR") == "1":
        log("DEEPKERNELS_ONLY_EMULATOR=1: only the emulator")
        return None
    if os.environ.get("DEEPKERNELS_SKIP_CUDA") == "1":
        log("DEEPKERNELS_SKIP_CUDA=1: pure-Python install")
        return None
    import torch

    required = os.environ.get("DEEPKERNELS_REQUIRE_CUDA") == "1"
    cuda_home, origin = resolve_cuda_home()
    problem = None
    if torch.version.cuda is None:
        problem = f"torch {torch.__version__} is a CPU build"
    elif cuda_home is None:
        problem = "no CUDA toolkit (set CUDA_HOME or pip install nvidia-cuda-nvcc==<torch's CUDA>.*)"
    if problem:
        if required:
            raise RuntimeError(f"DEEPKERNELS_REQUIRE_CUDA=1 but {problem}")
        log(f"{problem}: pure-Python install")
        return None

    os.environ["CUDA_HOME"] = cuda_home  # torch.utils.cpp_extension reads it at import time
    log(f"CUDA toolkit: {cuda_home} ({origin}); torch {torch.__version__} (CUDA {torch.version.cuda})")
    from torch.utils.cpp_extension import CUDAExtension

    include_dirs = [os.path.join(ROOT, "csrc")]
    library_dirs = []
    cuda_include = os.path.join(cuda_home, "include")
    if os.path.isdir(cuda_include):
        include_dirs.append(cuda_include)
    toolkit_lib = os.path.join(cuda_home, "lib")
    if not os.path.exists(os.path.join(cuda_home, "lib64", "libcudart.so")) and os.path.isdir(toolkit_lib):
        # The pip toolkit ships only libcudart.so.13: give the linker an unversioned name.
        link_dir = os.path.join(ROOT, "build", "cudart_link")
        os.makedirs(link_dir, exist_ok=True)
        versioned = sorted(glob.glob(os.path.join(toolkit_lib, "libcudart.so.*")))
        if versioned:
            link = os.path.join(link_dir, "libcudart.so")
            if os.path.lexists(link):
                os.remove(link)
            os.symlink(versioned[-1], link)
            library_dirs.append(link_dir)
    archs, ptx_archs = parse_archs(os.environ.get("DEEPKERNELS_CUDA_ARCHS", DEFAULT_ARCHS))
    nvcc_flags = [
        "-O3", "-std=c++17", "-lineinfo", "--expt-relaxed-constexpr",
        "-Xptxas=-v,--warn-on-spills", "-Werror", "all-warnings",
        f"--threads={os.environ.get('NVCC_THREADS', '1')}",
    ] + gencode_flags(archs, ptx_archs)
    sources = sorted(glob.glob(os.path.join("csrc", "**", "*.cu"), recursive=True))
    sources.append(os.path.join("csrc", "torch_bindings.cpp"))
    write_build_info(archs, ptx_archs, cuda_home, torch)
    log(f"archs {archs} (+PTX {ptx_archs}); {len(sources)} sources")
    return CUDAExtension(
        name="deepkernels._C",
        sources=sources,
        include_dirs=include_dirs,
        library_dirs=library_dirs,
        extra_compile_args={"cxx": ["-O3"], "nvcc": nvcc_flags},
    )


def emulator_extension():
    """deepkernels._emu: csrc/emulator/*.cpp (the kernels' launch.cu files under the emulator prelude, its
    runtime, and torch_bindings.cpp built with DEEPKERNELS_EMULATOR), compiled by the host C++ compiler."""
    if os.environ.get("DEEPKERNELS_SKIP_CUDA") == "1" or os.environ.get("DEEPKERNELS_SKIP_EMULATOR") == "1":
        log("emulator not built (DEEPKERNELS_SKIP_CUDA / DEEPKERNELS_SKIP_EMULATOR)")
        return None
    cuda_home, _ = resolve_cuda_home()
    cuda_include = os.path.join(cuda_home, "include") if cuda_home else None
    if cuda_include is None or not os.path.isfile(os.path.join(cuda_include, "cuda_fp8.h")):
        if os.environ.get("DEEPKERNELS_REQUIRE_CUDA") == "1":
            raise RuntimeError("DEEPKERNELS_REQUIRE_CUDA=1 but no CUDA headers for the emulator")
        log("no CUDA headers: emulator not built")
        return None
    from torch.utils.cpp_extension import CppExtension

    flags = ["-O2", "-std=c++20", "-fno-extern-tls-init", "-ffp-contract=off", "-Wno-attributes",
             "-Wno-unknown-pragmas"]
    link = []
    sanitizer = os.environ.get("DEEPKERNELS_EMULATOR_SANITIZE")
    if sanitizer:
        if sanitizer not in ("address", "thread"):
            raise RuntimeError(f"DEEPKERNELS_EMULATOR_SANITIZE: expected address or thread, got {sanitizer!r}")
        flags += [f"-fsanitize={sanitizer}", "-fno-omit-frame-pointer", "-g"]
        link += [f"-fsanitize={sanitizer}"]
        log(f"emulator: -fsanitize={sanitizer} build")
    sources = sorted(glob.glob(os.path.join("csrc", "emulator", "*.cpp")))
    return CppExtension(
        name="deepkernels._emu",
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc"), cuda_include],
        extra_compile_args={"cxx": flags},
        extra_link_args=link,
    )


def write_build_info(archs, ptx_archs, cuda_home, torch):
    with open(os.path.join(ROOT, "deepkernels", "_build_info.py"), "w") as f:
        f.write("# Written by setup.py at build time.\n")
        f.write(f"CUDA_ARCHS = {archs!r}\n")
        f.write(f"CUDA_PTX_ARCHS = {ptx_archs!r}\n")
        f.write(f"CUDA_HOME = {cuda_home!r}\n")
        f.write(f"TORCH_VERSION = {torch.__version__!r}\n")
        f.write(f"TORCH_CUDA_VERSION = {torch.version.cuda!r}\n")


ext_modules = [e for e in (cuda_extension(), emulator_extension()) if e is not None]
cmdclass = {}
if ext_modules:
    from torch.utils.cpp_extension import BuildExtension

    cmdclass["build_ext"] = BuildExtension.with_options(use_ninja=True)

setup(
    # bench ships too: `python -m bench` and `python -m deepkernels.demo` (which runs it) work when installed
    packages=find_packages(include=["deepkernels", "deepkernels.*", "bench"]),
    # the GEMM tuning table (`python -m bench sweep` writes it; deepkernels.gemm reads it)
    package_data={"deepkernels": ["tuning/*.json"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
