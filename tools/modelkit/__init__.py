"""Reproducible builds of edgert's sample models; ``tools/make_models.py`` is the command line.

- ``common``: paths, constants, seeding, hashing, atomic writes, the digits data split
- ``digits``: the digits CNNs, their training and the build of one model family
- ``mobilenet``: the hand-written MobileNetV2 and its int8 build
- ``convert``: ONNX export, static QDQ quantization, Keras copy and int8 TFLite conversion
- ``cards``: cards.json fields and README.md rendering
- ``build``: whole builds, the reproducibility check, the git-ignored fp32 MobileNetV2
"""
