"""Which parameters enter the norm term ``R(W) = 1/2 sum_l ||W_l||_F^2``, its value and
its gradient."""

from __future__ import annotations

import builtins
import copy
import inspect
import operator
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

# Layers whose own parameters (affine scale and shift) are never in the norm term.
_NORMALIZATION_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,  # BatchNorm*, SyncBatchNorm, InstanceNorm*
    nn.LayerNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
)
# Layers whose output does not change when their input is scaled by any a > 0 (up to
# their eps): the scale of a weight that feeds only them is free. LocalResponseNorm
# divides by (k + alpha * sum x^2)^beta and is not among them.
_SCALE_INVARIANT_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,
    nn.LayerNorm,
    nn.GroupNorm,
)
if hasattr(nn, "RMSNorm"):
    _NORMALIZATION_TYPES = _NORMALIZATION_TYPES + (nn.RMSNorm,)
    _SCALE_INVARIANT_TYPES = _SCALE_INVARIANT_TYPES + (nn.RMSNorm,)
_SCALE_INVARIANT_FUNCTIONS: frozenset[Any] = frozenset(
    f
    for f in (
        F.batch_norm, F.instance_norm, F.layer_norm, F.group_norm, getattr(F, "rms_norm", None), F.normalize,
        torch.batch_norm, torch.instance_norm, torch.layer_norm, torch.group_norm,
    )
    if f is not None
)

# Positively homogeneous maps of one tensor: h(a x) = a h(x) for every a > 0 (ReLU and
# its leaky/parametric kinds, dropout, max and average pooling, reshapes). A weight's
# output that passes only through them still has its scale free in front of a
# normalization.
_HOMOGENEOUS_TYPES: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.LeakyReLU, nn.PReLU, nn.Identity,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,  # not AlphaDropout: affine
    nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AvgPoolNd,
    nn.modules.pooling._AdaptiveMaxPoolNd, nn.modules.pooling._AdaptiveAvgPoolNd,
    nn.Flatten, nn.Unflatten, nn.Upsample, nn.PixelShuffle, nn.PixelUnshuffle,
)
_HOMOGENEOUS_FUNCTIONS: frozenset[Any] = frozenset(
    (
        F.relu, F.relu_, torch.relu, torch.relu_, F.leaky_relu, F.prelu,
        F.dropout, F.dropout1d, F.dropout2d, F.dropout3d,
        F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
        F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d,
        F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, F.pixel_shuffle,
        torch.flatten, torch.reshape, torch.permute, torch.transpose, torch.t, torch.squeeze,
        torch.unsqueeze, torch.neg, operator.neg, operator.getitem,
    )
)
_HOMOGENEOUS_METHODS = frozenset(
    (
        "relu", "relu_", "view", "view_as", "reshape", "reshape_as", "flatten", "unflatten", "permute",
        "transpose", "t", "contiguous", "squeeze", "unsqueeze", "neg", "expand", "expand_as", "to",
        "float", "double", "half", "bfloat16", "type_as", "clone",
    )
)
# Products with a number (either side of *, the numerator of /).
_SCALAR_PRODUCTS: frozenset[Any] = frozenset((operator.mul, torch.mul, operator.truediv, torch.div))
_SCALAR_PRODUCT_METHODS = frozenset(("mul", "mul_", "div", "div_"))
# Reads of a tensor that do not depend on its values.
_SHAPE_METHODS = frozenset(("size", "dim", "numel", "ndimension"))
_SHAPE_ATTRIBUTES = frozenset(("shape", "dtype", "device", "ndim", "is_cuda"))

