"""A plain ``pip install`` gets the cpu backend's kernels and the step cache's native check: built on first use
(largedet_kernels/_extensions.py) against the torch running, into a cache keyed by what their ABI depends on;
ranks that start together build once; the JIT can be switched off, says why when it cannot build, and leaves the
CUDA build to machines with a GPU. The acceptance test installs a copy of the checkout into a fresh venv, with no
flags, where two ranks starting together take the first step (one build for the tests that read it), and step to
the bits of the kernels built ahead of time."""

import json
import os
import random
import shutil
import subprocess
import sys
import textwrap
import time
import types
from importlib import metadata
from pathlib import Path

import pytest
import torch
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from largedet_kernels import _extensions
from largedet_kernels.backends import cpu, cuda

ROOT = Path(__file__).resolve().parent.parent
# Left out of the copies of the checkout: what a build or a test run leaves there.
_NOT_SOURCES = shutil.ignore_patterns(".git", ".venv", "build", "*.so", "*.egg-info", "__pycache__", ".pytest_cache",
                                      ".benchmarks")  # fmt: skip

# One step of a small model on the cpu backend and on the torch backend, from the same values: the
# cpu step must come from the kernels built on first use and agree with the torch one within float32
# rounding (FP32_MATH_RTOL of tests/harness.py of the update, and one ulp of x). Then "bits": a digest of
# what a few steps of both optimizers, fp32 and bf16, odd sizes, leave in the parameters on the cpu backend,
# for the comparison with the kernels built ahead of time.
_FIRST_STEP = r"""
import copy, hashlib, json, sys
import torch
import largedet_kernels
from largedet_kernels import LAMB, PMDLAMB, _extensions, step_cache

torch.manual_seed(int(sys.argv[1]))
model = torch.nn.Sequential(torch.nn.Linear(37, 19), torch.nn.ReLU(), torch.nn.Linear(19, 5))
twin = copy.deepcopy(model)
before = [p.detach().clone() for p in model.parameters()]
x = torch.randn(11, 37)
for m, backend in ((model, "cpu"), (twin, "torch")):
    m(x).square().sum().backward()
    PMDLAMB(m.parameters(), lr=0.1, backend=backend).step()
worst = 0.0
for a, b, x0 in zip(model.parameters(), twin.parameters(), before):
    bound = 1e-6 * (b - x0).abs().max() + torch.finfo(torch.float32).eps * x0.abs().max()
    worst = max(worst, float((a - b).abs().max() / bound))
bits = hashlib.sha256()
for cls, options in ((PMDLAMB, dict(lr=0.05, weight_decay=0.01, alpha=0.3, cycle_length=3, max_grad_norm=1.0)),
                     (LAMB, dict(lr=0.01, weight_decay=0.01, max_grad_norm=1.0))):
    for dtype in (torch.float32, torch.bfloat16):
        params = [torch.nn.Parameter(torch.randn(s, dtype=dtype)) for s in ((70001,), (3, 3, 17, 19), (31,), (5,))]
        opt = cls(params, backend="cpu", **options)
        for _ in range(4):
            for p in params:
                p.grad = torch.randn_like(p)
            opt.step()
        for p in params:
            bits.update(str(p.detach().view(torch.int16 if dtype == torch.bfloat16 else torch.int32).flatten().tolist())
                        .encode())  # fmt: skip
print(json.dumps(dict(package=largedet_kernels.__file__, kernels=_extensions.CPU.module().__file__,
                      step_cache=step_cache._native(build=False).__file__, worst=worst,
                      changed=float(max((b - x0).abs().max() for b, x0 in zip(twin.parameters(), before))),
                      bits=bits.hexdigest())))
"""


