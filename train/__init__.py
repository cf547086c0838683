"""INTL pretraining and evaluation, installed as ``intl_kernels.train``.

Commands: ``intl-pretrain``, ``intl-knn-eval``, ``intl-linear-eval``, ``intl-train-demo``
(also ``python -m intl_kernels.train.<module>``, or ``python -m train.<module>`` in a checkout).

Modules: ``data`` (ImageFolder and digits datasets, augmentations, the resumable sampler, the
dataset fingerprint), ``models`` (backbones, projector, backbone export/import), ``checkpoint``
(atomic save, resume with fallback, corrupt files set aside, kept snapshots), ``lock`` (one run
per exp-dir), ``monitor`` (stats.jsonl, TensorBoard, progress, spectrum monitor), ``runtime``
(torchrun/DDP set-up, devices, seeds, versions), ``cli`` (user errors, flag checks, exit
statuses). See train/README.md.
"""
