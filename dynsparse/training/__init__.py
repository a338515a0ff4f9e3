"""Training a model from a resolved configuration: the loop, one run (data, model, sparsifier, checkpoints,
logs), the configuration and the method it selects (``engine_adapter``), per-epoch schedules, distributed
training, and shipping a finished run (``deploy``). Builds on the engine (:mod:`dynsparse.sparse`),
:mod:`dynsparse.models`, :mod:`dynsparse.data` and :mod:`dynsparse.outputs`; never on the command line."""
