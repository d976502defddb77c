"""The fault-drill harness: real faults around real pipelines, for ``bench/faults.py`` and ``tests/e2e``.

=================  ==========================================================================================
module             what it holds
=================  ==========================================================================================
``workspace``      :class:`~drills.workspace.Workspace`: one artifacts root and MLflow store, and the
                   ``python -m pipeline debug=tiny`` subprocesses run on them (started, killed, waited for)
``scenarios``      the pipeline faults: a killed worker, a NaN loss, a driver killed mid-step, two pipelines racing
``io_faults``      the input and output faults: a hostile input folder, a read-only root, a disk that fills up
``compare``        whether a scenario's outputs equal an uninterrupted run's (each output handle's digest)
=================  ==========================================================================================

Faults inside training come from the user tool :mod:`pipeline.faults` (``python -m pipeline.faults``), which the
workspace runs as a subprocess; nothing here is imported by the product.
"""
