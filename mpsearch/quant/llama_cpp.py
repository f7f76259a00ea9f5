"""llama.cpp as a tool mpsearch builds and runs: ``mpsearch toolchain llama.cpp``.

It is built from the llama.cpp source that the llama-cpp-python sdist vendors, at a pinned
version (:data:`LLAMA_CPP_PYTHON`), into mpsearch's cache
(``$MPSEARCH_TOOLCHAIN_CACHE``, else ``~/.cache/mpsearch/toolchain``), once:

1. ``pip download --no-binary :all: llama-cpp-python==VERSION`` fetches the sdist through the
   package index pip is configured with;
2. its ``vendor/llama.cpp`` tree is unpacked into ``llama.cpp-VERSION/src`` (``convert_hf_to_gguf.py``
   and its ``gguf-py`` come from there too);
3. CMake configures a static release build without OpenSSL, tests or the server, for any
   x86-64 (``GGML_NATIVE=OFF``: the cache may be shared by machines of one kind), and builds
   :data:`TOOLS` with a progress bar (4 minutes on 2 cores here);
4. the tools are copied to ``bin/`` and ``BUILT.json`` is written last, so a build that was
   interrupted is started again, never half-used. A lock file keeps two builds apart. A cache
   built for fewer tools (before ``llama-imatrix`` was one) keeps its configured tree and
   builds only what is missing; if that fails, it starts from scratch.

:func:`tools` returns the built tools, or says how to build them.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from mpsearch.errors import MPSearchError

LLAMA_CPP_PYTHON = "0.3.36"
TOOLS = ("llama-quantize", "llama-embedding", "llama-perplexity", "llama-imatrix")
CACHE_ENV = "MPSEARCH_TOOLCHAIN_CACHE"
CMAKE_FLAGS = (
    "-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=OFF", "-DGGML_NATIVE=OFF",
    "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_SERVER=OFF",
)
_STAMP = "BUILT.json"
EMBED_ATTEMPTS = 5


class ToolchainError(MPSearchError):
    """llama.cpp is not built, or cannot be."""


@dataclass(frozen=True)
class LlamaCpp:
    """A built llama.cpp: its tools and its source tree (for ``convert_hf_to_gguf.py``)."""

    root: Path
    version: str

    @property
    def src(self) -> Path:
        return self.root / "src"

    def tool(self, name: str) -> Path:
        return self.root / "bin" / name

    @property
    def convert_script(self) -> Path:
        return self.src / "convert_hf_to_gguf.py"

    def convert(self, model_dir: Path, out: Path, outtype: str = "f32") -> Path:
        """``convert_hf_to_gguf.py`` of this tree on a Hugging Face folder, with its own gguf-py."""
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(self.src / "gguf-py"), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
        run([sys.executable, str(self.convert_script), str(model_dir), "--outtype", outtype, "--outfile", str(out)], env=env, what="convert_hf_to_gguf.py")
        return out

    def to_json(self) -> dict:
        return {"root": str(self.root), "version": self.version, "tools": {t: str(self.tool(t)) for t in TOOLS}, "convert": str(self.convert_script)}


def cache_root() -> Path:
    value = os.environ.get(CACHE_ENV)
    return Path(value) if value else Path.home() / ".cache" / "mpsearch" / "toolchain"


def _root(version: str) -> Path:
    return cache_root() / f"llama.cpp-{version}"


def built(version: str = LLAMA_CPP_PYTHON) -> LlamaCpp | None:
    """The build in the cache, if it is complete."""
    root = _root(version)
    try:
        stamp = json.loads((root / _STAMP).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    found = LlamaCpp(root, version)
    if stamp.get("version") != version or not all(os.access(found.tool(t), os.X_OK) for t in TOOLS):
        return None
    return found


def tools(version: str = LLAMA_CPP_PYTHON) -> LlamaCpp:
    """The built llama.cpp, or an error that says how to build it."""
    found = built(version)
    if found is None:
        raise ToolchainError(f"llama.cpp {version} is not built in {str(cache_root())!r}; run `mpsearch toolchain llama.cpp` once (a few minutes)")
    return found


def build(version: str = LLAMA_CPP_PYTHON, jobs: int | None = None, progress: bool = True, log=print) -> LlamaCpp:
    """Build llama.cpp into the cache (see the module docstring); a complete build is reused."""
    found = built(version)
    if found is not None:
        return found
    root = _root(version)
    if shutil.which("cmake") is None or (shutil.which("c++") is None and shutil.which("g++") is None):
        raise ToolchainError("building llama.cpp needs cmake and a C++ compiler (g++); install them and run again")
    root.mkdir(parents=True, exist_ok=True)
    with _locked(root / ".lock"):
        found = built(version)  # another process may have finished it while we waited
        if found is not None:
            return found
        jobs = jobs or os.cpu_count() or 2
        if not _add_tools(root, version, jobs, progress, log):
            for stale in ("src", "build", "bin", _STAMP):
                path = root / stale
                shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
            log(f"llama.cpp {version}: fetching the llama-cpp-python sdist")
            _fetch_source(version, root / "src")
            log("llama.cpp: configuring")
            run(["cmake", "-S", str(root / "src"), "-B", str(root / "build"), *CMAKE_FLAGS], what="cmake configure")
            log(f"llama.cpp: building {', '.join(TOOLS)} with {jobs} jobs")
            _build(root / "build", jobs, progress)
        shutil.rmtree(root / "bin", ignore_errors=True)
        (root / "bin").mkdir()
        for tool in TOOLS:
            shutil.copy2(_find_binary(root / "build", tool), root / "bin" / tool)
        (root / _STAMP).write_text(json.dumps({"version": version, "tools": list(TOOLS), "flags": list(CMAKE_FLAGS), "built_at": time.time()}) + "\n", encoding="utf-8")
    return LlamaCpp(root, version)


def _add_tools(root: Path, version: str, jobs: int, progress: bool, log) -> bool:
    """Build the missing tools in a tree an earlier build of this version configured (True), or
    say it cannot (False: no such tree, or its build failed)."""
    try:
        stamp = json.loads((root / _STAMP).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if stamp.get("version") != version or stamp.get("flags") != list(CMAKE_FLAGS) or not (root / "build" / "CMakeCache.txt").is_file():
        return False
    missing = [t for t in TOOLS if t not in stamp.get("tools", [])]
    log(f"llama.cpp {version}: building {', '.join(missing) or 'the tools'} in the tree built before")
    (root / _STAMP).unlink()  # until the tools are all there again
    try:
        _build(root / "build", jobs, progress)
    except ToolchainError as e:
        log(f"llama.cpp: {e}; building from scratch")
        return False
    return True


def _fetch_source(version: str, dest: Path) -> None:
    with tempfile.TemporaryDirectory(prefix="mpsearch-llama-") as tmp:
        run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:", f"llama-cpp-python=={version}", "-d", tmp],
            what=f"pip download llama-cpp-python=={version}")
        sdists = list(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
        if len(sdists) != 1:
            raise ToolchainError(f"pip download gave no llama-cpp-python {version} sdist; check that the package index has it")
        prefix = f"{sdists[0].name.removesuffix('.tar.gz')}/vendor/llama.cpp/"
        with tarfile.open(sdists[0]) as tar:
            members = [m for m in tar.getmembers() if m.name.startswith(prefix)]
            if not members:
                raise ToolchainError(f"the llama-cpp-python {version} sdist vendors no llama.cpp tree")
            for m in members:
                m.name = m.name[len(prefix):]
            tar.extractall(dest, members=[m for m in members if m.name], filter="data")


_PERCENT = re.compile(r"^\[\s*(\d+)%\]")


def _build(build_dir: Path, jobs: int, progress: bool) -> None:
    """``cmake --build`` of :data:`TOOLS`, its ``[ NN%]`` lines as a progress bar; the log's tail on failure."""
    from tqdm import tqdm

    command = ["cmake", "--build", str(build_dir), "-j", str(jobs), "--target", *TOOLS]
    tail: list[str] = []
    with tqdm(total=100, desc="building llama.cpp", unit="%", disable=not progress, file=sys.stderr) as bar:
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        assert proc.stdout is not None
        for line in proc.stdout:
            tail = (tail + [line.rstrip()])[-20:]
            m = _PERCENT.match(line)
            if m:
                bar.update(max(0, int(m.group(1)) - bar.n))
        if proc.wait() != 0:
            raise ToolchainError("building llama.cpp failed; its last lines: " + " | ".join(tail[-5:]))
        bar.update(100 - bar.n)


