"""The fused CPU kernels of `kernels.cpp`, compiled on first use and cached by torch.

Building needs a C++ compiler and ninja (once per machine and source version, shared by every
checkout of that source; the `.so` lands in torch's extension cache, `TORCH_EXTENSIONS_DIR` or
~/.cache/torch_extensions). Where that fails, `load()` returns None after a one-line warning,
and training runs the plain model on torch's own kernels.
"""

import functools
import hashlib
import logging
import os
import shutil
import sys
import time
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("kernels.cpp")

# Vector instructions by the CPU capability torch itself detected, not -march=native: a cached
# build must not carry instructions that another CPU sharing the cache lacks.
_ISA_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx512dq", "-mavx512bw", "-mavx512vl", "-mavx2", "-mfma"],
    "AVX2": ["-mavx2", "-mfma"],
}


# Where the token MLP's kernel beats its layers run in turn: its register blocks (5 x 4 vectors
# of 16 floats) fit AVX-512's 32 vector registers but spill from AVX2's 16.
TOKEN_KERNEL_ISAS = {"AVX512"}


def token_kernel_is_fast() -> bool:
    return torch.backends.cpu.get_cpu_capability() in TOKEN_KERNEL_ISAS


def shared_source(code: bytes, name: str, default_root: str) -> Path:
    """The source at a path that depends on its content only: the build (ninja) reruns when the
    source's path changes, so every checkout of the same code shares one build this way."""
    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or default_root) / "sources"
    copy = root / f"{name}.cpp"
    if not copy.exists():
        root.mkdir(parents=True, exist_ok=True)
        partial = copy.with_suffix(f".{os.getpid()}.tmp")
        partial.write_bytes(code)
        partial.replace(copy)  # atomic: a concurrent build never reads half a file
    return copy


@functools.cache
def load():
    """The compiled module, or None where it cannot be built here."""
    capability = torch.backends.cpu.get_cpu_capability()
    code = SOURCE.read_bytes()
    name = f"fashion_mixer_kernels_{capability.lower()}_{hashlib.sha256(code).hexdigest()[:12]}"
    if shutil.which("ninja") is None:  # the environment's own ninja, when it is not activated
        os.environ["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]])
    # its import warns that a CPU-only machine has no CUDA runtime, which nothing here needs
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    started = time.perf_counter()
    try:
        from torch.utils import cpp_extension

        module = cpp_extension.load(
            name=name,
            sources=[str(shared_source(code, name, cpp_extension.get_default_build_root()))],
            extra_cflags=["-O3", "-fopenmp", *_ISA_FLAGS.get(capability, [])],
            extra_ldflags=["-fopenmp"],
        )
    except Exception as exc:  # no compiler, no ninja, a failed build: torch's kernels instead
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(
            f"warning: fused CPU kernels unavailable ({reason}); training on torch's kernels",
            file=sys.stderr,
        )
        return None
    seconds = time.perf_counter() - started
    if seconds > 5:  # a build, not a cached load
        print(f"fused CPU kernels built in {seconds:.0f} s (cached for later)", file=sys.stderr)
    return module
