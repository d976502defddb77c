"""The one check that artifacts belong together: priors and a code dataset against the autoencoder they came from.

Every consumer (encode's successors, sample, evaluate, verify, the generator) calls :func:`check_compatible` before
doing any work, so a prior of another VQ-VAE, level or code map, or a code dataset of another model, fails in
seconds with the file and the field named, the same way everywhere. It reads only metadata and checkpoint configs.
"""

from __future__ import annotations

from steps.artifacts.autoencoder import Autoencoder
from steps.artifacts.checkpoints import CheckpointFile
from steps.artifacts.code_format import CodeDatasetMismatch
from steps.artifacts.codes import CodeDataset
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
        codes.check_against(autoencoder)
    return priors.check_against(autoencoder) if priors is not None else 0


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
