"""The folder layout the Parquet datasets of the pipeline share (image shards, code datasets).

    <out>/split=train/*.parquet    one folder per split, named the hive way (``<column>=<value>``)
    <out>/split=val/*.parquet
    <out>/_<record>.json           sidecars (``_manifest.json``, ``_codes.json``, ``_SUCCESS``): the leading ``_``
                                   makes every Parquet reader skip them

So ``<out>`` opens as one dataset, the split a string column ``split`` taken from the folder names (no file holds a
column of that name; pandas and ``pyarrow.parquet.read_table`` make it a dictionary/categorical column)::

    pyarrow.dataset.dataset(out, format="parquet", partitioning="hive")
    pandas.read_parquet(out)
    duckdb.sql(f"select * from read_parquet('{out}/**/*.parquet', hive_partitioning=true)")
    ray.data.read_parquet(out)

Every file keeps its own schema metadata, so a reader of one file (or of a split folder) sees no ``split`` column.

Outputs written before this layout (``<out>/train/``, ``<out>/val/``, records without the ``_``) are still read:
:func:`is_legacy` tells the handles (:class:`~steps.artifacts.images.ImageShards`,
:class:`~steps.artifacts.codes.CodeDataset`) which layout a folder holds.
"""

from __future__ import annotations

from steps.io import storage

SPLITS = ("train", "val")
SPLIT_COLUMN = "split"


def check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


def split_folder(split: str, legacy: bool = False) -> str:
    """The folder of ``split`` in an output: ``split=<split>``, or ``<split>`` in the old layout."""
    check_split(split)
    return split if legacy else f"{SPLIT_COLUMN}={split}"


def split_folders() -> tuple[str, ...]:
    """Every split folder name of either layout (what a writer clears before it starts)."""
    return tuple(split_folder(s, legacy) for legacy in (False, True) for s in SPLITS)


def is_legacy(uri: str, record: str, legacy_record: str) -> bool:
    """Whether the output at ``uri`` has the old layout: its record only under the old name, or, with neither
    record (an unfinished or hand-made output), split folders of the old layout and none of the new."""
    if storage.exists(storage.join(uri, record)):
        return False
    if storage.exists(storage.join(uri, legacy_record)):
        return True

    def has(legacy: bool) -> bool:
        return any(storage.is_dir(storage.join(uri, split_folder(s, legacy))) for s in SPLITS)

    return has(True) and not has(False)
