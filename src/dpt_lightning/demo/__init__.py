"""The offline demo's own models and pictures, generated on this machine (no downloads).

* `dpt_lightning.demo.models`: the ``tiny`` model (BiomedCLIP's full depth at a tiny width, with
  its timm image tower registered on import) and ``random-biomedclip``, written as ``local-dir:``
  folders into the cache;
* `dpt_lightning.demo.pictures`: the four classes of synthetic pictures and the cached image folder;
* `dpt_lightning.demo.pretrain`: ``tiny-demo``, the tiny model after a short contrastive
  pre-training on demo pictures and captions.

This package imports neither `dpt_lightning.backbone` nor `dpt_lightning.data`: the backbone loader
imports it (lazily) to build the generated models by name. Importing the package itself is light
(nothing below is imported until asked for).
"""
