"""Notebook order is import order: report every import of a library module exported by a LATER-numbered notebook.

Every code cell of every notebook in nbs/ is parsed (export cells, test cells and imports inside functions alike).
A module belongs to the notebook whose `#| default_exp` names it; notebooks are ordered by file name (index.ipynb
is ignored). Recognised imports: `from .x import ...`, `from . import x`, `from adadiff_nb.x import ...`,
`import adadiff_nb.x`, `from adadiff_nb import x` (when x is a module) and `importlib.import_module('adadiff_nb.x')`.
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


def _module_of(name: str | None, level: int) -> list[str]:
    "Library modules (without the package prefix) named by an import of `name` at relative `level`."
    if level == 1: return [name.split('.')[0]] if name else []
    if name and (name == LIB or name.startswith(LIB + '.')):
        rest = name[len(LIB) + 1:]
        return [rest.split('.')[0]] if rest else []
    return []


_LINE_IMPORT = re.compile(r'^\s*(?:from\s+(?:\.|adadiff_nb\.)(\w+)\s+import|import\s+adadiff_nb\.(\w+))', re.M)

def imports_in(src: str, known: set) -> list[tuple[int, str]]:
    "(line, module) for every import of a library module in `src` (line by line if the cell does not parse)."
    tree = _parse(src)
    if tree is None:
        return [(src.count('\n', 0, m.start()) + 1, m.group(1) or m.group(2)) for m in _LINE_IMPORT.finditer(src)
                if (m.group(1) or m.group(2)) in known]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            mods = _module_of(node.module, node.level)
            if (node.level == 1 and not node.module) or node.module == LIB:   # from . / adadiff_nb import x
                mods = [a.name for a in node.names if a.name in known]
            out += [(node.lineno, m) for m in mods]
        elif isinstance(node, ast.Import):
            out += [(node.lineno, m) for a in node.names for m in _module_of(a.name, 0)]
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)
              and getattr(node.func, 'attr', getattr(node.func, 'id', None)) == 'import_module'):
            out += [(node.lineno, m) for m in _module_of(node.args[0].value, 0)]
    return [(line, m) for line, m in out if m in known]


def check(nbs_dir: Path) -> tuple[list[str], int, int]:
    "(violations as text lines, number of notebooks, number of library imports checked)."
    nbs = sorted(p for p in nbs_dir.glob('*.ipynb') if p.name != 'index.ipynb')
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
                    problems.append(f"{nb.name} cell {cell} line {line}: imports adadiff_nb.{mod}, exported by the "
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
