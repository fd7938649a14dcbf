"""No import cycles in the package (module- and function-level imports alike), and the shared types import nothing
of the package."""
import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "dapo_megatron"


def _module(path: Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _graph() -> dict:
    mods = {_module(p): p for p in PKG.rglob("*.py")}
    graph = {}
    for name, path in mods.items():
        base = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                root = ".".join(base[:len(base) - node.level + 1]) if node.level else ""
                mod = ".".join(x for x in (root, node.module or "") if x)
                targets = [mod] + [f"{mod}.{a.name}" for a in node.names]
            for t in targets:
                while t and t not in mods:
                    t = t.rpartition(".")[0]
                if t and t != name and not name.startswith(t + "."):  # a package's own __init__ is not a cycle
                    deps.add(t)
        graph[name] = deps
    return graph


def _cycle(graph: dict):
    state, stack = {}, []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for m in sorted(graph[n]):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state:
                found = visit(m)
                if found:
                    return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state:
            found = visit(n)
            if found:
                return found
    return None


def test_no_import_cycles_in_rollout_reward_and_train():
    graph = _graph()
    sub = {n: {m for m in d if m.startswith(("dapo_megatron.rollout", "dapo_megatron.reward", "dapo_megatron.types",
                                             "dapo_megatron.train"))}
           for n, d in graph.items() if n.startswith(("dapo_megatron.rollout", "dapo_megatron.reward",
                                                        "dapo_megatron.types", "dapo_megatron.train"))}
    assert _cycle(sub) is None, " -> ".join(_cycle(sub))


def test_shared_types_import_nothing_of_the_package():
    assert _graph()["dapo_megatron.types"] == set()
    assert not {m for m in _graph()["dapo_megatron.reward.scorer"] if m.startswith("dapo_megatron.rollout")}


# The package's layers, bottom to top. A module imports only its own layer (no cycles: above) and the layers below
# it, at module or function level alike. The leaves hold no package state; the stage folders build on them; config
# gathers every section's dataclass from the stage folders; the modules that take a whole Config (placement, the
# engine start-up, the step's stages and loop) sit above it, and the command line on top. A module's layer is that of
# its longest listed prefix.
LAYERS = [
    ("types", "errors", "quiet", "train.faults"),  # faults: standard library only, read by the engines and the trainer
    ("algo", "data", "reward", "parallel"),
    ("models",),
    ("rollout",),
    ("train",),
    ("config",),
    ("placement", "memory", "report", "preflight", "rollout.node_engines", "rollout.engine_health", "train.stages", "train.loop"),
    ("cli",),
]


def _layer(module: str) -> int:
    name = module.removeprefix("dapo_megatron").lstrip(".")
    best = None
    for i, names in enumerate(LAYERS):
        for prefix in names:
            if (name == prefix or name.startswith(prefix + ".")) and (best is None or len(prefix) > len(best[1])):
                best = (i, prefix)
    assert best is not None or name == "", f"{module} is in no layer of LAYERS; add it there"
    return best[0] if best else len(LAYERS)


def upward_imports(graph: dict) -> list:
    return sorted(f"{n} (layer {_layer(n)}) imports {m} (layer {_layer(m)})" for n, deps in graph.items()
                  for m in deps if m != "dapo_megatron" and _layer(m) > _layer(n))


def test_no_import_runs_upward_between_layers():
    assert upward_imports(_graph()) == []


def test_the_layer_check_sees_an_upward_import():
    graph = _graph()
    graph["dapo_megatron.models.convert"] = graph["dapo_megatron.models.convert"] | {"dapo_megatron.train.checkpoint"}
    assert upward_imports(graph) == ["dapo_megatron.models.convert (layer 2) imports dapo_megatron.train.checkpoint "
                                     "(layer 4)"]
