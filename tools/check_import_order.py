"""Notebook order is import order: report every import of a library module exported by a LATER-numbered notebook.

Every code cell of every notebook in nbs/ is parsed (export cells, test cells and imports inside functions alike).
A module belongs to the notebook whose `#| default_exp` names it (dotted: `exits.early_exit`); notebooks sit in
folders named after their subpackage and are ordered by file name across folders (index.ipynb is ignored).
Recognised imports: `from adadiff_nb.p.x import ...`, `import adadiff_nb.p.x`, `from adadiff_nb.p import x` (when x
is a module) and `importlib.import_module('adadiff_nb.p.x')`.
Usage: python tools/check_import_order.py [NBS_DIR]. Exit status 1 when a forward import is found."""
import ast, json, re, sys
from pathlib import Path

LIB = 'adadiff_nb'
root = Path(__file__).resolve().parents[1]
_DEFAULT_EXP = re.compile(r'^\s*#\s*\|\s*default_exp\s+(\S+)', re.M)
_TIMED = re.compile(r'^(\s*)%{1,2}(?:time|timeit|prun)\b[ \t]*(\S.*)?$', re.M)   # the statement after it counts
_MAGIC = re.compile(r'^(\s*)[%!].*$', re.M)


def code_cells(nb_path: Path) -> list[tuple[int, str]]:
    "(cell index, source) of the notebook's code cells."
    cells = json.loads(nb_path.read_text())['cells']
    return [(i, ''.join(c['source'])) for i, c in enumerate(cells) if c['cell_type'] == 'code']


def exported_module(nb_path: Path) -> str | None:
    "The module named by the notebook's `#| default_exp`, or None."
    for _, src in code_cells(nb_path):
        m = _DEFAULT_EXP.search(src)
        if m: return m.group(1)
    return None


def _parse(src: str):
    "AST of a cell, with IPython magics / shell lines blanked out; None if it still does not parse."
    src = _TIMED.sub(lambda m: m.group(1) + (m.group(2) or 'pass'), src)
    try: return ast.parse(_MAGIC.sub(r'\1pass', src))
    except SyntaxError: return None


def _lib_rest(name: str | None) -> str | None:
    "`exits.early_exit` for `adadiff_nb.exits.early_exit`, '' for the package, None outside the library."
    if name == LIB: return ''
    if name and name.startswith(LIB + '.'): return name[len(LIB) + 1:]
    return None


def _known(cands, known: set) -> list[str]:
    "The known modules among dotted candidates (each candidate, or its longest known prefix)."
    out = []
    for c in cands:
        parts = c.split('.')
        hit = next(('.'.join(parts[:i]) for i in range(len(parts), 0, -1) if '.'.join(parts[:i]) in known), None)
        if hit: out.append(hit)
    return out


_LINE_IMPORT = re.compile(r'^\s*(?:from\s+adadiff_nb\.([\w.]+)\s+import|import\s+adadiff_nb\.([\w.]+))', re.M)

def imports_in(src: str, known: set) -> list[tuple[int, str]]:
    "(line, module) for every import of a library module in `src` (line by line if the cell does not parse)."
    tree = _parse(src)
    if tree is None:
        return [(src.count('\n', 0, m.start()) + 1, k) for m in _LINE_IMPORT.finditer(src)
                for k in _known([m.group(1) or m.group(2)], known)]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and _lib_rest(node.module) is not None:
            rest = _lib_rest(node.module)
            cands = [f'{rest}.{a.name}' if rest else a.name for a in node.names] + ([rest] if rest else [])
            out += [(node.lineno, m) for m in dict.fromkeys(_known(cands, known))]
        elif isinstance(node, ast.Import):
            out += [(node.lineno, m) for a in node.names for m in _known([_lib_rest(a.name) or ''], known)]
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)
              and getattr(node.func, 'attr', getattr(node.func, 'id', None)) == 'import_module'):
            out += [(node.lineno, m) for m in _known([_lib_rest(node.args[0].value) or ''], known)]
    return out


def notebooks(nbs_dir: Path) -> list[Path]:
    "Every notebook under nbs/ (folders starting with `_` or `.` aside), in import order: by file name, across folders."
    found = [p for p in nbs_dir.rglob('*.ipynb') if p.name != 'index.ipynb'
             and not any(part.startswith(('_', '.')) for part in p.relative_to(nbs_dir).parts)]
    return sorted(found, key=lambda p: p.name)


def check(nbs_dir: Path) -> tuple[list[str], int, int]:
    "(violations as text lines, number of notebooks, number of library imports checked)."
    nbs = notebooks(nbs_dir)
    owner = {}
    for pos, nb in enumerate(nbs):
        mod = exported_module(nb)
        if mod is not None: owner.setdefault(mod, (pos, nb.name))
    known, problems, n_imports = set(owner), [], 0
    for pos, nb in enumerate(nbs):
        for cell, src in code_cells(nb):
            for line, mod in imports_in(src, known):
                n_imports += 1
                if owner[mod][0] > pos:
                    problems.append(f"{nb.relative_to(nbs_dir)} cell {cell} line {line}: imports adadiff_nb.{mod}, "
                                    f"exported by the "
                                    f"later notebook {owner[mod][1]}")
    return problems, len(nbs), n_imports


def main(argv=None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    nbs_dir = Path(args[0]) if args else root / 'nbs'
    problems, n_nbs, n_imports = check(nbs_dir)
    for p in problems: print(p)
    if problems:
        print(f"import order: {len(problems)} forward import(s) in {n_nbs} notebooks; a notebook may import only "
              "modules exported by earlier-numbered notebooks (or its own)")
        return 1
    print(f"import order OK: {n_nbs} notebooks, {n_imports} library imports, none from a later notebook")
    return 0


if __name__ == '__main__': sys.exit(main())