def _clean_env(**extra) -> dict:
    """This environment less what points the child at the checkout or steers the loader."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LARGEDET_") and k not in ("PYTHONPATH",
                                                                                                 "TRITON_INTERPRET")}
    env.update(extra)
    return env


def _first_steps(python, cwd: Path, env: dict, seed: int, ranks: int = 1) -> list:
    """What each of ``ranks`` processes started together prints of its first step, and its stderr."""
    procs = [subprocess.Popen([str(python), "-c", _FIRST_STEP, str(seed)], cwd=cwd, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(ranks)]  # fmt: skip
    outputs = [proc.communicate(timeout=900) for proc in procs]
    for proc, (_, err) in zip(procs, outputs):
        assert proc.returncode == 0, err[-4000:]
    return [(json.loads(out.strip().splitlines()[-1]), err) for out, err in outputs]


def _build_lines(stderr: str) -> list:
    return [line for line in stderr.splitlines() if line.startswith("largedet-kernels: building")]


def _link_distributions(requirements, site: Path) -> None:
    """The distributions of ``requirements`` and all they require, as this environment has them, linked into ``site``:
    what ``pip install`` would lay there, without copying torch's 5.5 GB (more disk than a CI machine may spare).
    Each is linked at the shallowest folder no other distribution has files in (nvidia/cublas/, not nvidia/)."""
    closure, wanted = {}, [Requirement(r) for r in requirements]
    while wanted:
        req = wanted.pop()
        name = canonicalize_name(req.name)
        if name in closure and req.extras <= closure[name][1]:
            continue
        dist = metadata.distribution(name)
        extras = closure.get(name, (dist, set()))[1] | req.extras
        closure[name] = dist, extras
        wanted += [r for r in map(Requirement, dist.requires or [])
                   if not r.marker or any(r.marker.evaluate({"extra": e}) for e in extras | {""})]  # fmt: skip
    shared = {path.parts[:i] for dist in metadata.distributions()
              if canonicalize_name(dist.metadata["Name"]) not in closure
              for path in dist.files or [] for i in range(1, len(path.parts))}  # fmt: skip
    linked = set()
    for dist, _ in closure.values():
        for path in dist.files or []:
            if path.parts[0] == "..":  # a script in bin/: the test runs none
                continue
            top = next(path.parts[:i] for i in range(1, len(path.parts) + 1) if path.parts[:i] not in shared)
            if top not in linked:
                linked.add(top)
                (site / Path(*top)).parent.mkdir(parents=True, exist_ok=True)
                (site / Path(*top)).symlink_to(dist.locate_file(Path(*top)))


@pytest.fixture(scope="module")
def fresh_install(tmp_path_factory):
    """A copy of the checkout pip-installed with no build flags into a fresh venv that has its requirements, and its
    first step run by two ranks starting together on an empty cache: the install test and the ranks test read one
    build."""
    started = time.monotonic()
    tmp = tmp_path_factory.mktemp("fresh")
    src, venv, work, cache = (tmp / d for d in ("src", "venv", "work", "cache"))
    shutil.copytree(ROOT, src, ignore=_NOT_SOURCES)
    work.mkdir()
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], check=True,
                          capture_output=True, text=True).stdout.strip()  # fmt: skip
    # What the checkout requires (as this environment's install of it recorded), and pip.
    _link_distributions([*metadata.requires("largedet-kernels"), "pip"], Path(site))
    env = _clean_env(LARGEDET_KERNELS_CACHE=str(cache))
    # The checkout with no build flags. --no-deps: pip writes no linked distribution again (through the links, into
    # this environment); pip check then holds the requirements the copy declares to those there.
    for args in (["install", "-q", "--no-deps", str(src)], ["check"]):
        proc = subprocess.run([str(python), "-m", "pip", *args], env=env, capture_output=True, text=True,
                              timeout=1200)  # fmt: skip
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    installed = time.monotonic()
    seed = random.SystemRandom().randrange(2**31)
    ranks = _first_steps(python, work, env, seed, ranks=2)
    built = time.monotonic()
    print(f"\nfresh venv: install {installed - started:.0f} s, first step of 2 ranks with the build "
          f"{built - installed:.0f} s")  # fmt: skip
    return types.SimpleNamespace(src=src, venv=venv, work=work, cache=cache, python=python, env=env, seed=seed,
                                 ranks=ranks)  # fmt: skip


def test_a_plain_pip_install_builds_the_cpu_kernels_on_first_use(fresh_install):
    f = fresh_install
    (first, _), _ = f.ranks
    assert str(f.venv) in first["package"] and str(f.src) not in first["package"], first
    # From the builds on first use, into the cache: the kernels', then the check's on the cpu step.
    assert first["kernels"].startswith(str(f.cache)) and first["step_cache"].startswith(str(f.cache)), first
    assert first["changed"] > 0 and first["worst"] <= 1.0, (f.seed, first)
    # A rank that built says so, the kernels' build and then the check's (one that waited on it may say it too).
    said = [[line.split(",")[0] for line in _build_lines(err)] for _, err in f.ranks]
    builds = [f"largedet-kernels: building {e.label()} once" for e in (_extensions.CPU, _extensions.STEP_CACHE)]
    assert builds in said, said
    assert list(f.cache.glob(f"*/cpu-{_extensions.cpu_isa()}-*/built")), sorted(f.cache.rglob("*"))
    assert list(f.cache.glob("*/step-cache-*/built")), sorted(f.cache.rglob("*"))
    ((again, stderr),) = _first_steps(f.python, f.work, f.env, f.seed)  # the next process takes the cache, quietly
    assert again == first and _build_lines(stderr) == [], stderr


def test_ranks_starting_together_build_once(fresh_install):
    f = fresh_install
    for result, err in f.ranks:
        assert result["kernels"].startswith(str(f.cache)) and result["worst"] <= 1.0, (f.seed, result)
        assert result["step_cache"].startswith(str(f.cache)), result
        assert len(_build_lines(err)) <= 2, err
    # One compile of each object and one link: the rank that waited on the lock found them built.
    for pattern, objects in (("*/cpu-*", ["largedet_kernels_cpu_" + cpu.ISA + ".so", "module.o", "pmd_lamb_cpu.o"]),
                             ("*/step-cache-*", ["largedet_kernels_step_cache.so", "step_cache.o"])):
        (directory,) = f.cache.glob(pattern)
        compiled = [line.split("\t")[3] for line in (directory / ".ninja_log").read_text().splitlines()[1:]]
        assert sorted(compiled) == objects, compiled


def test_the_build_on_first_use_steps_to_the_bits_of_the_one_ahead_of_time(fresh_install):
    if _extensions.CPU._ahead_of_time() is None or _extensions.STEP_CACHE._ahead_of_time() is None:
        pytest.skip("needs the CPU extensions built ahead of time (pip install --no-build-isolation -e .)")
    f = fresh_install
    (first, _), _ = f.ranks
    # This checkout's installation, which builds nothing: its kernels are those built ahead of time.
    ((here, _),) = _first_steps(sys.executable, f.work, _clean_env(LARGEDET_JIT="0"), f.seed)
    assert here["kernels"] == _extensions.CPU.module().__file__, here
    assert here["bits"] == first["bits"], (f.seed, here["kernels"], first["kernels"])


def _package_copy(tmp_path: Path) -> Path:
    """The package as a plain install lays it out, without compiled extensions: csrc/ inside it."""
    site = tmp_path / "site"
    shutil.copytree(ROOT / "largedet_kernels", site / "largedet_kernels", ignore=_NOT_SOURCES)
    shutil.copytree(ROOT / "csrc", site / "largedet_kernels" / "csrc", ignore=_NOT_SOURCES)
    return site


def test_the_cache_key(monkeypatch, tmp_path):
    # Each of torch's version, its C++ ABI, the ISA and a byte of the sources has a directory of its own; a
    # byte of one extension's sources moves that extension's alone.
    sources = tmp_path / "csrc"
    shutil.copytree(_extensions.csrc(), sources)
    monkeypatch.setattr(_extensions, "csrc", lambda: sources)
    monkeypatch.setenv("LARGEDET_KERNELS_CACHE", str(tmp_path / "cache"))

    def key(target, name, value):
        was = getattr(target, name)
        monkeypatch.setattr(target, name, value)
        directory = _extensions.CPU.directory()
        monkeypatch.setattr(target, name, was)
        return directory

    base = _extensions.CPU.directory()
    assert base.parent.parent == tmp_path / "cache" and base.name.startswith(f"cpu-{cpu.ISA}-"), base
    keys = {key(_extensions, "_ISA", isa) for isa in _extensions.CPU_ISAS}
    keys.add(key(torch._C, "_GLIBCXX_USE_CXX11_ABI", not torch._C._GLIBCXX_USE_CXX11_ABI))
    keys.add(key(torch, "__version__", torch.__version__ + ".post1"))
    assert _extensions.CPU.directory() == base  # nothing else moves it
    check = _extensions.STEP_CACHE.directory()
    assert check.parent == base.parent and check.name.startswith("step-cache-"), check
    for edited in (sources / "rounding.h", sources / "step_cache" / "step_cache.cpp"):
        edited.write_text(edited.read_text() + "\n")
        keys.add(_extensions.CPU.directory())
        assert (_extensions.STEP_CACHE.directory() == check) == (edited.parent == sources), edited
    assert base in keys and len(keys) == len(_extensions.CPU_ISAS) + 3, keys


@pytest.fixture
def unbuilt(monkeypatch, tmp_path):
    """The CPU extension as if neither built ahead of time nor in the cache; the real one comes back after."""
    monkeypatch.setattr(_extensions.CPU, "_found", None)
    monkeypatch.setattr(_extensions.CPU, "_missed", False)
    monkeypatch.setattr(_extensions.CPU, "aot_name", lambda: "largedet_kernels._not_built")
    monkeypatch.setenv("LARGEDET_KERNELS_CACHE", str(tmp_path / "cache"))
    return monkeypatch


def _no_build(*args, **kwargs):
    raise AssertionError("torch.utils.cpp_extension.load was called")


@pytest.mark.parametrize("name", ["CPU", "STEP_CACHE"])
def test_an_extension_found_outside_the_package_is_not_taken(monkeypatch, name):
    # An import hook of another installation (an editable install's finder) may find a module of that name
    # built from other sources; only one beside the package's own files is taken.
    import importlib.machinery

    extension = getattr(_extensions, name)
    real = extension._ahead_of_time()
    if real is None:
        pytest.skip(f"the {name} extension is not built ahead of time")
    assert Path(real.__file__).resolve().parent == Path(_extensions.__file__).resolve().parent
    elsewhere = importlib.machinery.ModuleSpec(extension.aot_name(), None, origin="/elsewhere/x.so")
    monkeypatch.setattr(_extensions.importlib.util, "find_spec", lambda name: elsewhere)
    assert extension._ahead_of_time() is None


def test_the_step_cache_check_built_ahead_of_time_is_taken():
    # setup.py builds it beside the package whenever it builds anything there, LARGEDET_CPU_BUILD=0 or not.
    from largedet_kernels import step_cache

    package = Path(_extensions.__file__).resolve().parent
    if not list(package.glob("_C*.so")):
        pytest.skip("nothing is built ahead of time (not installed with --no-build-isolation)")
    (built,) = package.glob("_C_step_cache.*so")
    module = _extensions.STEP_CACHE.module(build=False)
    assert module.__name__ == "largedet_kernels._C_step_cache" and Path(module.__file__).resolve() == built
    assert step_cache._native(build=False) is module


def test_a_broken_file_in_the_cache_is_built_again(unbuilt):
    # A partial or foreign library behind the stamp (a node of another kind on a shared cache, a full
    # disk) is no module: the cache lookup says so, and the build that follows writes over it.
    directory = _extensions.CPU.directory()
    directory.mkdir(parents=True)
    (directory / "broken.so").write_bytes(b"not a shared object")
    (directory / "built").write_text(f"{directory / 'broken.so'}\n")
    assert _extensions.CPU._cached() is None


def test_the_jit_can_be_switched_off(unbuilt):
    import torch.utils.cpp_extension

    unbuilt.setattr(torch.utils.cpp_extension, "load", _no_build)
    unbuilt.setenv("LARGEDET_JIT", "0")
    reason = cpu.unavailable_reason(torch.device("cpu"))
    assert reason is not None and "LARGEDET_JIT=0" in reason and "--no-build-isolation" in reason, reason
    assert _extensions.CPU.module(build=False) is None


def test_a_failed_build_says_why(unbuilt, tmp_path, capsys):
    compiler = tmp_path / "c++"
    # It says its version (torch asks), then fails to compile.
    compiler.write_text("#!/bin/sh\ncase \"$1\" in -dump*|--version) echo 12.2.0; exit 0;; esac\n"
                        "echo 'fatal error: the compiler of this test refuses' >&2\nexit 1\n")
    compiler.chmod(0o755)
    unbuilt.setenv("CXX", str(compiler))
    with pytest.raises(_extensions.ExtensionUnavailable, match=r"building it on first use failed \(.*refuses\)"):
        _extensions.CPU.module()
    (log,) = (tmp_path / "cache").glob("*/cpu-*/build.log")
    assert "refuses" in log.read_text()
    assert _build_lines(capsys.readouterr().err) == [f"largedet-kernels: building the CPU kernels ({cpu.ISA}) once, "
                                                     f"~40 s, into {log.parent}"]  # fmt: skip
    with pytest.raises(_extensions.ExtensionUnavailable, match="refuses"):  # once per process
        _extensions.CPU.module()
    assert capsys.readouterr().err == ""


@pytest.fixture
def cuda_unbuilt(monkeypatch, tmp_path):
    import torch.utils.cpp_extension

    monkeypatch.setattr(_extensions.CUDA, "_found", None)

    monkeypatch.setattr(_extensions.CUDA, "_missed", False)
    monkeypatch.setattr(_extensions.CUDA, "aot_name", lambda: "largedet_kernels._not_built")
    monkeypatch.setenv("LARGEDET_KERNELS_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    nvcc = tmp_path / "cuda" / "bin" / "nvcc"
    nvcc.parent.mkdir(parents=True)
    nvcc.write_text("")
    monkeypatch.setattr(torch.utils.cpp_extension, "CUDA_HOME", str(tmp_path / "cuda"))
    return monkeypatch


def test_the_cuda_jit_is_not_attempted_without_a_gpu(cuda_unbuilt):
    import torch.utils.cpp_extension

    cuda_unbuilt.setattr(torch.utils.cpp_extension, "load", _no_build)
    cuda_unbuilt.setattr(torch.cuda, "is_available", lambda: False)
    reason = cuda.unavailable_reason(torch.device("cuda"))
    assert reason is not None and "no CUDA GPU is visible" in reason, reason


def test_the_cuda_jit_builds_for_the_visible_gpus(cuda_unbuilt, tmp_path, capsys):
    import torch.utils.cpp_extension

    calls = []

    def load(**kwargs):
        calls.append(kwargs)
        module = types.ModuleType(kwargs["name"])
        module.__file__ = str(tmp_path / "built.so")
        return module

    cuda_unbuilt.setattr(torch.utils.cpp_extension, "load", load)
    cuda_unbuilt.setattr(torch.cuda, "is_available", lambda: True)
    cuda_unbuilt.setattr(torch.cuda, "device_count", lambda: 2)
    cuda_unbuilt.setattr(torch.cuda, "get_device_capability", lambda i: [(9, 0), (8, 0)][i])
    module = _extensions.CUDA.module()
    (call,) = calls
    assert module.__name__ == call["name"] == "largedet_kernels_cuda"
    assert {Path(s).name for s in call["sources"]} == {"binding.cpp", "pmd_lamb_launch.cu"}
    directory = Path(call["build_directory"])
    assert directory.parent.parent == tmp_path / "cache" and directory.name.startswith("cuda-80_90-"), directory
    assert _build_lines(capsys.readouterr().err) == [f"largedet-kernels: building the CUDA kernels (archs 8.0;9.0) "
                                                     f"once, a few minutes, into {directory}"]  # fmt: skip


def test_import_builds_nothing(tmp_path):
    # A bare import on a machine without the extensions neither builds nor loads them.
    site = _package_copy(tmp_path)
    code = textwrap.dedent("""
        import sys, largedet_kernels
        from largedet_kernels import step_cache
        assert step_cache._NATIVE is step_cache._UNRESOLVED
        assert not [m for m in sys.modules if m.startswith(("largedet_kernels_", "largedet_kernels._C"))], sys.modules
    """)
    env = _clean_env(PYTHONPATH=str(site), LARGEDET_KERNELS_CACHE=str(tmp_path / "cache"))
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    assert not (tmp_path / "cache").exists()
