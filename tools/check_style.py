"""House-style report for the notebooks (and the exported library): ';'-joined statements, lines over 120
characters, export cells that are too long or hold many definitions, test cells far from what they test, and
functions over 80 lines in `adadiff_nb/`; the scripts in tests/, tools/ and bench/ are held to the same `;` and
line-length limits. Usage: python tools/check_style.py [NOTEBOOK ...] [--strict]
(no notebook: all of nbs/). --strict exits 1 when a hard limit is broken (';', > 120 characters, a function over
80 lines)."""
import ast, io, json, statistics, sys, tokenize
from pathlib import Path

root = Path(__file__).resolve().parents[1]

def semicolons(src: str) -> list[int]:
    "Line numbers of ';' statement separators in `src` (not those inside strings or comments)."
    try: toks = list(tokenize.generate_tokens(io.StringIO(src).readline))
    except (tokenize.TokenError, IndentationError, SyntaxError): return []
    return [t.start[0] for t in toks if t.type == tokenize.OP and t.string == ';']

def n_defs(src: str) -> int:
    "Top-level function and class definitions in `src`."
    try: tree = ast.parse(src)
    except SyntaxError: return 0
    return sum(isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) for n in tree.body)

def long_functions(path: Path, limit: int = 80) -> list[tuple[int, str]]:
    "(length, name) of every function in the module at `path` longer than `limit` lines."
    tree = ast.parse(path.read_text())
    return sorted(((n.end_lineno - n.lineno + 1, n.name) for n in ast.walk(tree)
                   if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.end_lineno - n.lineno + 1 > limit),
                  reverse=True)

def notebook_report(nb_path: Path) -> dict:
    "Style counts of one notebook."
    cells = json.loads(nb_path.read_text())['cells']
    code = [(i, ''.join(c['source'])) for i, c in enumerate(cells) if c['cell_type'] == 'code']
    export = [(i, s) for i, s in code if s.lstrip().startswith(('#| export', '#|export'))]
    last_export = max((i for i, _ in export), default=-1)
    tests = [(i, s) for i, s in code if (i, s) not in export and not s.lstrip().startswith('#| default_exp')]
    sizes = [len(s.splitlines()) for _, s in export]
    semi = sum(len(semicolons(s)) for _, s in code)
    long_ = sum(len(l) > 120 for _, s in code for l in s.splitlines())
    return dict(
        export_cells=len(export),
        median_export_lines=statistics.median(sizes) if sizes else 0,
        export_cells_over_50=sum(n > 50 for n in sizes),
        export_cells_5_defs=sum(n_defs(s) >= 5 for _, s in export),
        tests_after_last_export=sum(i > last_export for i, _ in tests) if export else 0,
        test_cells=len(tests),
        semicolons=semi,
        long_lines=long_,
    )

def main(argv=None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    strict = '--strict' in args
    nbs = [Path(a) for a in args if a != '--strict'] or sorted(
        q for q in (root / 'nbs').rglob('*.ipynb') if '.ipynb_checkpoints' not in q.parts)
    bad = 0
    for nb in nbs:
        r = notebook_report(nb)
        bad += r['semicolons'] + r['long_lines']
        print(f"{nb.name:32s} " + ' '.join(f'{k}={v}' for k, v in r.items()))
    for p in sorted(f for d in ('tests', 'tools', 'bench') for f in (root / d).glob('*.py')):
        src = p.read_text()
        n_semi, n_long = len(semicolons(src)), sum(len(l) > 120 for l in src.splitlines())
        if n_semi or n_long:
            print(f"{p.relative_to(root)}: semicolons={n_semi} long_lines={n_long}")
        bad += n_semi + n_long
    longf = [(n, name, p.name) for p in sorted((root / 'adadiff_nb').rglob('*.py')) if p.name != '_modidx.py'
             for n, name in long_functions(p)]
    for n, name, f in longf: print(f"function over 80 lines: {f}:{name} ({n} lines)")
    bad += len(longf)
    if strict and bad:
        print(f"style: {bad} hard-limit problems (';' statements, lines over 120 characters, functions over 80 lines)")
        return 1
    return 0

if __name__ == '__main__': sys.exit(main())
