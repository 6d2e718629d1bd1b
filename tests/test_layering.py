"""The package's shape: stages import downward only, per-layer arithmetic lives in the layer registry, and every
registry entry names something real."""

import ast
import importlib
import inspect
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from prunetool import layers, ops
from prunetool.cut import cut
from prunetool.trace import trace
from prunetool.verify import check_removal

PACKAGE = Path(__file__).resolve().parent.parent / "prunetool"
REGISTRY = {"layers", "ops"}  # where layer types and call kinds may be named
LAYOUTS = ("conv", "linear", "atomic", "transposed")


def _modules() -> dict[str, ast.Module]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        name = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")
        out[name] = ast.parse(path.read_text(), str(path))
    return out


def _target(module: str, node: ast.ImportFrom, is_package: bool) -> list[str]:
    """The prunetool modules an import names (``from . import a, b`` names a and b when they are modules)."""
    if node.level == 0:
        return [node.module] if (node.module or "").startswith("prunetool") else []
    base = module.split(".")
    base = base[:len(base) - node.level + (1 if is_package else 0)]
    stem = ".".join(base + ([node.module] if node.module else []))
    return [f"{stem}.{a.name}" for a in node.names] if node.module is None else [stem]


def _graph():
    trees = _modules()
    edges: dict[str, set[str]] = {m: set() for m in trees}
    nested: list[str] = []
    for name, tree in trees.items():
        is_package = (PACKAGE.parent / name.replace(".", "/") / "__init__.py").exists()
        top = set(map(id, tree.body))
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            targets = _target(name, node, is_package) if isinstance(node, ast.ImportFrom) else \
                [a.name for a in node.names if a.name.startswith("prunetool")]
            targets = [t if t in trees else t.rsplit(".", 1)[0] for t in targets]
            targets = [t for t in targets if t in trees and t != name]
            if not targets:
                continue
            if id(node) not in top:
                nested.append(f"{name}:{node.lineno} imports {', '.join(targets)}")
            else:
                edges[name].update(targets)
    return edges, nested


def test_no_import_cycle_and_no_import_inside_a_function():
    edges, nested = _graph()
    assert not nested, "imports inside functions (an import there only hides a cycle): " + "; ".join(nested)
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for t in sorted(edges[m]):
            if state.get(t) == 1:
                raise AssertionError("import cycle: " + " → ".join(stack[stack.index(t):] + [t]))
            if t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m)
    # the package's front door imports the commands; nothing below the commands imports them back
    below = [m for m in edges if m.startswith("prunetool.") and not m.startswith("prunetool.commands")
             and m not in ("prunetool.cli",)]
    assert not [m for m in below if any(t.startswith("prunetool.commands") for t in edges[m])]


def test_layer_types_are_named_only_in_the_registry():
    """No ``isinstance`` on a torch layer type and no layout string outside ``layers``/``ops``: a new layer type
    is one registry entry, not a hunt through the stages."""
    module_types = {n for n, v in vars(nn).items() if inspect.isclass(v) and issubclass(v, nn.Module)
                    and v is not nn.Module}
    kinds = {n for n, v in vars(layers).items() if inspect.isclass(v) and issubclass(v, layers.Kind)}
    found = []
    for name, tree in _modules().items():
        if name.rsplit(".", 1)[-1] in REGISTRY:
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "isinstance" and len(node.args) == 2:
                for sub in ast.walk(node.args[1]):
                    attr = sub.attr if isinstance(sub, ast.Attribute) else getattr(sub, "id", None)
                    if attr in module_types or attr in kinds or attr in ("_ConvNd", "_BatchNorm", "_NormBase"):
                        found.append(f"{name}:{node.lineno} isinstance on {attr}")
            if isinstance(node, ast.Compare) and any(isinstance(c, ast.Constant) and c.value in LAYOUTS
                                                     for c in [node.left, *node.comparators]):
                found.append(f"{name}:{node.lineno} compares with a layout string")
    assert not found, "; ".join(found)


def test_every_op_names_real_torch_calls_and_parameters():
    for name, op in ops._BY_CALL.items():
        func = getattr(F, name, None) or getattr(torch, name)
        assert ops.call_name(func) == name, name
        for key in (op.weight, op.input) + ((op.bias,) if op.bias else ()):
            assert key in op.signature, (name, key)
        try:
            params = list(inspect.signature(func).parameters)
        except (TypeError, ValueError):  # a builtin without a Python signature: the docstring lists them
            params = [p for p in op.signature if p in (func.__doc__ or "")]
        assert params[:len(op.signature)] == list(op.signature), (name, params, op.signature)


def test_every_registered_layer_type_exists():
    """A registration by dotted name that resolves to nothing would silently never apply."""
    for key, kind in layers._REGISTRY.items():
        assert isinstance(kind, layers.Kind)
        if isinstance(key, str):
            module_name, _, cls = key.rpartition(".")
            resolved = getattr(importlib.import_module(module_name), cls, None)
            assert inspect.isclass(resolved) and issubclass(resolved, nn.Module), key


def test_every_weighted_module_kind_knows_its_op():
    cases = [(nn.Linear(4, 3), ops.LINEAR), (nn.Conv2d(2, 3, 3), ops.CONV), (nn.Conv1d(2, 3, 3), ops.CONV)]
    for module, op in cases:
        assert layers.op_of(module) is op
    linear = layers.op_of(nn.Linear(4, 3))
    w = torch.randn(3, 4)
    assert torch.equal(linear.from_matrix(linear.as_matrix(w), w), w)
    conv = torch.randn(5, 2, 3, 3)
    assert torch.equal(ops.CONV.from_matrix(ops.CONV.as_matrix(conv), conv), conv)
    assert ops.CONV.as_matrix(conv).shape == (5, 18) and ops.ADDMM.as_matrix(torch.randn(4, 3)).shape == (3, 4)


class MmOp(ops.TransposedOp):
    """``torch.mm(x, W)`` with the weight stored in × out: the README's example of a new kind of weighted call."""

    calls = ("mm",)
    signature = ("input", "mat2")
    weight, input, bias = "mat2", "input", None


class MmNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(8, 16) / 3)
        self.b = nn.Parameter(torch.randn(16) / 3)
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        return self.head(torch.relu(torch.mm(x, self.w) + self.b))


def test_a_registered_op_makes_its_calls_prunable(monkeypatch):
    """One op object is all a new weighted call needs: trace finds its units, the cut slices its weight, and the cut
    equals the dense model with the removed units zeroed."""
    torch.manual_seed(0)
    model, x = MmNet().eval(), torch.randn(32, 8)
    assert not trace(model, x).groups  # unknown call: nothing to cut
    monkeypatch.setitem(ops._BY_CALL, "mm", MmOp())
    graph = trace(model, x)
    assert len(graph.groups) == 1
    group = graph.groups[0]
    assert group.units == 16 and group.consumers[0].name == "head" and group.producers[0].dim == 1
    keep = {group.name: torch.arange(0, 16, 2)}
    assert check_removal(model, graph, keep, x) < 1e-6
    small = cut(layers.clone(model), graph, keep, "lstsq", samples=torch.randn(64, 8))
    assert small.w.shape == (8, 8) and small.head.weight.shape == (4, 8)
