"""Just-in-time builds of the compiled multi-scale deformable attention kernels.

The C++ and CUDA sources live in the repository's top-level `ops/csrc/` folder (the package is
installed editable, so they sit two directories above this file). They are compiled on first use with
`torch.utils.cpp_extension.load` and cached on disk, keyed by Python and PyTorch version (and, for
the CPU kernels tuned with -march=native, by CPU model):

    $TORCH_EXTENSIONS_DIR/uniperceiver_v2/py<XY>-torch<version>/<extension>[-<cpu tag>]/   if set,
    ~/.cache/uniperceiver_v2/ops/py<XY>-torch<version>/<extension>[-<cpu tag>]/             otherwise.

Later processes only recompile when a source file changed (ninja decides), so the build (up to a minute)
happens once per machine and PyTorch version.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import subprocess
import sys
import threading
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType

import torch

logger = logging.getLogger(__name__)

SOURCE_DIR = Path(__file__).resolve().parents[2] / "ops" / "csrc"

# Optimisation flags only: torch adds the include paths, the C++ standard and the ABI flags itself.
# -fopenmp is required because at::parallel_for is implemented inline on top of OpenMP pragmas;
# the resulting libgomp dependency resolves to the runtime PyTorch has already loaded.
CPU_CFLAGS = ["-O3", "-fopenmp"]
CPU_LDFLAGS = ["-fopenmp"]
CUDA_CFLAGS = ["-O3"]


def host_cpu_tuning() -> tuple[list[str], str]:
    """Compiler flags tuning the CPU kernels for this machine, and a cache tag naming the CPU.

    On x86-64 Linux: -march=native (its wider vector units make the kernels about 1.4x faster) and a
    fingerprint of the CPU model and feature flags, so that machines sharing a home directory but
    not a CPU model each get their own build instead of one that dies with an illegal instruction.
    Elsewhere: no tuning flags and the tag "generic".
    """
    cpuinfo = Path("/proc/cpuinfo")
    if platform.machine() not in ("x86_64", "AMD64") or not cpuinfo.is_file():
        return [], "generic"
    lines = {line for line in cpuinfo.read_text().splitlines() if line.startswith(("model name", "flags"))}
    fingerprint = hashlib.sha1("\n".join(sorted(lines)).encode()).hexdigest()[:10]
    return ["-march=native"], f"native-{fingerprint}"


class ExtensionUnavailable(RuntimeError):
    """A compiled implementation cannot be used here; the message says why."""


def build_root() -> Path:
    """Folder holding the cached builds for this Python and PyTorch version."""
    override = os.environ.get("TORCH_EXTENSIONS_DIR")
    base = Path(override) / "uniperceiver_v2" if override else Path.home() / ".cache" / "uniperceiver_v2" / "ops"
    return base / f"py{sys.version_info.major}{sys.version_info.minor}-torch{torch.__version__}"


@contextmanager
def _quiet_cpp_extension_import():
    """Silence torch.utils.cpp_extension's import-time warning about a missing CUDA runtime.

    Importing the module on a machine with nvcc but no GPU logs "No CUDA runtime is found", which is
    irrelevant (and alarming) when only the CPU kernels are being built.
    """
    cpp_extension_logger = logging.getLogger("torch.utils.cpp_extension")
    previous_level = cpp_extension_logger.level
    cpp_extension_logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        cpp_extension_logger.setLevel(previous_level)


def _summarise_build_error(error: BaseException) -> str:
    """The compiler's error lines (at most five), or the message's last lines if none is marked."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    error_lines = [line for line in lines if "error" in line.lower() and not line.startswith("Error building")]
    return " | ".join((error_lines or lines[-5:])[:5])


