"""Reproduce minilars/resources/botchan.txt from the sentencepiece 0.2.3 sdist.

sentencepiece's source distribution ships `test/botchan.txt`, the Project Gutenberg
eBook #8868 (Botchan, by Natsume Soseki, translated by Yasotaro Morri; public domain).
This script downloads the sdist with pip (download only, nothing is built or installed),
takes that member and strips the Project Gutenberg header and footer.

    python scripts/extract_botchan.py [--sdist sentencepiece-0.2.3.tar.gz]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "minilars" / "resources" / "botchan.txt"
MEMBER = "sentencepiece-0.2.3/test/botchan.txt"
START_MARK = "*** START OF THIS PROJECT GUTENBERG EBOOK"
END_MARK = "End of Project Gutenberg's Botchan"


def strip_gutenberg(text: str) -> str:
    """The book only: after the START line (and its 'Produced by' credit), before the END."""
    lines = text.lstrip("\ufeff").splitlines()
    try:
        start = next(i for i, line in enumerate(lines) if line.startswith(START_MARK)) + 1
        end = next(i for i, line in enumerate(lines) if line.startswith(END_MARK))
    except StopIteration:
        raise ValueError("botchan.txt: Project Gutenberg START/END markers not found") from None
    body = lines[start:end]
    if body and body[0].startswith("Produced by"):
        body = body[1:]
    return "\n".join(body).strip() + "\n"


def download_sdist(dest: str) -> Path:
    """pip download the sdist (no deps, no wheel); returns its path."""
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps",
                    "--no-binary=:all:", "sentencepiece==0.2.3", "-d", dest], check=True)
    return Path(dest) / "sentencepiece-0.2.3.tar.gz"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sdist", default=None, help="an already downloaded sdist")
    parser.add_argument("--out", default=str(OUT))
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        sdist = Path(args.sdist) if args.sdist else download_sdist(tmp)
        with tarfile.open(sdist) as tar:
            raw = tar.extractfile(MEMBER)
            if raw is None:
                raise SystemExit(f"{sdist}: member {MEMBER} not found")
            text = raw.read().decode("utf-8")
    sys.path.insert(0, str(REPO))
    from minilars.io.atomic import write_bytes
    book = strip_gutenberg(text)
    write_bytes(args.out, book.encode("utf-8"))
    print(f"{args.out}: {len(book)} characters, {book.count(chr(10))} lines", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