# Ops that multiply their input by a weight operand: (positions, keyword) of the weight.
_LINEAR_MAP_FUNCTIONS: dict[Any, tuple[tuple[int, ...], str | None]] = {
    F.linear: ((1,), "weight"),
    F.bilinear: ((2,), "weight"),
    F.embedding: ((1,), "weight"),
    F.conv1d: ((1,), "weight"), F.conv2d: ((1,), "weight"), F.conv3d: ((1,), "weight"),
    F.conv_transpose1d: ((1,), "weight"), F.conv_transpose2d: ((1,), "weight"),
    F.conv_transpose3d: ((1,), "weight"),
    torch.matmul: ((0, 1), None), operator.matmul: ((0, 1), None), torch.mm: ((0, 1), None),
    torch.bmm: ((0, 1), None), torch.addmm: ((1, 2), None), torch.baddbmm: ((1, 2), None),
    torch.einsum: (tuple(range(1, 16)), None),
}
_LINEAR_MAP_METHODS: dict[str, tuple[int, ...]] = {"matmul": (0, 1), "mm": (0, 1), "bmm": (0, 1)}

# Layers whose output is positively homogeneous in their ``weight`` (the bias, out of
# the norm term anyway, can follow the scale).
_WEIGHT_LAYER_TYPES: tuple[type[nn.Module], ...] = (
    nn.Linear, nn.modules.conv._ConvNd, nn.Bilinear, nn.Embedding, nn.EmbeddingBag,
)
_ATTENTION_INPUT_WEIGHTS = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")