def _find_binary(build_dir: Path, name: str) -> Path:
    for candidate in (build_dir / "bin" / name, build_dir / name):
        if candidate.is_file():
            return candidate
    raise ToolchainError(f"the llama.cpp build made no {name}; remove {str(build_dir.parent)!r} and build again")


def run(command: list[str], what: str, env: dict | None = None, timeout: float | None = None) -> subprocess.CompletedProcess:
    """Run a tool; a failure is one line naming the tool and the last line it printed."""
    try:
        done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout)
    except FileNotFoundError:
        raise ToolchainError(f"{what}: {command[0]} was not found") from None
    except subprocess.TimeoutExpired:
        raise ToolchainError(f"{what} did not finish in {timeout:g} s") from None
    if done.returncode != 0:
        last = next((line for line in reversed((done.stderr or done.stdout).splitlines()) if line.strip()), "no output")
        raise ToolchainError(f"{what} failed (exit {done.returncode}): {last.strip()}")
    return done


@contextlib.contextmanager
def _locked(path: Path):
    with path.open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def quantize(
    llama: LlamaCpp, src: Path, dst: Path, base_type: str, tensor_type_file: Path | None = None, threads: int = 2, imatrix: Path | None = None, pure: bool = False,
) -> Path:
    """``llama-quantize [--pure] [--imatrix M] [--tensor-type-file F] SRC DST BASE``. With a float
    base type (f32, f16) llama-quantize applies no per-tensor type at all, so give a quantized one
    (q8_0 quantizes only what the file leaves unnamed)."""
    command = [str(llama.tool("llama-quantize"))] + (["--pure"] if pure else [])
    if imatrix is not None:
        command += ["--imatrix", str(imatrix)]
    if tensor_type_file is not None:
        command += ["--tensor-type-file", str(tensor_type_file)]
    run([*command, str(src), str(dst), base_type, str(threads)], what="llama-quantize")
    return dst


