"""INTL pretraining and evaluation: ``python -m train.pretrain``, ``train.knn_eval``, ``train.linear_eval``.

Modules: ``data`` (ImageFolder and digits datasets, augmentations, the resumable sampler),
``models`` (backbones, projector, backbone export/import), ``checkpoint`` (atomic save,
resume with fallback), ``monitor`` (stats.jsonl, TensorBoard, spectrum monitor),
``runtime`` (torchrun/DDP set-up, devices, seeds). See train/README.md.
"""
