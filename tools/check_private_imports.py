"""No private name crosses a module boundary: report every `_name` imported from another library module.

Every module `adadiff_nb/**/*.py` (except the generated `_modidx.py`) is parsed; an import of a name starting with `_`
(dunders such as `__version__` aside) from another library module fails: `from .x import _name`,
`from adadiff_nb.x import _name`, and `from . import _x` / `from adadiff_nb import _x` (a private module).
Give the name a public spelling (and a docstring) in the module that defines it, and import that instead.
Usage: python tools/check_private_imports.py [LIB_DIR] [--strict] (--strict exits 1 when anything is listed).
"""
import ast, sys
from pathlib import Path

LIB = 'adadiff_nb'
root = Path(__file__).resolve().parents[1]
SKIP = {'_modidx.py', '__init__.py'}


def _private(name: str) -> bool:
    "A private name: one leading underscore, not a dunder."
    return name.startswith('_') and not (name.startswith('__') and name.endswith('__'))


def _source_module(node: ast.ImportFrom, package: list[str]) -> str | None:
    "The library module an ImportFrom reads from ('' for the package itself), or None if not the library."
    if node.level:
        base = package[:len(package) - node.level + 1]
        return '.'.join(base + ([node.module] if node.module else []))
    if node.module and (node.module == LIB or node.module.startswith(LIB + '.')):
        return node.module[len(LIB) + 1:]
    return None


def private_imports(path: Path, lib: Path) -> list[tuple[int, str, str]]:
    "(line, source module, name) of every private name that `path` imports from another library module."
    package, out = list(path.relative_to(lib).parent.parts), []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if not isinstance(node, ast.ImportFrom): continue
        src = _source_module(node, package)
        if src is None: continue
        out += [(node.lineno, src or LIB, a.name) for a in node.names if _private(a.name)]
    return out


def main(argv: list[str]) -> int:
    strict = '--strict' in argv
    args = [a for a in argv if a != '--strict']
    lib = Path(args[0]) if args else root / LIB
    found = [(p, *hit) for p in sorted(lib.rglob('*.py')) if p.name not in SKIP
             for hit in private_imports(p, lib)]
    for path, line, src, name in found:
        print(f'{path.relative_to(lib.parent)}:{line}: imports private {name!r} from {src}')
    if found: print(f"{len(found)} private cross-module import(s): give each a public name where it is defined")
    else: print('check_private_imports: no private cross-module imports')
    return 1 if found and strict else 0


if __name__ == '__main__': sys.exit(main(sys.argv[1:]))