def imatrix(llama: LlamaCpp, model: Path, text: str, n_ctx: int, out: Path, threads: int = 2) -> Path:
    """``llama-imatrix``: the importance matrix (per input column, the mean squared activation) of a
    causal LM ``model`` over ``text`` in chunks of ``n_ctx`` tokens, written to ``out`` (GGUF).
    Written beside ``out`` and renamed, so ``out`` is whole or absent."""
    with tempfile.TemporaryDirectory(prefix="mpsearch-imatrix-") as tmp:
        path = Path(tmp) / "calibration.txt"
        path.write_text(text, encoding="utf-8")
        partial = out.with_name(f".{out.name}.{os.getpid()}.partial.gguf")
        command = [str(llama.tool("llama-imatrix")), "-m", str(model), "-f", str(path), "-o", str(partial), "-c", str(n_ctx), "-b", str(n_ctx),
                   "-t", str(threads), "--no-ppl", "--output-frequency", "100000"]
        try:
            done = run(command, what="llama-imatrix")
        except ToolchainError as e:
            if "tokenizes to only" in str(e) or "you need at least" in str(e):
                raise ToolchainError(f"llama-imatrix needs at least {2 * n_ctx} tokens of calibration text; add examples to data.calibration") from None
            raise
        if not partial.is_file():
            raise ToolchainError("llama-imatrix wrote no importance matrix; its log: " + " | ".join(done.stderr.strip().splitlines()[-3:]))
        os.replace(partial, out)
    return out


def tensor_types(path: Path) -> dict[str, str]:
    """Each tensor's ggml type in a GGUF file (``Q4_K``, ``F32``)."""
    from mpsearch.quant.gguf_file import read_gguf

    return {name: t.tensor_type.name for name, t in read_gguf(path).tensors.items()}


