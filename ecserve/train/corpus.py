"""The training corpus: the running interpreter's standard-library Python source (PSF-2.0).

Offline and on every machine: the `.py` files under `sysconfig`'s stdlib directory, without
site-packages and without the few files that are not UTF-8 (they test source encodings). The
split into training and validation is by whole file and deterministic: a file is held out when
the SHA-256 of its relative path falls in the first `valid_per_mille` of 1000, so the split does
not depend on the file order or on which other files exist. The corpus is named by its Python
version and the SHA-256 of each split's canonical form, so a rerun can tell whether it trains
on the same bytes.
"""

from __future__ import annotations

import hashlib
import json
import platform
import sys
import sysconfig
from dataclasses import asdict, dataclass
from pathlib import Path

MANIFEST = "manifest.json"
SPLITS = ("train", "valid")
EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})


@dataclass(frozen=True)
class Document:
    path: str  # relative to the stdlib directory, '/'-separated
    text: str


@dataclass(frozen=True)
class CorpusManifest:
    """What a corpus directory holds: enough to tell whether two corpora are the same."""

    source: str  # what the text is
    licence: str
    python: str  # the interpreter whose stdlib it is (version and implementation)
    stdlib: str  # the directory it was read from
    valid_per_mille: int  # the share of files held out for validation, in 1/1000
    files: dict[str, int]  # split -> files
    bytes: dict[str, int]  # split -> UTF-8 bytes of text
    sha256: dict[str, str]  # split -> SHA-256 of the split file
    skipped: list[str]  # files left out because they are not UTF-8

    def describe(self) -> str:
        return "\n".join(
            f"{s}: {self.files[s]} files, {self.bytes[s] / 1e6:.2f} MB, sha256 {self.sha256[s]}"
            for s in SPLITS)


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def is_validation(path: str, valid_per_mille: int) -> bool:
    digest = hashlib.sha256(path.encode()).digest()
    return int.from_bytes(digest[:4], "big") % 1000 < valid_per_mille


def read_stdlib(root: Path) -> tuple[list[Document], list[str]]:
    """Every UTF-8 `.py` file under root (sorted by path), and the paths skipped as not UTF-8."""
    docs, skipped = [], []
    for p in sorted(root.rglob("*.py")):
        rel = p.relative_to(root)
        if EXCLUDED_DIRS & set(rel.parts) or not p.is_file():
            continue
        try:
            text = p.read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            skipped.append(rel.as_posix())
            continue
        docs.append(Document(rel.as_posix(), text))
    return docs, skipped


def split_documents(docs: list[Document], split: str, valid_per_mille: int) -> list[Document]:
    want_valid = split == "valid"
    return [d for d in docs if is_validation(d.path, valid_per_mille) == want_valid]


def split_path(corpus_dir: Path, split: str) -> Path:
    return corpus_dir / f"{split}.jsonl"


def write_corpus(out: Path, root: Path | None = None, valid_per_mille: int = 30
                 ) -> CorpusManifest:
    """Extract the corpus into `out`: {train,valid}.jsonl (one {"path", "text"} per line, by
    path) and manifest.json."""
    root = root or stdlib_dir()
    docs, skipped = read_stdlib(root)
    if not docs:
        raise FileNotFoundError(f"{root}: no Python source files (is this the stdlib?)")
    out.mkdir(parents=True, exist_ok=True)
    files, nbytes, sha = {}, {}, {}
    for split in SPLITS:
        chosen = split_documents(docs, split, valid_per_mille)
        data = "".join(json.dumps(asdict(d), ensure_ascii=False) + "\n" for d in chosen)
        raw = data.encode()
        split_path(out, split).write_bytes(raw)
        files[split] = len(chosen)
        nbytes[split] = sum(len(d.text.encode()) for d in chosen)
        sha[split] = hashlib.sha256(raw).hexdigest()
    stdlib = root.resolve() == stdlib_dir().resolve()
    manifest = CorpusManifest(
        source=("The .py files of CPython's standard library (Lib/), site-packages excluded"
                if stdlib else f"The .py files under {root}"),
        licence=("PSF-2.0 (Python Software Foundation License Version 2)" if stdlib
                 else "that of the files"),
        python=f"{platform.python_implementation()} {platform.python_version()}",
        stdlib=str(root), valid_per_mille=valid_per_mille, files=files, bytes=nbytes,
        sha256=sha, skipped=skipped,
    )
    (out / MANIFEST).write_text(json.dumps(asdict(manifest), indent=2) + "\n")
    return manifest


def read_manifest(corpus_dir: Path) -> CorpusManifest:
    return CorpusManifest(**json.loads((corpus_dir / MANIFEST).read_text()))


def read_split(corpus_dir: Path, split: str) -> list[Document]:
    with split_path(corpus_dir, split).open(encoding="utf-8") as f:
        return [Document(**json.loads(line)) for line in f]


def main(argv: list[str] | None = None) -> int:
    """`python -m ecserve.train.corpus OUT`: extract the corpus and print its manifest."""
    import argparse

    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("out", type=Path)
    p.add_argument("--valid-per-mille", type=int, default=30)
    args = p.parse_args(argv)
    m = write_corpus(args.out, valid_per_mille=args.valid_per_mille)
    print(f"{m.python}, {m.stdlib}\n{m.describe()}\nskipped (not UTF-8): {len(m.skipped)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
