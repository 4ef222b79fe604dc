"""Training data and training: corpus conversion, song generation, renderers, augmentation,
aligned pairs, losses and the training loop. Never imported by the query path (``model/``'s
other modules, ``index/``, ``worker/``, ``server/``'s gateway)."""
