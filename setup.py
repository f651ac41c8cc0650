"""Build the compiled extension ``skipfast._C`` against the torch that is installed.

C++ CPU kernels are always built. CUDA kernels (csrc/cuda/*.cu) are built when the
installed torch is a CUDA build and a CUDA toolkit is found; SKIPFAST_BUILD_CUDA=0|1
overrides the detection. The default architecture list is 8.0;9.0, overridable with
TORCH_CUDA_ARCH_LIST.
"""
import glob
import os
import re
import shutil
import subprocess
import sys

from setuptools import setup

try:
    import torch
except ImportError:  # pragma: no cover - the message is the point
    sys.exit(
        "skipfast builds against the torch you run: install torch first, then "
        "`pip install -e . --no-build-isolation` (see README.md)."
    )

ROOT = os.path.dirname(os.path.abspath(__file__))


def _is_toolkit_root(path):
    return bool(path) and os.path.isfile(os.path.join(path, "include", "cuda_runtime.h"))


def find_cuda_home():
    """CUDA_HOME, else the toolkit that `nvcc` on PATH belongs to (symlinks and
    wrapper scripts resolved), else /usr/local/cuda. Returns (path or None, how)."""
    env = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if env:
        return (env, "CUDA_HOME") if _is_toolkit_root(env) else (None, f"CUDA_HOME={env} has no include/cuda_runtime.h")
    nvcc = shutil.which("nvcc")
    if nvcc:
        root = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
        if _is_toolkit_root(root):
            return root, f"nvcc at {nvcc}"
        # A wrapper script: nvcc itself knows where it lives.
        try:
            out = subprocess.run([nvcc, "--dryrun", "-E", "-x", "cu", os.devnull], capture_output=True, text=True, timeout=30)
            m = re.search(r"_HERE_=(\S+)", out.stdout + out.stderr)
        except (OSError, subprocess.SubprocessError):
            m = None
        if m:
            root = os.path.dirname(os.path.realpath(m.group(1)))
            if _is_toolkit_root(root):
                return root, f"nvcc at {nvcc} (runs {m.group(1)}/nvcc)"
    if _is_toolkit_root("/usr/local/cuda"):
        return "/usr/local/cuda", "/usr/local/cuda"
    return None, "no nvcc on PATH and no CUDA_HOME"


def cpu_vector_flags():
    """at::vec picks its 256-bit kernels from CPU_CAPABILITY_AVX2. The extension is
    always built on the machine that runs it, so use AVX2 when this CPU has it
    (SKIPFAST_NO_AVX2=1 builds the portable scalar fallback)."""
    if os.environ.get("SKIPFAST_NO_AVX2") == "1":
        return []
    try:
        with open("/proc/cpuinfo") as f:
            flags = set(f.read().split())
    except OSError:
        return []
    if {"avx2", "fma", "f16c"} <= flags:
        return ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY_AVX2", "-DCPU_CAPABILITY=AVX2"]
    return []


def want_cuda():
    forced = os.environ.get("SKIPFAST_BUILD_CUDA")
    home, how = find_cuda_home()
    if forced is not None and forced not in ("0", "1"):
        sys.exit(f"SKIPFAST_BUILD_CUDA must be 0 or 1, got {forced!r}")
    if forced == "0":
        return None, "SKIPFAST_BUILD_CUDA=0"
    if torch.version.cuda is None:
        if forced == "1":
            sys.exit("SKIPFAST_BUILD_CUDA=1 but the installed torch is not a CUDA build")
        return None, f"torch {torch.__version__} is not a CUDA build"
    if home is None:
        if forced == "1":
            sys.exit(f"SKIPFAST_BUILD_CUDA=1 but no CUDA toolkit was found ({how})")
        return None, f"no CUDA toolkit found ({how})"
    return home, f"toolkit {home} from {how}, torch CUDA {torch.version.cuda}"


def extensions():
    cuda_home, why = want_cuda()
    if cuda_home is not None:
        # cpp_extension reads CUDA_HOME at import time.
        os.environ["CUDA_HOME"] = cuda_home
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    sources = sorted(glob.glob("csrc/*.cpp")) + sorted(glob.glob("csrc/cpu/*.cpp"))
    cxx = ["-O3", "-std=c++20", "-fopenmp"] + cpu_vector_flags()
    if cuda_home is not None:
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        nvcc = ["-O3", "-std=c++20", "--expt-relaxed-constexpr", "-lineinfo"]
        ext = CUDAExtension("skipfast._C", sources, include_dirs=[os.path.join(ROOT, "csrc")],
                            extra_compile_args={"cxx": cxx + ["-DSKIPFAST_WITH_CUDA"], "nvcc": nvcc + ["-DSKIPFAST_WITH_CUDA"]},
                            extra_link_args=["-fopenmp"])
        print(f"skipfast: building C++ CPU kernels and CUDA kernels for "
              f"TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']} ({why})")
    else:
        ext = CppExtension("skipfast._C", sources, include_dirs=[os.path.join(ROOT, "csrc")],
                           extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"])
        print(f"skipfast: building C++ CPU kernels only ({why})")
    return [ext]


if __name__ == "__main__":
    ext_modules = extensions()  # sets CUDA_HOME before cpp_extension is imported
    from torch.utils.cpp_extension import BuildExtension

    setup(ext_modules=ext_modules,
          cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)})
