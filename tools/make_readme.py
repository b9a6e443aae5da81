"""Generate README.md from nbs/index.ipynb (nbdev's `nbdev-readme` needs Quarto, which these machines cannot install).

Executes the notebook in memory (its outputs are small), then writes markdown cells verbatim, code cells as
```python blocks (cells starting with `#| hide` are skipped) and their text outputs as plain blocks.
Usage: python tools/make_readme.py [--check]   (--check: exit 1 if README.md is out of date)
"""
import sys, re
from pathlib import Path
import nbformat
from nbclient import NotebookClient

root = Path(__file__).resolve().parent.parent


def render(nb_path=root / 'nbs' / 'index.ipynb') -> str:
    nb = nbformat.read(nb_path, as_version=4)
    NotebookClient(
        nb, timeout=300, kernel_name='python3', resources={'metadata': {'path': str(nb_path.parent)}}
    ).execute()
    out = []
    for c in nb.cells:
        src = c.source.strip()
        if c.cell_type == 'markdown':
            src = re.sub(r'^> (.*)$', r'> \1', src, flags=re.M)
            out.append(src.replace('](images/', '](nbs/images/'))     # README sits at the root, the notebook in nbs/
        elif c.cell_type == 'code':
            if src.startswith('#| hide') or src.startswith('#|hide') or not src: continue
            lines = [l for l in src.splitlines() if not l.startswith('#|')]
            out.append('```python\n' + '\n'.join(lines) + '\n```')
            texts = []
            for o in c.get('outputs', []):
                if o.output_type == 'stream' and o.get('name') == 'stdout':texts.append(o.text.rstrip())
                elif 'data' in o and 'text/plain' in o['data']: texts.append(o['data']['text/plain'].rstrip())
            if texts: out.append('    ' + '\n'.join(texts).replace('\n', '\n    '))
    head = '<!-- Generated from nbs/index.ipynb by tools/make_readme.py: edit the notebook, not this file. -->\n\n'
    return head + '\n\n'.join(out) + '\n'


if __name__ == '__main__':
    text = render()
    readme = root / 'README.md'
    if '--check' in sys.argv:
        if not readme.exists() or readme.read_text() != text:
            print('README.md is out of date: run `python tools/make_readme.py`')
            sys.exit(1)
        print('README.md is up to date')
    else:
        readme.write_text(text)
        print(f'wrote {readme}')
