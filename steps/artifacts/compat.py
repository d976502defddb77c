"""The one check that artifacts belong together: priors and a code dataset against the autoencoder they came from.

Every consumer (encode's successors, sample, evaluate, verify, the generator) calls :func:`check_compatible` before
doing any work, so a prior of another VQ-VAE, level or code map, or a code dataset of another model, fails in
seconds with the file and the field named, the same way everywhere. It reads only metadata and checkpoint configs.
"""

from __future__ import annotations

from steps.artifacts.autoencoder import Autoencoder
from steps.artifacts.checkpoints import CheckpointFile
from steps.artifacts.codes import CodeDataset, CodeDatasetMismatch, check_code_meta
from steps.artifacts.priors import Priors
from steps.nn.checkpoint import CheckpointError


def check_compatible(
    autoencoder: Autoencoder, *, codes: CodeDataset | None = None, priors: Priors | None = None
) -> int:
    """Check that ``codes`` and ``priors`` were made from ``autoencoder``; returns the priors' number of classes
    (0 for unconditional priors or without priors).

    Raises:
        CodeDatasetMismatch: a code dataset of another model (levels, shapes, codebook sizes, digest), or one given
            with an autoencoder that makes no codes.
        MissingInputError: a level's prior is missing.
        CheckpointError: a prior of another level, code map, conditioning or VQ-VAE; priors that disagree on classes.
        ValueError: priors given with an autoencoder that makes no codes.
    """
    model = autoencoder.model_uri
    if not autoencoder.makes_codes:
        if codes is not None:
            raise CodeDatasetMismatch(
                f"code dataset {codes.uri} was given, but {model} holds a {autoencoder.kind} model, which makes no "
                "codes"
            )
        if priors is not None:
            raise ValueError(f"priors {priors.uri} were given, but {model} holds a {autoencoder.kind} model, which "
                             "makes no codes")  # fmt: skip
        return 0
    if codes is not None:
        _check_codes(autoencoder, codes)
    if priors is None:
        return 0
    classes = {lv: _check_prior(autoencoder, priors.checkpoint(lv), lv) for lv in autoencoder.levels}
    counts = {k for k in classes.values() if k > 0}
    if len(counts) > 1:
        raise CheckpointError(
            f"the priors at {priors.uri} disagree on the number of classes: {classes}; rerun train_prior"
        )
    return counts.pop() if counts else 0


def _check_codes(autoencoder: Autoencoder, codes: CodeDataset) -> None:
    try:
        check_code_meta(
            codes.meta,
            levels=autoencoder.levels,
            shapes=autoencoder.shapes,
            codebook_size=autoencoder.codebook_sizes,
            where=codes.uri,
        )
    except CodeDatasetMismatch as exc:
        raise CodeDatasetMismatch(f"{exc} (expected by {autoencoder.model_uri}); rerun the encode step") from None
    if codes.meta.vqvae != autoencoder.digest:  # the same architecture, other weights
        raise CodeDatasetMismatch(
            f"code dataset {codes.uri}: field 'vqvae' mismatch: made by VQ-VAE {codes.meta.vqvae}, but "
            f"{autoencoder.model_uri} is {autoencoder.digest}; rerun the encode step"
        )


def _check_prior(autoencoder: Autoencoder, prior: CheckpointFile, level: str) -> int:
    """The prior of ``level`` against the autoencoder; returns its number of classes."""
    uri, cfg, model = prior.uri, prior.config, autoencoder.model_uri
    if prior.extra("level") != level:
        raise CheckpointError(f"{uri} holds a prior for level {prior.extra('level')!r}, expected {level!r}")
    if prior.extra("vqvae") != autoencoder.digest:
        raise CheckpointError(
            f"{uri}: the {level} prior was trained on codes of VQ-VAE {prior.extra('vqvae')}, but {model} is "
            f"{autoencoder.digest}; rerun train_prior"
        )
    shape, size = list(autoencoder.shapes[level]), autoencoder.codebook_sizes[level]
    if list(cfg.shape) != shape or cfg.num_codes != size:
        raise CheckpointError(
            f"{uri} models {cfg.num_codes} codes on a {list(cfg.shape)} map, but {model} has {size} codes on a "
            f"{shape} map at level {level!r}"
        )
    index = autoencoder.levels.index(level)
    above = autoencoder.levels[index - 1] if index else None  # each level is conditioned on the one above it
    want = (autoencoder.codebook_sizes[above], list(autoencoder.shapes[above])) if above else (0, None)
    got = (cfg.cond_num_codes, list(cfg.cond_shape) if cfg.cond_num_codes else None)
    if got != want:
        expected = f"{want[0]} codes on the {above} map {want[1]}" if above else "no code map"
        raise CheckpointError(f"{uri} is conditioned on {got[0]} codes on a {got[1]} map, expected {expected}")
    return int(cfg.num_classes)


def check_classifier(classifier: CheckpointFile, autoencoder: Autoencoder, num_classes: int) -> None:
    """A rejection classifier must take the autoencoder's images and the priors' classes.

    Raises:
        ValueError: the priors are not class-conditional.
        CheckpointError: other image shape or classes.
    """
    if num_classes == 0:
        raise ValueError(
            "sample.classifier given, but the priors are not class-conditional: rejection keeps samples whose "
            "label the classifier confirms; train the priors with train_prior.class_conditional=true"
        )
    cc = classifier.config
    shape = (cc.in_channels, cc.image_size, cc.image_size)
    if shape != autoencoder.image_shape or cc.num_classes != num_classes:
        raise CheckpointError(
            f"sample.classifier {classifier.uri} takes {'x'.join(map(str, shape))} images and {cc.num_classes} "
            f"classes, but the models make {'x'.join(map(str, autoencoder.image_shape))} images of {num_classes} "
            "classes"
        )
