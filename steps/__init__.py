"""The pipeline's steps, one module each (what ``pipeline/graph.py`` wires): ``shard``, ``train_vqvae``, ``encode``,
``train_prior``, ``sample``, ``evaluate``, and ``train_classifier`` (run on its own). What they share sits in the
subpackages, by role: ``core`` (the step contract), ``io`` (storage, reading, sources), ``training``, ``generation``,
``evaluation``, ``artifacts`` (the output contracts) and ``nn`` (pure torch)."""
