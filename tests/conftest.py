import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))  # appended: a PYTHONPATH stand-in for train_gpt wins during development


def load_data_script(name: str):
    """data/<name>.py as a module, loaded once per test process: a second copy would, e.g., register its own codec
    error handler over the first one's (the CI failure of 2026-12-02)."""
    import importlib.util
    path = (ROOT / "data" / f"{name}.py").resolve()
    mod = sys.modules.get(name)
    if mod is not None and Path(getattr(mod, "__file__", "") or "").resolve() == path:
        return mod
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses look the module up while the class body runs
    spec.loader.exec_module(mod)
    return mod


def graph_counter():
    """(backend, graphs): a torch.compile backend that records every graph dynamo hands it and runs it eagerly, so a
    CPU test can count compiles and recompiles (the same dynamo guards as on the GPU)."""
    graphs = []

    def counting(gm, inputs):
        graphs.append(gm)
        return gm.forward

    return counting, graphs


def interpreted_triton_op(monkeypatch, getter):
    """The real Triton custom op of `getter` (a train_gpt.triton_op_once function), its kernels decorated under
    Triton's CPU interpreter (TRITON_INTERPRET=1; kept for the process: op names are global). Skips when a compiled
    (GPU) build of the op is already loaded in this process."""
    import pytest
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    if getter.cache and getter.cache[0] is not None and not getattr(getter.cache[0], "_interpreted", False):
        pytest.skip(f"a compiled (GPU) {getter.__name__} op is already loaded in this process")
    fn = getter()
    fn._interpreted = True
    return fn


def needs_triton(fn):
    """Skip marker for the tests that run a Triton kernel (in the interpreter on the CPU)."""
    import importlib.util

    import pytest
    return pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                              reason="triton not installed (.ci/run installs it; CUDA builds of torch ship it)")(fn)
