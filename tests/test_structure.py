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
