"""Artifact contracts: one module per kind of step output, the only code that knows file names and layouts.

=================  =========================  ===========================================================
module             written by                 handle (open a URI) / writer
=================  =========================  ===========================================================
``images``         shard                      :class:`ImageShards` / :class:`ShardWriter`
``autoencoder``    train_vqvae                :class:`Autoencoder` / :class:`AutoencoderWriter`
``codes``          encode                     :class:`CodeDataset` / :class:`CodeWriter`
``priors``         train_prior                :class:`Priors` / :class:`PriorsWriter`
``samples``        sample                     :class:`Samples` / :class:`SamplesWriter`
``evaluation``     evaluate                   :class:`Evaluation` / :class:`EvaluationWriter`
``checkpoints``    (shared)                   :class:`CheckpointFile`: one checkpoint, its digest, its model
``compat``         (shared)                   :func:`check_compatible`: do priors / codes belong to a model
``splits``         (shared)                   the Parquet datasets' layout: hive ``split=<split>/`` folders, ``_``
                                              sidecars, and the layout before them (still read)
=================  =========================  ===========================================================

Steps, ``pipeline.verify``, the MLflow models and the generator open upstream outputs through these handles and
never spell a file name. The package itself imports nothing, so ``from steps.artifacts.codes import ...`` loads
only what it needs.
"""
