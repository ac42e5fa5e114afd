"""Render each tutorial as a Markdown page: its code and its printed output, cell by cell.

    python tutorials/render.py                           every tutorial -> tutorials/NN_name.md
    python tutorials/render.py 02_where_memory_goes.py   just that one
    python tutorials/render.py --out DIR [NAME ...]      write the pages to DIR (the tests do)

A tutorial is a plain script, tutorials/NN_name.py, split into cells by `# %% N. Title ---`
lines. Its cells run in order in one namespace, as `python tutorials/NN_name.py` would run
them from the repository root: the same working directory, `__file__`, `__name__ ==
"__main__"`, sys.argv and sys.path[0]. Each cell's stdout is captured at file descriptor 1,
so output from C code is caught too; stderr goes to the terminal. The page is rendered at
full size: it refuses to overwrite the committed pages when MINILARS_FAST=1 is set.

The page: the module docstring (first line as the title), then per cell its title as a
heading, the comment lines that open it as prose, its code in a ```python block and its
output in a plain ``` block (none when it prints nothing). Code before the first cell
(imports, settings) is shown the same way, without a heading.
"""
import ast
import builtins
import ctypes
import os
import re
import sys
import tempfile
import types

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
TUTORIAL = re.compile(r"\d\d_\w+\.py")
MARK = re.compile(r"# %%(?P<title>.*?)[\s-]*")


def tutorial_names() -> list[str]:
    """The tutorials, by the NN_name.py pattern (so render.py itself is not one)."""
    return sorted(f for f in os.listdir(HERE) if TUTORIAL.fullmatch(f))


def split_cells(source: str) -> tuple[str, list[dict]]:
    """(docstring, cells) of a tutorial. Each cell: title ("" for the code before the first
    `# %%` line), prose, code (for the page), and run (its full text) with start (its first
    line, 1-based, for tracebacks). The first cell's run text includes the docstring."""
    tree = ast.parse(source)
    doc = ast.get_docstring(tree) or ""
    body_start = tree.body[0].end_lineno if doc else 0
    lines = source.splitlines(keepends=True)
    marks = [i for i, line in enumerate(lines) if MARK.fullmatch(line.rstrip("\n"))]
    bounds = [0] + marks + [len(lines)]
    cells = []
    for k, (a, b) in enumerate(zip(bounds, bounds[1:])):
        if k == 0:
            title, body, start = "", lines[body_start:b], 1
        else:
            title = MARK.fullmatch(lines[a].rstrip("\n"))["title"].strip()
            body, start = lines[a + 1:b], a + 2
        prose = []
        if k > 0:
            while body and body[0].lstrip().startswith("#"):
                prose.append(re.sub(r"^\s*# ?", "", body.pop(0)).rstrip())
        code = "".join(body).strip("\n")
        run = "".join(lines[a:b]) if k == 0 else "".join(lines[a + 1:b])
        cells.append({"title": title, "prose": "\n".join(prose), "code": code,
                      "run": run, "start": start})
    return doc, cells


def run_cells(path: str, cells: list[dict]) -> list[str]:
    """Run the cells of the tutorial at `path` in order in one fresh __main__ namespace, from
    the repository root; return each cell's captured stdout."""
    path = os.path.abspath(path)
    module = types.ModuleType("__main__")
    module.__file__ = path
    module.__builtins__ = builtins
    saved = sys.modules["__main__"], list(sys.argv), sys.path[0], os.getcwd()
    sys.modules["__main__"], sys.argv, sys.path[0] = module, [os.path.relpath(path, ROOT)], \
        os.path.dirname(path)
    os.chdir(ROOT)
    outputs = []
    try:
        for cell in cells:
            code = compile("\n" * (cell["start"] - 1) + cell["run"], path, "exec")
            outputs.append(_captured(code, module.__dict__, cell, path))
    finally:
        sys.modules["__main__"], sys.argv, sys.path[0] = saved[:3]
        os.chdir(saved[3])
    return outputs