class CompiledExtension:
    """One JIT-built extension module, built at most once per process and cached on disk.

    Args:
        name: extension (and cache folder) name.
        sources: file names inside `source_dir`.
        source_dir: folder holding the sources (the repository's `ops/csrc`).
        extra_cflags, extra_cuda_cflags, extra_ldflags: passed to `torch.utils.cpp_extension.load`.
        precondition: returns why the extension cannot run on this machine (e.g. no GPU), or None;
            checked before any compilation is attempted.
        cache_tag: appended to the cache folder name, to keep builds with different
            machine-specific flags apart.
    """

    def __init__(
        self,
        name: str,
        sources: list[str],
        source_dir: Path = SOURCE_DIR,
        extra_cflags: list[str] | None = None,
        extra_cuda_cflags: list[str] | None = None,
        extra_ldflags: list[str] | None = None,
        precondition: Callable[[], str | None] | None = None,
        cache_tag: str = "",
    ) -> None:
        self.name = name
        self.sources = sources
        self.source_dir = Path(source_dir)
        self.extra_cflags = extra_cflags or []
        self.extra_cuda_cflags = extra_cuda_cflags or []
        self.extra_ldflags = extra_ldflags or []
        self.precondition = precondition
        self.cache_tag = cache_tag
        self._module: ModuleType | None = None
        self._failure: str | None = None
        self._lock = threading.Lock()

    @property
    def build_directory(self) -> Path:
        return build_root() / (f"{self.name}-{self.cache_tag}" if self.cache_tag else self.name)

    def load(self) -> ModuleType:
        """Return the compiled module, building it on first use.

        Raises:
            ExtensionUnavailable: the precondition fails, a source file is missing or the build
                fails. The outcome is remembered, so a failed build is not retried in this process.
        """
        with self._lock:
            if self._module is None and self._failure is None:
                try:
                    self._module = self._build()
                except ExtensionUnavailable as error:
                    self._failure = str(error)
            if self._failure is not None:
                raise ExtensionUnavailable(self._failure)
            return self._module

    def unavailable_reason(self) -> str | None:
        """Why the extension cannot be used (building it if needed), or None if it can."""
        try:
            self.load()
        except ExtensionUnavailable as error:
            return str(error)
        return None

    def _build(self) -> ModuleType:
        if self.precondition is not None:
            reason = self.precondition()
            if reason is not None:
                raise ExtensionUnavailable(reason)
        paths = [self.source_dir / source for source in self.sources]
        missing = [str(path) for path in paths if not path.is_file()]
        if missing:
            raise ExtensionUnavailable(
                f"kernel sources not found: {', '.join(missing)}. They ship in the repository's "
                "ops/csrc folder next to the uniperceiver_v2 package, so install the package from a "
                "checkout in editable mode (pip install -e .)."
            )
        self.build_directory.mkdir(parents=True, exist_ok=True)
        logger.info(
            "loading the %s extension from %s (compiled on first use, up to a minute)",
            self.name,
            self.build_directory,
        )
        with _quiet_cpp_extension_import():
            from torch.utils.cpp_extension import load
        try:
            return load(
                name=self.name,
                sources=[str(path) for path in paths],
                extra_cflags=self.extra_cflags,
                extra_cuda_cflags=self.extra_cuda_cflags,
                extra_ldflags=self.extra_ldflags,
                build_directory=str(self.build_directory),
                verbose=False,
            )
        # load() reports compiler errors as RuntimeError, a missing compiler or ninja as
        # RuntimeError / OSError / CalledProcessError, and an unloadable library as ImportError.
        except (RuntimeError, OSError, ImportError, subprocess.CalledProcessError) as error:
            raise ExtensionUnavailable(
                f"building the {self.name} extension from {self.source_dir} failed: "
                f"{_summarise_build_error(error)}"
            ) from error


def _cuda_precondition() -> str | None:
    if torch.version.cuda is None:
        return f"this PyTorch build ({torch.__version__}) has no CUDA support"
    if not torch.cuda.is_available():
        return "no CUDA GPU is visible to PyTorch (torch.cuda.is_available() is False)"
    with _quiet_cpp_extension_import():
        from torch.utils.cpp_extension import CUDA_HOME
    if CUDA_HOME is None:
        return "no CUDA toolkit (nvcc) was found; set CUDA_HOME to its install folder"
    return None


_CPU_TUNING_FLAGS, _CPU_TAG = host_cpu_tuning()

CPU_EXTENSION = CompiledExtension(
    name="uniperceiver_v2_msda_cpu",
    sources=["ms_deform_attn_cpu.cpp"],
    extra_cflags=CPU_CFLAGS + _CPU_TUNING_FLAGS,
    extra_ldflags=CPU_LDFLAGS,
    cache_tag=_CPU_TAG,
)

CUDA_EXTENSION = CompiledExtension(
    name="uniperceiver_v2_msda_cuda",
    sources=["ms_deform_attn_cuda_bindings.cpp", "ms_deform_attn_cuda.cu"],
    extra_cflags=["-O3"],
    extra_cuda_cflags=CUDA_CFLAGS,
    precondition=_cuda_precondition,
)
