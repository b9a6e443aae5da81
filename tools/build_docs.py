"""Build the documentation site into `_docs/`, offline: nbdev's docs pipeline, rendered by Quarto when it is there
and by smalldocs when it is not.

`nbdev-docs` prepares the notebooks (`nbs/nbdev.yml` and `nbs/sidebar.yml` from `pyproject.toml`, then `proc_nbs`:
`#| hide` cells dropped, `show_doc` of every exported name rendered from the code, test cells not executed) and runs
`quarto render`. Quarto is one binary that pip cannot install offline (the `quarto-cli` package is a source package
whose build downloads it), so without a `quarto` on PATH (or in this venv's bin/) this script runs the same
preparation and renders the site with smalldocs, which reads the same `nbs/_quarto.yml` in pure Python
(`pip install -e ".[docs]"`). With `quarto` it runs `nbdev-docs` itself.

Usage: python tools/build_docs.py [--workers N] [--renderer auto|quarto|smalldocs]
"""
import argparse, json, os, re, shutil, subprocess, sys, time
from pathlib import Path

root = Path(__file__).resolve().parent.parent
venv_bin = Path(sys.executable).parent


def fail(msg):
    sys.exit(f'build_docs: {msg}')


def quarto_path():
    "The quarto binary on PATH or beside this Python (quarto-cli installs its `quarto` script there), or None"
    return shutil.which('quarto') or shutil.which('quarto', path=str(venv_bin))


def prepare(workers: int) -> Path:
    "nbdev-docs' preparation without Quarto: the yml files in nbs/, the sidebar, the processed notebooks in _proc/"
    try:
        from nbdev.config import get_config
        from nbdev.quarto import refresh_quarto_yml, nbdev_sidebar
        from nbdev.serve import proc_nbs
    except ImportError:
        fail('nbdev is not installed: pip install -e ".[docs]"')
    os.chdir(root)
    cfg = get_config()
    refresh_quarto_yml()
    nbdev_sidebar.__wrapped__(path=cfg.nbs_path)
    return proc_nbs(cfg.nbs_path, n_workers=workers)


def output_names(cache: Path) -> dict:
    """{'models/02a_default_model.html': 'models/default_model.html', ...}: the page names nbdev gives in each
    notebook's front matter (notebooks in folders keep their folder)"""
    names = {}
    for nb in cache.rglob('*.ipynb'):
        cells = json.loads(nb.read_text()).get('cells', [])
        fm = ''.join(cells[0]['source']) if cells and cells[0]['cell_type'] == 'raw' else ''
        m = re.search(r'^output-file:\s*(\S+)\s*$', fm, re.M)
        rel = nb.relative_to(cache).with_suffix('.html')
        if m and m.group(1) != rel.name: names[str(rel)] = str(rel.parent / m.group(1))
    return names


def link_locally(out: Path, names: dict, site_url: str):
    """Make the site work from a folder: nbdev's links to `site_url` (API names in backticks) point into it, and every
    page also exists under the name nbdev gives it (`default_model.html` beside `02a_default_model.html`). A page in a
    folder (`exits/...`) gets links relative to its own depth."""
    prefix = site_url.rstrip('/') + '/'
    for page in out.rglob('*.html'):
        text = page.read_text()
        if prefix in text: page.write_text(text.replace(prefix, '../' * (len(page.relative_to(out).parts) - 1)))
    for src, dst in names.items():
        if (out / src).exists() and not (out / dst).exists(): shutil.copy2(out / src, out / dst)


def render_smalldocs(cache: Path, dest: Path):
    "Render the processed notebooks in `cache` with smalldocs into `dest` (built aside, then moved into place)"
    try:
        from smalldocs.site import build
    except ImportError:
        fail('smalldocs is not installed (Python >= 3.11): pip install -e ".[docs]"')
    from nbdev.config import get_config
    cfg = get_config()
    site = build(str(cache), quiet=True)
    out = Path(site.out)
    if not (out / 'index.html').exists(): fail(f'smalldocs wrote no index.html into {out}')
    link_locally(out, output_names(cache), f"{cfg.doc_host}{cfg.doc_baseurl}")
    tmp = dest.with_name(dest.name + '.tmp')
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.move(str(out), tmp)
    shutil.rmtree(dest, ignore_errors=True)
    os.replace(tmp, dest)
    return [w for w in site.warnings if 'output-file is not read' not in w]     # link_locally gives those names


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--workers', type=int, default=2, help='processes that prepare the notebooks (default 2)')
    p.add_argument('--renderer', choices=('auto', 'quarto', 'smalldocs'), default='auto',
                   help='auto (default): quarto when it is installed, else smalldocs')
    a = p.parse_args(argv)
    t0, quarto = time.time(), quarto_path()
    if a.renderer == 'quarto' and quarto is None:
        fail('--renderer quarto needs the quarto binary (https://quarto.org, or pip install -e ".[quarto]" where '
             'the network allows it); --renderer smalldocs works offline')
    if a.renderer == 'quarto' or (a.renderer == 'auto' and quarto):
        env = dict(os.environ, PATH=f"{Path(quarto).parent}{os.pathsep}{os.environ.get('PATH', '')}")
        subprocess.run([str(venv_bin / 'nbdev-docs'), '--n-workers', str(a.workers)], check=True, cwd=root, env=env)
        renderer = f'quarto ({quarto})'
    else:
        for w in render_smalldocs(prepare(a.workers), root / '_docs'): print(f'warning: {w}', file=sys.stderr)
        renderer = 'smalldocs'
    print(f'built {root / "_docs"} with {renderer} in {time.time() - t0:.0f} s')


if __name__ == '__main__':
    main()
