"""Permutation specs derived from a torch.fx trace of an nn.Module.

Every tensor flowing through the traced graph carries a *unit variable*: which
permutation acts on its feature axis (last axis for Linear, axis 1 for Conv). A
Linear or Conv starts a new variable; norms, activations, pooling and flatten pass
it on; an addition (a residual connection) forces its operands to share one
variable (union-find); the network's inputs and outputs are fixed (identity).
The variables left after the unions are the spec's groups.

Anything else (concatenation, attention's reshapes, grouped convolutions, tensors
read with get_attr) stops the trace with a MergeError naming the node, rather than
producing a spec that silently breaks the network.

Assumed, not checked: `view`/`reshape`/`flatten` only flatten channel-first feature maps
(N, C, ...) -> (N, C * ...), so that a flattened channel is a contiguous block of the next
Linear's inputs. A network that reshapes features any other way needs a hand-written spec;
the function-preservation check (aligned B's outputs against B's) would catch it.
"""

from __future__ import annotations

import operator
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import fx, nn

from mergelab.align.spec import Axis, PermutationSpec
from mergelab.errors import MergeError

_FIXED = 0  # the variable of the network's inputs and outputs: never permuted

# Modules whose output's feature axis is the input's (elementwise or per-channel).
_PASS_MODULES = (nn.ReLU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.LeakyReLU, nn.ELU, nn.Softplus, nn.Mish,
                 nn.Hardswish, nn.Dropout, nn.Identity, nn.Flatten, nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d,
                 nn.AvgPool2d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.Softmax,
                 nn.LogSoftmax)
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.LayerNorm)
_PASS_FUNCTIONS = {F.relu, F.gelu, F.silu, F.leaky_relu, F.elu, F.dropout, F.softmax, F.log_softmax, torch.relu,
                   torch.tanh, torch.sigmoid, torch.flatten, F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d,
                   F.max_pool1d, F.avg_pool1d, torch.softmax, torch.log_softmax}
_PASS_METHODS = {"relu", "tanh", "sigmoid", "flatten", "view", "reshape", "contiguous", "softmax", "log_softmax",
                 "clone", "float", "to"}
_JOIN = {operator.add, operator.sub, operator.mul, operator.iadd, torch.add, torch.sub, torch.mul}
_JOIN_METHODS = {"add", "sub", "mul", "add_", "mul_"}
_SCALAR_METHODS = {"size", "dim"}
_REDUCE_METHODS = {"mean", "sum", "amax"}


class _Vars:
    """Union-find over unit variables; each remembers its size and the module that created it."""

    def __init__(self) -> None:
        self.parent = [0]
        self.size: list[int | None] = [None]
        self.name = ["<fixed>"]

    def new(self, size: int, name: str) -> int:
        self.parent.append(len(self.parent))
        self.size.append(size)
        self.name.append(name)
        return len(self.parent) - 1

    def find(self, v: int) -> int:
        while self.parent[v] != v:
            self.parent[v] = self.parent[self.parent[v]]
            v = self.parent[v]
        return v

    def union(self, a: int, b: int, where: str) -> int:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return ra
        sa, sb = self.size[ra], self.size[rb]
        if sa is not None and sb is not None and sa != sb:
            raise MergeError(f"node {where} adds features of {self.name[ra]} ({sa} units) and "
                             f"{self.name[rb]} ({sb} units); their widths must match")
        keep, drop = (ra, rb) if ra < rb else (rb, ra)  # the fixed variable (0), else the earliest, wins
        self.parent[drop] = keep
        return keep


def _refuse(node: fx.Node, why: str) -> MergeError:
    return MergeError(f"cannot derive a permutation spec: node '{node.name}' ({node.op} {node.target!s:.60}) "
                      f"{why}; give a PermutationSpec by hand for this architecture")


