"""Real-browser test of the main notebook: JupyterLab on localhost, headless Chromium (Debian package) driven by
Playwright, runs `nbs/03_exit_trends.ipynb`, moves the threshold slider and checks that the exit figure changed.
Saves screenshots to $ADADIFF_SCREENSHOT_DIR (default: a pytest tmp dir)."""
import os, re, shutil, socket, subprocess, sys, time, secrets
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which('chromium') or shutil.which('chromium-browser')
pw = pytest.importorskip('playwright.sync_api', reason='playwright is not installed (pip install -e ".[dev]")')

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason='Debian chromium is not installed (apt-get install chromium)')

CHROME_ARGS = [
    '--headless=new',
    '--no-sandbox',
    '--disable-gpu',
    '--disable-quic',
    '--no-first-run',
    '--disable-background-networking',
    '--disable-component-update',
    '--disable-sync',
    '--disable-dev-shm-usage',
]


def _free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


@pytest.fixture(scope='module')
def lab(tmp_path_factory):
    port, token = _free_port(), secrets.token_hex(16)
    home = tmp_path_factory.mktemp('jupyter_home')
    settings = home / 'settings' / '@jupyterlab' / 'apputils-extension'
    settings.mkdir(parents=True)
    (settings / 'notification.jupyterlab-settings').write_text('{"fetchNews": "false", "checkForUpdates": false}')
    env = dict(os.environ, JUPYTER_CONFIG_DIR=str(home / 'cfg'), JUPYTER_RUNTIME_DIR=str(home / 'rt'),
               JUPYTERLAB_WORKSPACES_DIR=str(home / 'ws'), JUPYTERLAB_SETTINGS_DIR=str(home / 'settings'),
               OMP_NUM_THREADS='1')
    log = open(home / 'lab.log', 'w')
    proc = subprocess.Popen(
        [
            sys.executable,
            '-m',
            'jupyter',
            'lab',
            '--no-browser',
            '--allow-root',
            '--ip=127.0.0.1',
            f'--port={port}',
            f'--IdentityProvider.token={token}',
            '--ServerApp.disable_check_xsrf=True',
            '--LabApp.news_url=',
            '--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate',
        ],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            with socket.create_connection(('127.0.0.1', port), timeout=1):
                break
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError(f'jupyter lab exited: {(home / "lab.log").read_text()[-2000:]}')
            time.sleep(0.5)
    else:
        proc.kill()
        raise RuntimeError('jupyter lab did not start within 120 s')
    yield f'http://127.0.0.1:{port}', token
    proc.terminate()
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


EXIT_Y = """() => {
  const plots = [...document.querySelectorAll('.jp-OutputArea .js-plotly-plot')]
      .filter(p => p.layout && p.layout.title && String(p.layout.title.text || '').startsWith('Exit layer per step'));
  if (!plots.length) return null;
  const tr = plots[0].data.find(d => d.name === 'mean exit layer');      // the first app: the default model's
  return tr ? {title: plots[0].layout.title.text, y: Array.from(tr.y)} : null;
}"""


def test_exit_trends_notebook_in_browser(lab, tmp_path):
    url, token = lab
    shots = Path(os.environ.get('ADADIFF_SCREENSHOT_DIR', tmp_path))
    shots.mkdir(parents=True, exist_ok=True)
    with pw.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROME_ARGS)
        page = browser.new_page(viewport={'width': 1400, 'height': 1800})
        page.goto(f'{url}/lab/tree/nbs/03_exit_trends.ipynb?token={token}', timeout=120_000)
        page.wait_for_selector('.jp-Notebook', timeout=120_000)
        page.wait_for_selector(
            '.jp-Notebook-ExecutionIndicator[data-status="idle"], .jp-Toolbar-kernelStatus', timeout=120_000
        )
        time.sleep(2)
        # Run > Run All Cells
        page.get_by_role('menuitem', name='Run').first.click()
        page.get_by_text('Run All Cells', exact=True).first.click()
        # the app on the default model: wait for its exit figure
        page.wait_for_function(f'({EXIT_Y})() !== null && ({EXIT_Y})().title.includes("threshold")', timeout=300_000)
        before = page.evaluate(EXIT_Y)
        assert before['y'], before
        slider = page.locator('.widget-slider:has(label:text-is("threshold"))').first
        slider.scroll_into_view_if_needed()
        page.screenshot(path=str(shots / 'exit_trends_before.png'))
        page.locator('.jp-OutputArea-output:has(.widget-slider)').first.screenshot(
            path=str(shots / 'exit_trends_app_default.png')
        )
        # type a new threshold into the slider's readout (an editable field), as a user can; then drag back with
        # the keyboard
        readout = slider.locator('.widget-readout')
        # no sample exits early at the current threshold -> go to 1 (every sample exits at once); else -> 0 (no exits)
        new_val = 1.0 if all(v == before['y'][0] for v in before['y']) and before['y'][0] > 0 else 0.0
        page.evaluate(f'() => {{ window.__exit_before = JSON.stringify(({EXIT_Y})().y); }}')
        readout.click()
        page.keyboard.press('Control+A')
        page.keyboard.type(f'{new_val}')
        page.keyboard.press('Enter')
        page.wait_for_function(
            f'(() => {{ const r = ({EXIT_Y})(); '
            f'return r && r.y.length && JSON.stringify(r.y) !== window.__exit_before; }})()',
            timeout=120_000,
        )
        time.sleep(1)
        after = page.evaluate(EXIT_Y)
        assert after['y'] != before['y'] and after['title'] != before['title']
        page.screenshot(path=str(shots / 'exit_trends_after.png'))
        # the class-conditional model's app: a class selector and a guidance slider
        cond = page.locator('.jp-OutputArea-output:has(.widget-dropdown:has(label:text-is("class")))').first
        cond.wait_for(timeout=300_000)
        assert cond.locator('.widget-slider:has(label:text-is("guidance"))').count() == 1
        cond.scroll_into_view_if_needed()
        cond.screenshot(path=str(shots / 'exit_trends_app_cond.png'))
        app = page.locator('.jp-OutputArea-output:has(.widget-slider)').first
        app.scroll_into_view_if_needed()
        app.screenshot(path=str(shots / 'exit_trends_app.png'))
        browser.close()
    assert (shots / 'exit_trends_after.png').stat().st_size > 10_000