def default_norm_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters that enter the norm term ``R(W)`` for ``model``.

    The rule. Every module's own parameters are read (those of containers such as
    ``nn.MultiheadAttention.in_proj_weight`` too, not only those of leaf modules).

    - In: the weights of layers, i.e. parameters with two or more dimensions that the
      network multiplies its activations with (Linear and convolution weights and
      kernels, attention projections, embedding tables: an embedding is the weight of
      a linear map of a one-hot input).
    - Out: biases and every other 1-D parameter; the parameters of normalization
      layers (BatchNorm, InstanceNorm, LayerNorm, GroupNorm, RMSNorm,
      LocalResponseNorm); the ``bias_k``/``bias_v`` of attention.
    - Out: the weight of a layer whose output reaches a normalization layer only
      through positively homogeneous maps of that one tensor (ReLU, LeakyReLU,
      PReLU, Identity, Dropout, max and average pooling, reshapes, products with a
      number): the normalization removes any positive scale of that weight, so its
      norm is free to shrink and the min-norm problem would be degenerate. An output
      that is also used elsewhere, or added to another tensor before the
      normalization (a residual: ``norm(x + attention(x))``), keeps its weight in.
    - With a trace: out, the parameters that are only added, concatenated or
      otherwise combined elementwise, not multiplied with an activation (ViT's
      ``class_token`` and ``pos_embedding``, learned offsets): they are offsets like
      biases, not weights of a layer.

    How the data flow is read. From ``torch.fx`` (a symbolic trace of ``model`` with
    fx's usual leaves: modules of ``torch.nn`` other than ``Sequential``), when the
    model traces. A leaf that is neither a normalization, nor a layer with one weight
    (Linear, convolutions, Bilinear, Embedding, EmbeddingBag), nor
    ``nn.MultiheadAttention`` (whose ``out_proj`` output is followed like a Linear's;
    its input projections are never free) is opaque: its parameters with two or more
    dimensions are in, apart from those of its normalization layers
    (``nn.TransformerEncoderLayer``: both residual blocks end in ``norm(x + ...)``, so
    attention, ``linear1`` and ``linear2`` all stay in, whichever ``norm_first``). A
    parameter the traced forward never reads is in when it has two or more dimensions.

    When the model does not trace (data-dependent control flow, unsupported calls),
    the flow is read from module registration order instead, which is the data-flow
    order for ``nn.Sequential`` and torchvision's ResNet/VGG blocks but not in general:
    a weight layer is out when the next module registered after it, skipping the
    homogeneous ones, is a normalization; the same opaque leaves as above; and every
    other parameter with two or more dimensions is in (how it is used is not known, so
    class tokens and position embeddings are in). A model that is itself such a leaf
    (a bare ``nn.TransformerEncoderLayer``) is read without a trace.

    A model with a ``minnorm_norm_parameters()`` method chooses for itself: its result
    is the list (:class:`~minnorm_audit.training.models.TextNetwork` leaves its
    embedding table out).

    Parameters
    ----------
    model : torch.nn.Module
        ``DataParallel`` / ``DistributedDataParallel`` wrappers are looked through.

    Returns
    -------
    list of torch.nn.Parameter
        In ``model.named_parameters()`` order, each once.
    """
    while isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        model = model.module
    chosen_by_model = getattr(model, "minnorm_norm_parameters", None)
    if callable(chosen_by_model):  # a network that says which of its weights are in (TextNetwork)
        return list(chosen_by_model())
    named = list(model.named_parameters())
    never = _never_in_norm(model)
    tracer = fx.Tracer()
    graph = None
    if not tracer.is_leaf_module(model, ""):
        graph = _trace(tracer, model)
    if graph is None:
        chosen = _chosen_by_registration_order(model, tracer, never)
    else:
        chosen = _chosen_by_data_flow(model, graph, never)
    return [parameter for _, parameter in named if id(parameter) in chosen]


def _never_in_norm(model: nn.Module) -> set[int]:
    """Parameters of normalization layers and attention's ``bias_k``/``bias_v``."""
    never: set[int] = set()
    for module in model.modules():
        if isinstance(module, _NORMALIZATION_TYPES):
            never.update(id(p) for p in module.parameters())
        elif isinstance(module, nn.MultiheadAttention):
            never.update(id(p) for p in (module.bias_k, module.bias_v) if p is not None)
    return never


def _trace(tracer: fx.Tracer, model: nn.Module) -> fx.Graph | None:
    """The model's fx graph, or None when it does not trace. Arguments with a plain
    default value (None, a bool, a number, a string) keep it."""
    concrete: dict[str, Any] = {}
    try:
        signature = inspect.signature(model.forward)
        for name, parameter in signature.parameters.items():
            if parameter.default is None or isinstance(parameter.default, (bool, int, float, str)):
                concrete[name] = parameter.default
    except (TypeError, ValueError):
        concrete = {}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # A shallow copy: fx may store tensor constants on the traced root; the
            # copy shares the submodules and parameters, so the graph's names resolve.
            return tracer.trace(copy.copy(model), concrete_args=concrete or None)
    except Exception:  # noqa: BLE001 - tracing fails in many ways; all mean "no trace"
        return None


# ---------------------------------------------------------------------- with a trace
def _chosen_by_data_flow(model: nn.Module, graph: fx.Graph, never: set[int]) -> set[int]:
    """Parameter ids in the norm term, read from the traced graph."""
    module_of = model.get_submodule
    kept: set[int] = set()  # used at least once where its scale matters
    read: set[int] = set()  # read by the graph at all

    def use(parameter: nn.Parameter | None, scale_is_free: bool) -> None:
        if parameter is not None and not scale_is_free and id(parameter) not in never and parameter.ndim >= 2:
            kept.add(id(parameter))

    for node in graph.nodes:
        if node.op == "call_module":
            module = model.get_submodule(node.target)
            read.update(id(p) for p in module.parameters())
            if isinstance(module, _NORMALIZATION_TYPES):
                continue
            if isinstance(module, _WEIGHT_LAYER_TYPES):
                use(module.weight, _reaches_only_normalization(node, module_of))
            elif isinstance(module, nn.MultiheadAttention):
                for name in _ATTENTION_INPUT_WEIGHTS:
                    use(getattr(module, name, None), False)
                use(module.out_proj.weight, _attention_output_reaches_only_normalization(node, module_of))
            else:  # opaque
                for parameter in module.parameters():
                    use(parameter, False)
        elif node.op == "get_attr":
            try:
                parameter = model.get_parameter(node.target)
            except AttributeError:  # a buffer or a constant
                continue
            read.add(id(parameter))
            for product in _linear_uses(node, module_of):
                use(parameter, _reaches_only_normalization(product, module_of))
    for _, parameter in model.named_parameters():
        if id(parameter) not in read:
            use(parameter, False)  # never read by the traced forward: in doubt, in
    # A parameter with a free scale at every use is out; one use that matters keeps it.
    return kept


def _input_position(user: fx.Node, node: fx.Node) -> int | str | None:
    """Where ``node`` sits among ``user``'s arguments (index, keyword, or None)."""
    for index, argument in enumerate(user.args):
        if argument is node:
            return index
    for key, argument in user.kwargs.items():
        if argument is node:
            return key
    return None


def _flows_through(user: fx.Node, node: fx.Node, module_of: Callable[[str], nn.Module]) -> str:
    """How ``node``'s value reaches ``user``: "norm" (a scale-invariant normalization of
    it), "homogeneous" (a positively homogeneous map of it alone), "shape" (only its
    shape is read) or "other"."""
    position = _input_position(user, node)
    if user.op == "call_module":
        module = module_of(user.target)
        if position != 0:
            return "other"
        if isinstance(module, _SCALE_INVARIANT_TYPES):
            return "norm"
        if isinstance(module, _HOMOGENEOUS_TYPES):
            return "homogeneous"
        return "other"
    if user.op == "call_function":
        target = user.target
        if target is builtins.getattr:
            attribute = user.args[1] if len(user.args) > 1 else None
            if attribute in _SHAPE_ATTRIBUTES:
                return "shape"
            return "homogeneous" if attribute in ("T", "mT") else "other"
        if target in _SCALE_INVARIANT_FUNCTIONS:
            return "norm" if position in (0, "input") else "other"
        if target in _SCALAR_PRODUCTS:
            others = [a for a in list(user.args) + list(user.kwargs.values()) if a is not node]
            numerator_ok = target in (operator.mul, torch.mul) or position == 0
            if numerator_ok and len(others) == 1 and isinstance(others[0], (int, float)) and others[0] != 0:
                return "homogeneous"
            return "other"
        if target in _HOMOGENEOUS_FUNCTIONS:
            return "homogeneous" if position in (0, "input") else "other"
        return "other"
    if user.op == "call_method":
        if position != 0:
            return "other"
        if user.target in _SHAPE_METHODS:
            return "shape"
        if user.target in _HOMOGENEOUS_METHODS:
            return "homogeneous"
        if user.target in _SCALAR_PRODUCT_METHODS:
            others = list(user.args[1:]) + list(user.kwargs.values())
            if len(others) == 1 and isinstance(others[0], (int, float)) and others[0] != 0:
                return "homogeneous"
        return "other"
    return "other"  # output, placeholder


def _reaches_only_normalization(start: fx.Node, module_of: Callable[[str], nn.Module]) -> bool:
    """Whether every value computed from ``start`` reaches a scale-invariant
    normalization through positively homogeneous maps only (at least one does)."""
    reached = False
    stack, seen = [start], {start}
    while stack:
        node = stack.pop()
        for user in node.users:
            kind = _flows_through(user, node, module_of)
            if kind == "norm":
                reached = True
            elif kind == "homogeneous":
                if user not in seen:
                    seen.add(user)
                    stack.append(user)
            elif kind != "shape":
                return False
    return reached


def _attention_output_reaches_only_normalization(
    attention: fx.Node, module_of: Callable[[str], nn.Module]
) -> bool:
    """``_reaches_only_normalization`` for the attention output (``[0]``) of a
    ``nn.MultiheadAttention`` call; its attention weights (``[1]``) do not depend on
    ``out_proj``."""
    outputs = []
    for user in attention.users:
        if user.op == "call_function" and user.target is operator.getitem and user.args[0] is attention:
            if user.args[1] == 0:
                outputs.append(user)
                continue
            if user.args[1] == 1:
                continue
        return False
    return bool(outputs) and all(_reaches_only_normalization(output, module_of) for output in outputs)


def _linear_uses(parameter_node: fx.Node, module_of: Callable[[str], nn.Module]) -> list[fx.Node]:
    """The nodes that multiply an activation by this parameter (after reshapes,
    transposes or slices of it)."""
    products: list[fx.Node] = []
    stack, seen = [parameter_node], {parameter_node}
    while stack:
        node = stack.pop()
        for user in node.users:
            position = _input_position(user, node)
            if user.op == "call_function" and user.target in _LINEAR_MAP_FUNCTIONS:
                positions, keyword = _LINEAR_MAP_FUNCTIONS[user.target]
                if position in positions or (keyword is not None and position == keyword):
                    products.append(user)
                continue
            if user.op == "call_method" and user.target in _LINEAR_MAP_METHODS:
                if position in _LINEAR_MAP_METHODS[user.target]:
                    products.append(user)
                continue
            if _flows_through(user, node, module_of) == "homogeneous" and user not in seen:
                seen.add(user)
                stack.append(user)
    return products


# ---------------------------------------------------------------------- without a trace
def _chosen_by_registration_order(model: nn.Module, tracer: fx.Tracer, never: set[int]) -> set[int]:
    """Parameter ids in the norm term, read from module registration order: the units
    are the modules fx would keep as leaves (and modules without children), in the
    order ``named_modules`` visits them."""
    units: list[nn.Module] = []
    chosen: set[int] = set()
    seen: set[int] = set()

    def visit(module: nn.Module, name: str) -> None:
        if id(module) in seen:
            return
        seen.add(id(module))
        if not list(module.children()) or tracer.is_leaf_module(module, name):
            units.append(module)
            return
        # A container's own parameters: how they are used is not known, in doubt in.
        chosen.update(id(p) for p in module.parameters(recurse=False) if p.ndim >= 2 and id(p) not in never)
        for child_name, child in module.named_children():
            visit(child, f"{name}.{child_name}" if name else child_name)

    visit(model, "")
    for index, module in enumerate(units):
        if isinstance(module, _NORMALIZATION_TYPES):
            continue
        if isinstance(module, _WEIGHT_LAYER_TYPES):
            following = next((m for m in units[index + 1 :] if not isinstance(m, _HOMOGENEOUS_TYPES)), None)
            if isinstance(following, _SCALE_INVARIANT_TYPES):
                continue
        chosen.update(id(p) for p in module.parameters() if p.ndim >= 2 and id(p) not in never)
    return chosen


def norm_value(parameters: Sequence[nn.Parameter], anchors: Sequence[torch.Tensor | None] | None = None) -> float:
    """``R(W) = 1/2 sum ||W - W0||^2`` over ``parameters`` (in float32 or wider);
    ``anchors``: one ``W0`` per parameter (None or no list: 0, the plain norm)."""
    anchors = anchors if anchors is not None else [None] * len(parameters)
    with torch.no_grad():
        total = 0.0
        for p, anchor in zip(parameters, anchors):
            value = p.detach().to(torch.promote_types(p.dtype, torch.float32))
            if anchor is not None:
                value = value - anchor.to(value.dtype)
            total += float(value.pow(2).sum())
        return 0.5 * total


def add_norm_gradient(
    parameters: Sequence[nn.Parameter], scale: float, anchors: Sequence[torch.Tensor | None] | None = None
) -> None:
    """``grad += scale * (W - W0)`` for every parameter that requires grad (a missing
    ``.grad`` starts at zero; ``W0`` from ``anchors``, 0 when None): the norm term's
    share of one weight step. Call under no_grad; ``.grad`` tensors never require grad."""
    anchors = anchors if anchors is not None else [None] * len(parameters)
    pairs = [(p, anchor) for p, anchor in zip(parameters, anchors) if p.requires_grad]
    for parameter, _ in pairs:
        if parameter.grad is None:
            parameter.grad = torch.zeros_like(parameter)
    plain = [p for p, anchor in pairs if anchor is None]
    if plain:
        torch._foreach_add_([p.grad for p in plain], plain, alpha=scale)
    anchored = [(p, anchor) for p, anchor in pairs if anchor is not None]
    if anchored:
        # The norm of the change (a pretrained start): the pull is toward W0, not 0.
        torch._foreach_add_([p.grad for p, _ in anchored], [p for p, _ in anchored], alpha=scale)
        torch._foreach_add_([p.grad for p, _ in anchored], [a for _, a in anchored], alpha=-scale)