def _captured(code, namespace: dict, cell: dict, path: str) -> str:
    """Run one cell with file descriptor 1 pointed at a temporary file; return what it wrote."""
    _flush()
    with tempfile.TemporaryFile() as tmp:
        fd = os.dup(1)
        os.dup2(tmp.fileno(), 1)
        try:
            exec(code, namespace)
        except BaseException:
            _flush()
            os.dup2(fd, 1)
            tmp.seek(0)
            sys.stderr.write(tmp.read().decode(errors="replace"))
            sys.stderr.write(f"render.py: {os.path.basename(path)}, cell "
                             f"{cell['title'] or '(setup)'!r} failed:\n")
            raise
        finally:
            _flush()
            os.dup2(fd, 1)
            os.close(fd)
        tmp.seek(0)
        return tmp.read().decode()


def _flush():
    """Flush Python's stdout and C's stdio buffers, so each cell's output lands in its own file."""
    sys.stdout.flush()
    try:
        ctypes.CDLL(None).fflush(None)
    except (OSError, AttributeError):
        pass


def _fence(text: str, info: str = "") -> str:
    ticks = "`" * max([3] + [len(m) + 1 for m in re.findall(r"`{3,}", text)])
    return f"{ticks}{info}\n{text}\n{ticks}\n"


def render_page(name: str, doc: str, cells: list[dict], outputs: list[str] | None) -> str:
    """The Markdown page; with outputs=None, the page without its output blocks."""
    title, _, intro = doc.partition("\n")
    parts = [f"*Generated by `python tutorials/render.py {name}` from [{name}]({name}), "
             f"with the output of a full-size run. Run it yourself: `python tutorials/{name}`.*\n",
             f"# {title.strip()}\n"]
    if intro.strip():
        parts.append(intro.strip("\n") + "\n")
    for i, cell in enumerate(cells):
        if cell["title"]:
            parts.append(f"## {cell['title']}\n")
        if cell["prose"]:
            parts.append(cell["prose"].strip("\n") + "\n")
        if cell["code"]:
            parts.append(_fence(cell["code"], "python"))
        out = outputs[i].rstrip() if outputs else ""
        if out:
            parts.append(_fence(out))
    return "\n".join(parts).rstrip("\n") + "\n"


def without_outputs(page: str) -> str:
    """A page with its output blocks (fences with no info string) and the blank line after
    each removed: what the tests compare exactly with render_page(..., outputs=None)."""
    lines, kept, i = page.split("\n"), [], 0
    while i < len(lines):
        m = re.fullmatch(r"(`{3,})(\w*)", lines[i])
        if not m:
            kept.append(lines[i])
            i += 1
            continue
        j = lines.index(m[1], i + 1)                # the closing fence
        if m[2]:
            kept.extend(lines[i:j + 1])
        elif j + 1 < len(lines) and lines[j + 1] == "":
            j += 1
        i = j + 1
    return "\n".join(kept).rstrip("\n") + "\n"


def render(name: str, out_dir: str = HERE) -> str:
    """Run tutorial `name` and write its page to out_dir/NN_name.md; return the page's path."""
    path = os.path.join(HERE, name)
    with open(path) as f:
        doc, cells = split_cells(f.read())
    page = render_page(name, doc, cells, run_cells(path, cells))
    target = os.path.join(out_dir, name[:-3] + ".md")
    with open(target, "w") as f:
        f.write(page)
    return target


def main(argv: list[str]) -> int:
    out_dir = HERE
    if argv[:1] == ["--out"]:
        out_dir, argv = argv[1], argv[2:]
    names = [os.path.basename(a) for a in argv] or tutorial_names()
    unknown = [n for n in names if n not in tutorial_names()]
    if unknown:
        print(f"render.py: no tutorial {', '.join(unknown)}; tutorials: {', '.join(tutorial_names())}",
              file=sys.stderr)
        return 2
    if os.environ.get("MINILARS_FAST") == "1" and os.path.samefile(out_dir, HERE):
        print("render.py: the committed pages show full-size runs; unset MINILARS_FAST "
              "(or write elsewhere with --out DIR)", file=sys.stderr)
        return 2
    for name in names:
        print(f"rendering {name} ...", file=sys.stderr, flush=True)
        print(os.path.relpath(render(name, out_dir)), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
