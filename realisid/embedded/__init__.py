"""What exists only for the embedded default: a small synthetic world that trains and measures on a CPU with
nothing downloaded, and the models trained once on it and shipped as package data (a tiny base text-to-image
model, two stand-in identity encoders, a synthetic face analyzer).

Every one of them is a stand-in, named as such wherever its output appears. Real experiments load real
weights by path and never touch this package; everything outside it is the real machinery (SD1.5 / SDXL,
insightface and the other face analyzers, real photos).

- :mod:`~realisid.embedded.synthetic`: the synthetic people and their webdataset shards (``data/synthetic/``);
- :mod:`~realisid.embedded.standin`: the stand-in ArcFace-style identity encoder (model, face crops, training,
  verification);
- :mod:`~realisid.embedded.analyzer`: the synthetic face analyzer (``faces.kind: synthetic``: detector with 5
  key points, training, accuracy);
- :mod:`~realisid.embedded.box_analyzer`: the stand-in encoder on the target box, no detection
  (``evaluation.encoder: standin``);
- :mod:`~realisid.embedded.fid_features`: the fixed random FID feature network (``evaluation.fid_features:
  standin``);
- :mod:`~realisid.embedded.base`: the tiny base model's training (VAE, UNet and text encoder) and sampling;
- :mod:`~realisid.embedded.stages`: the cached stages and the synthetic shards every stage trains on;
- :mod:`~realisid.embedded.pretrain`: ``make pretrain``, the recipe that trains the shipped models;
- :mod:`~realisid.embedded.check`: ``realisid check-embedded``, how good the shipped stand-ins are;
- :mod:`~realisid.embedded.assets`: finds the shipped copies (``${asset:...}`` in configs).
"""
