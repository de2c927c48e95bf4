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
