"""Cells that the docs build (nbdev's docs processing, `tools/build_docs.py`) would execute although they are tests.

To render `show_doc`, nbdev executes the export cells and every other cell that contains an import, the whole cell.
A cell with imports AND other code is therefore run at docs time (nbdev warns "Found cells containing imports and other
code"), and fails the build when it needs a variable of a cell that docs processing skipped. Put the imports in a
cell of their own (with the same `#| hide` etc.). Usage: python tools/check_docs_cells.py [NOTEBOOK ...] [--strict]
(no notebook: all of nbs/; --strict exits 1 when any cell is listed).
"""
import ast, json, re, sys
from pathlib import Path

root = Path(__file__).resolve().parents[1]
SHOWN = {'export', 'exports', 'exporti', 'exec_doc'}       # cells nbdev executes anyway


def directives(src: str) -> dict:
    "The `#| key: value` lines at the top of a cell."
    out = {}
    for line in src.splitlines():
        m = re.match(r'^#\s*\|\s*([\w-]+)\s*:?\s*(.*)$', line.strip())
        if not m: break
        out[m.group(1)] = m.group(2).strip()
    return out


def mixed_import_cells(nb_path: Path) -> list[tuple[int, str]]:
    "(cell index, first code line) of every non-export code cell with imports and other statements (not defs)."
    found = []
    for i, c in enumerate(json.loads(nb_path.read_text())['cells']):
        src = ''.join(c['source'])
        if c['cell_type'] != 'code' or 'nbdev_export()' in src: continue
        d = directives(src)
        if d.keys() & SHOWN or d.get('eval', '').lower() == 'false': continue
        code = '\n'.join('' if l.lstrip().startswith(('%', '!')) else l for l in src.splitlines())
        try: tree = ast.parse(code)
        except SyntaxError: continue
        imports = (ast.Import, ast.ImportFrom)
        harmless = (*imports, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)      # definitions only define
        if any(isinstance(n, imports) for n in ast.walk(tree)) and any(not isinstance(t, harmless) for t in tree.body):
            first = next((l for l in src.splitlines() if l.strip() and not re.match(r'#\s*\|', l)), '')
            found.append((i, first[:90]))
    return found


def main(argv):
    strict = '--strict' in argv
    paths = [Path(a) for a in argv if not a.startswith('--')] or sorted(
        q for q in (root / 'nbs').rglob('*.ipynb') if '.ipynb_checkpoints' not in q.parts)
    bad = [(p, i, line) for p in paths for i, line in mixed_import_cells(p)]
    for p, i, line in bad: print(f'{p.name} cell {i}: imports and other code: {line}')
    print(f'docs cells: {len(bad)} cells with imports and other code in {len({p for p, _, _ in bad})} notebooks'
          + ('' if not bad else ' (put the imports in a cell of their own)'))
    return 1 if strict and bad else 0


if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))
