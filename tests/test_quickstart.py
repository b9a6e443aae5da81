"""The README's Python quickstart, run as a reader would copy it: in a fresh interpreter, from another folder."""
import os, re, subprocess, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def quickstart() -> str:
    "The first ```python block of the README's '## Quickstart' section."
    readme = (ROOT / 'README.md').read_text()
    section = readme.split('\n## Quickstart\n', 1)
    assert len(section) == 2, "README.md has no '## Quickstart' section"
    m = re.search(r'```python\n(.*?)```', section[1].split('\n## ', 1)[0], re.S)
    assert m, "the README's Quickstart has no ```python block"
    return m.group(1)


def test_quickstart_is_five_lines():
    lines = [l for l in quickstart().splitlines() if l.strip()]
    assert len(lines) <= 5, f'the quickstart has {len(lines)} lines, not five'
    assert any('load_default(' in l for l in lines) and any('threshold=' in l for l in lines)


def test_quickstart_runs(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS='1', CUDA_VISIBLE_DEVICES='')
    res = subprocess.run([sys.executable, '-c', quickstart()], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    m = re.fullmatch(r'(\d+) images, layer ratio (\d\.\d{3}), \d+\.\d s', res.stdout.strip())
    assert m, f'unexpected quickstart output: {res.stdout!r}'
    assert int(m.group(1)) == 8
    assert 0.3 < float(m.group(2)) < 1.0, 'the default threshold should skip some, not all, block evaluations'
    quoted = re.search(r'It prints `\d+ images, layer ratio (\d\.\d{3})', (ROOT / 'README.md').read_text())
    assert quoted, 'the README does not quote what the quickstart prints'
    assert abs(float(quoted.group(1)) - float(m.group(2))) < 0.01, (quoted.group(1), m.group(2))
