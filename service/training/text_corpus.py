"""The byte-level text corpus: a fixed set of the Python standard library's own source files.

Available offline wherever Python is, and real code rather than synthetic text. The file list
is pinned here (not globbed) so the corpus is the same set of modules on every machine; the
bytes still depend on the interpreter's version, so the data description records the version
and a digest of every byte. Split into train and validation by whole files, so validation
measures generalisation to modules the model never saw.
"""

from __future__ import annotations

import hashlib
import math
import platform
import sysconfig
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from service.errors import FailedPrecondition

# Large, pure-Python modules present from CPython 3.11 on (none is on 3.13's removal list).
STDLIB_FILES: tuple[str, ...] = (
    "argparse.py", "ast.py", "bdb.py", "calendar.py", "cmd.py", "code.py", "codecs.py",
    "collections/__init__.py", "configparser.py", "contextlib.py", "copy.py", "csv.py",
    "dataclasses.py", "datetime.py", "difflib.py", "dis.py", "doctest.py", "enum.py",
    "filecmp.py", "fnmatch.py", "fractions.py", "ftplib.py", "functools.py", "getopt.py",
    "gettext.py", "glob.py", "gzip.py", "hashlib.py", "heapq.py", "hmac.py", "imaplib.py",
    "inspect.py", "ipaddress.py", "json/decoder.py", "json/encoder.py", "locale.py",
    "logging/__init__.py", "logging/handlers.py", "lzma.py", "mailbox.py", "mimetypes.py",
    "netrc.py", "ntpath.py", "numbers.py", "operator.py", "optparse.py", "pdb.py", "pickle.py",
    "pickletools.py", "platform.py", "plistlib.py", "poplib.py", "posixpath.py", "pprint.py",
    "pstats.py", "pydoc.py", "queue.py", "quopri.py", "random.py", "reprlib.py",
    "rlcompleter.py", "sched.py", "secrets.py", "selectors.py", "shlex.py", "shutil.py",
    "smtplib.py", "socket.py", "socketserver.py", "ssl.py", "statistics.py", "string.py",
    "subprocess.py", "symtable.py", "tabnanny.py", "tarfile.py", "tempfile.py", "textwrap.py",
    "threading.py", "timeit.py", "tokenize.py", "trace.py", "traceback.py", "types.py",
    "typing.py", "urllib/parse.py", "urllib/request.py", "uuid.py", "warnings.py", "wave.py",
    "weakref.py", "zipapp.py",
)  # fmt: skip

# Every VALIDATION_EVERY-th file of the sorted list is held out (about 10% of the files).
VALIDATION_EVERY = 10


@dataclass(frozen=True)
class TextCorpus:
    train: np.ndarray  # [N_train] uint8: training files concatenated in sorted order
    validation: np.ndarray  # [N_val] uint8: held-out files concatenated in sorted order
    train_files: tuple[str, ...]
    validation_files: tuple[str, ...]
    root: Path
    sha256: str  # digest of train bytes then validation bytes

    def describe(self) -> str:
        """The data set in words, precise enough to rebuild it byte for byte."""
        return (
            f"Python {platform.python_version()} standard library source ({self.root}): "
            f"{len(self.train_files) + len(self.validation_files)} files pinned in "
            f"service/training/text_corpus.py STDLIB_FILES, read as raw bytes and concatenated "
            f"in sorted order; split by file, every {VALIDATION_EVERY}th sorted file held out "
            f"for validation ({', '.join(self.validation_files)}); "
            f"train {self.train.size} bytes, validation {self.validation.size} bytes; "
            f"sha256 {self.sha256}"
        )


def split_by_file(
    files: Sequence[str], every: int = VALIDATION_EVERY
) -> tuple[list[str], list[str]]:
    """Sorted files → (train, validation): position k of the sorted list is held out when
    k % every == every - 1. Depends only on the names, so it is the same on every run."""
    ordered = sorted(files)
    validation = [f for k, f in enumerate(ordered) if k % every == every - 1]
    train = [f for k, f in enumerate(ordered) if k % every != every - 1]
    return train, validation


def load_text_corpus(root: Path | None = None, files: Sequence[str] = STDLIB_FILES) -> TextCorpus:
    """Read `files` (relative to `root`, default the running interpreter's stdlib dir)."""
    root = Path(sysconfig.get_paths()["stdlib"]) if root is None else root
    train_files, validation_files = split_by_file(files)
    if not train_files or not validation_files:
        raise FailedPrecondition(
            f"need at least {VALIDATION_EVERY} files to split, got {len(files)}"
        )
    digest = hashlib.sha256()

    def read(names: list[str]) -> np.ndarray:
        parts = []
        for name in names:
            path = root / name
            if not path.is_file():
                raise FailedPrecondition(f"corpus file {path} is missing (needs CPython 3.11+)")
            data = path.read_bytes()
            digest.update(data)
            parts.append(np.frombuffer(data, dtype=np.uint8))
        return np.concatenate(parts)

    train = read(train_files)
    validation = read(validation_files)
    return TextCorpus(
        train=train,
        validation=validation,
        train_files=tuple(train_files),
        validation_files=tuple(validation_files),
        root=root,
        sha256=digest.hexdigest(),
    )


def unigram_bits_per_byte(train: np.ndarray, validation: np.ndarray) -> float:
    """Cross-entropy (bits/byte) on `validation` of the train set's byte frequencies, with
    add-one smoothing so a byte unseen in training costs a finite amount."""
    counts = np.bincount(train, minlength=256).astype(np.float64) + 1.0
    log2_p = np.log2(counts / counts.sum())  # [256]
    return float(-log2_p[validation].mean())


def nats_to_bits(nats: float) -> float:
    return nats / math.log(2)