class _SpecTracer:
    def __init__(self, model: nn.Module):
        self.model = model
        self.modules = dict(model.named_modules())
        self.vars = _Vars()
        self.value: dict[fx.Node, int | None] = {}
        self.param_axes: dict[str, tuple[int | None, ...]] = {}
        self.taps: list[tuple[int, str, str]] = []  # (variable, module, "in"|"out")

    def _var(self, node: fx.Node, arg) -> int | None:
        if isinstance(arg, fx.Node):
            return self.value.get(arg)
        return None

    def _input_var(self, node: fx.Node) -> int:
        v = self._var(node, node.args[0]) if node.args else None
        if v is None:
            raise _refuse(node, "has no traced tensor input")
        return v

    def _module(self, node: fx.Node) -> int | None:
        mod = self.modules[node.target]
        name = str(node.target)
        prefix = f"{name}." if name else ""
        if isinstance(mod, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            if getattr(mod, "groups", 1) != 1:
                raise _refuse(node, f"is a grouped convolution (groups={mod.groups})")
            v_in = self._input_var(node)
            out_size = mod.out_features if isinstance(mod, nn.Linear) else mod.out_channels
            v_out = self.vars.new(out_size, name)
            rest = (None,) * (mod.weight.dim() - 2)
            self.param_axes[prefix + "weight"] = (v_out, v_in, *rest)
            if mod.bias is not None:
                self.param_axes[prefix + "bias"] = (v_out,)
            self.taps.append((v_out, name, "out"))
            return v_out
        if isinstance(mod, nn.Embedding):
            v_out = self.vars.new(mod.embedding_dim, name)
            self.param_axes[prefix + "weight"] = (None, v_out)
            return v_out
        if isinstance(mod, _NORMS):
            if isinstance(mod, nn.LayerNorm) and len(mod.normalized_shape) != 1:
                raise _refuse(node, "is a LayerNorm over more than the last axis")
            v = self._input_var(node)
            for pname, t in [*mod.named_parameters(recurse=False), *mod.named_buffers(recurse=False)]:
                self.param_axes[prefix + pname] = (v,) if t.dim() == 1 else ()
            self.taps.append((v, name, "out"))
            return v
        if isinstance(mod, _PASS_MODULES):
            return self._input_var(node)
        raise _refuse(node, f"calls a {type(mod).__name__}, which the tracer does not know how to permute")

    def _join(self, node: fx.Node) -> int:
        tensor_vars = [self._var(node, a) for a in node.args if isinstance(a, fx.Node)]
        tensor_vars = [v for v in tensor_vars if v is not None]
        if not tensor_vars:
            raise _refuse(node, "combines no traced tensors")
        v = tensor_vars[0]
        for other in tensor_vars[1:]:
            v = self.vars.union(v, other, node.name)
        return v

    def _reduce(self, node: fx.Node) -> int:
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        dims = (dims,) if isinstance(dims, int) else dims
        if not dims or any(not isinstance(d, int) or d < 2 for d in dims):
            raise _refuse(node, "reduces over the feature axis or over unnamed axes; "
                                "reduce over spatial axes (2, 3, ...) only")
        return self._input_var(node)

    def step(self, node: fx.Node) -> int | None:
        op, target = node.op, node.target
        if op == "placeholder":
            return _FIXED
        if op == "output":
            leaves: list[fx.Node] = []
            fx.node.map_arg(node.args, lambda n: leaves.append(n) or n)
            for leaf in leaves:
                if self.value.get(leaf) is not None:
                    self.vars.union(self.value[leaf], _FIXED, node.name)
            return None
        if op == "call_module":
            return self._module(node)
        if op == "call_function":
            if target in _PASS_FUNCTIONS:
                return self._input_var(node)
            if target in _JOIN:
                return self._join(node)
            if target is getattr and node.args[1] in ("shape",):
                return None
            if target is operator.getitem and self._var(node, node.args[0]) is None:
                return None
            raise _refuse(node, "is a function the tracer does not know how to permute")
        if op == "call_method":
            if target in _SCALAR_METHODS:
                return None
            if target in _PASS_METHODS:
                return self._input_var(node)
            if target in _JOIN_METHODS:
                return self._join(node)
            if target in _REDUCE_METHODS:
                return self._reduce(node)
            raise _refuse(node, f"calls the tensor method .{target}(), which the tracer does not follow")
        raise _refuse(node, "reads a parameter or buffer directly (get_attr)")


def spec_from_module(model: nn.Module, leaf: Callable[[nn.Module, str], bool] | None = None) -> PermutationSpec:
    """The permutation spec of `model`, found by tracing it with torch.fx.

    Args:
        model: the network (not changed).
        leaf: optional fx leaf-module predicate for custom modules the tracer should not enter.

    Raises:
        MergeError naming the node the tracer cannot follow.
    """
    class _Tracer(fx.Tracer):
        def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
            return (leaf is not None and leaf(m, qualname)) or super().is_leaf_module(m, qualname)

    try:
        graph = _Tracer().trace(model)
    except Exception as exc:  # fx raises many types for data-dependent control flow
        raise MergeError(f"cannot derive a permutation spec: torch.fx cannot trace {type(model).__name__} "
                         f"({type(exc).__name__}: {str(exc).splitlines()[0][:160]}); give a PermutationSpec "
                         "by hand") from exc
    tracer = _SpecTracer(model)
    for node in graph.nodes:
        tracer.value[node] = tracer.step(node)
    return _collect(model, tracer)


def _collect(model: nn.Module, tracer: _SpecTracer) -> PermutationSpec:
    vs = tracer.vars
    names: dict[int, str] = {}
    for v in range(1, len(vs.parent)):
        root = vs.find(v)
        if root != _FIXED and root not in names:
            names[root] = f"P_{vs.name[root] or 'input'}"

    def axis(v: int | None) -> Axis | None:
        if v is None or vs.find(v) == _FIXED:
            return None
        return Axis(names[vs.find(v)])

    axes = {}
    for key, t in model.state_dict().items():
        found = tracer.param_axes.get(key)
        axes[key] = tuple(axis(v) for v in found) if found is not None else (None,) * t.dim()
    taps: dict[str, list[tuple[str, str]]] = {}
    for v, module, where in tracer.taps:
        ax = axis(v)
        if ax is not None:
            taps.setdefault(ax.group, []).append((module, where))
    groups = {names[r]: vs.size[r] for r in names}
    return PermutationSpec(groups=groups, axes=axes, taps=taps)