def matrix_types(tensors) -> dict[str, str]:
    """The type of each matrix among a GGUF file's ``tensors`` (name → tensor): what
    llama-quantize may change; it leaves vectors (norms, biases) as they are."""
    return {name: t.tensor_type.name for name, t in tensors.items() if len(t.shape) >= 2 and min(t.shape) > 1}


def ggml_name(type_name: str) -> str:
    """ggml's own spelling of a type (``Q4_K`` → ``q4_K``, ``IQ4_NL`` → ``iq4_nl``), which llama-quantize reads."""
    return type_name.lower().replace("_k", "_K")


def write_tensor_types(path: Path, types: dict[str, str]) -> Path:
    """llama-quantize's ``--tensor-type-file``: each named tensor (matched whole) at its type."""
    path.write_text("".join(f"^{re.escape(name)}$={ggml_name(kind)}\n" for name, kind in types.items()), encoding="utf-8")
    return path


def embed(llama: LlamaCpp, model: Path, texts: list[str], pooling: str = "mean", threads: int = 2):
    """``llama-embedding``'s L2-normalised embeddings of ``texts`` (one row each), as a NumPy array.

    Each text is one line of the prompt file; ``--no-escape`` keeps a backslash in a text from
    being read as an escape (without it, texts holding ``\\n`` are split in two).
    """
    import numpy as np

    if any("\n" in t for t in texts):
        raise ValueError("llama-embedding takes one text per line; a text holds a newline")
    with tempfile.TemporaryDirectory(prefix="mpsearch-embed-") as tmp:
        prompts = Path(tmp) / "prompts.txt"
        prompts.write_text("\n".join(texts), encoding="utf-8")
        command = [str(llama.tool("llama-embedding")), "-m", str(model), "-f", str(prompts), "--pooling", pooling, "--embd-normalize", "2",
                   "--no-escape", "--embd-output-format", "array", "-t", str(threads), "-c", "512", "-b", "512", "-ub", "512"]
        # The array goes to stdout through llama.cpp's log thread, which does not always drain it
        # before the process exits (measured: 4 of 20 runs into a pipe ended mid-array, exit 0);
        # a cut-short array is not valid JSON, and the run is repeated.
        for _attempt in range(EMBED_ATTEMPTS):
            done = run(command, what="llama-embedding")
            try:
                rows = json.loads(done.stdout.strip())
                break
            except json.JSONDecodeError:
                continue
        else:
            raise ToolchainError(f"llama-embedding's output was cut short in {EMBED_ATTEMPTS} runs out of {EMBED_ATTEMPTS}; run it again")
    if len(rows) != len(texts):
        raise ToolchainError(f"llama-embedding gave {len(rows)} embeddings for {len(texts)} texts")
    return np.asarray(rows, dtype=np.float64)


def perplexity(llama: LlamaCpp, model: Path, text: str, n_ctx: int, threads: int = 2) -> float:
    """``llama-perplexity``'s final estimate on ``text``, in chunks of ``n_ctx`` tokens (the second
    half of each chunk scored, its first token the BOS where the vocabulary adds one)."""
    with tempfile.TemporaryDirectory(prefix="mpsearch-ppl-") as tmp:
        path = Path(tmp) / "text.txt"
        path.write_text(text, encoding="utf-8")
        command = [str(llama.tool("llama-perplexity")), "-m", str(model), "-f", str(path), "-c", str(n_ctx), "-b", str(n_ctx), "-t", str(threads)]
        for _attempt in range(EMBED_ATTEMPTS):  # its log thread may not drain before exit (see embed)
            done = run(command, what="llama-perplexity")
            found = re.search(r"Final estimate: PPL = ([0-9.]+)", done.stdout + done.stderr)
            if found:
                return float(found.group(1))
            if "you need at least" in done.stderr:
                raise ToolchainError(f"llama-perplexity needs at least {2 * n_ctx} tokens of text; give it more")
    raise ToolchainError(f"llama-perplexity printed no final estimate in {EMBED_ATTEMPTS} runs; run it again")

