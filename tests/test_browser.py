"""Real-browser test of the app notebook: JupyterLab on localhost, headless Chromium (Debian package) driven by
Playwright, a 1,000 px wide window. Run All on `nbs/03_exit_trends.ipynb` must show the app on the first screen; a
drag of the threshold slider must update the exit figure (the time from the app appearing to the update is recorded
in timings.json and printed, not asserted: CI machines vary); no figure may overflow its output column or cut off
one of its own labels, and no two titles or labels may overlap; the class-conditional app opens from its button.
Saves screenshots and timings.json to $ADADIFF_SCREENSHOT_DIR (default: a pytest tmp dir)."""
import json, os, shutil, socket, subprocess, sys, time, secrets
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which('chromium') or shutil.which('chromium-browser')
pw = pytest.importorskip('playwright.sync_api', reason='playwright is not installed (pip install -e ".[dev]")')

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason='Debian chromium is not installed (apt-get install chromium)')

WIDTH, HEIGHT = 1000, 1000                      # the window: the 1,000 px column the figures must fit
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
  const tr = (plots[0]._fullData || []).find(d => d.name === 'mean exit layer');   // the first app's, decoded
  return tr ? {title: plots[0].layout.title.text, y: Array.from(tr.y)} : null;
}"""

# Before Run All: note (performance.now(), ms) when the app's exit figure first appears, and its exit layers then
WATCH = f"""() => {{
  window.__t = {{}};
  const iv = setInterval(() => {{
    const r = ({EXIT_Y})();
    if (r && r.y.length) {{ window.__t.appeared = performance.now(); window.__t.y0 = JSON.stringify(r.y);
                           clearInterval(iv); }}
  }}, 10);
}}"""

UPDATED = f"""() => {{
  const r = ({EXIT_Y})();
  if (!r || JSON.stringify(r.y) === window.__t.y0) return false;
  window.__t.updated = window.__t.updated || performance.now();
  return true;
}}"""

# Every problem of fit in the outputs under `root`: a plotly figure wider than its output column or scrolled inside a
# box, a text of a figure outside the figure (clipped), two titles / annotations / axis titles / colour-bar titles
# of a figure overlapping, a widget label or button cut short ('map sam...').
FIT = """(root) => {
  const bad = [], inter = (a, b) => Math.min(a.right, b.right) - Math.max(a.left, b.left) > 2 &&
                                     Math.min(a.bottom, b.bottom) - Math.max(a.top, b.top) > 2;
  for (const p of root.querySelectorAll('.js-plotly-plot')) {
    const r = p.getBoundingClientRect(), col = p.closest('.jp-OutputArea-output');
    const name = String((p.layout && p.layout.title && p.layout.title.text) || '?').slice(0, 40);
    if (!r.width) continue;
    const c = col.getBoundingClientRect();
    if (r.left < c.left - 1 || r.right > c.right + 1)
      bad.push(`${name}: figure x ${r.left | 0}..${r.right | 0} outside its column ${c.left | 0}..${c.right | 0}`);
    for (let e = p.parentElement; e && e !== col; e = e.parentElement)
      if (e.scrollWidth > e.clientWidth + 1)
        bad.push(`${name}: a box (${e.className}) is ${e.scrollWidth} px wide inside ${e.clientWidth} px`);
    const texts = [...p.querySelectorAll('svg text')]
        .filter(t => t.textContent.trim() && t.getBoundingClientRect().width);
    for (const t of texts) {
      const b = t.getBoundingClientRect();
      if (b.left < r.left - 1 || b.right > r.right + 1 || b.top < r.top - 1 || b.bottom > r.bottom + 1)
        bad.push(`${name}: text '${t.textContent.slice(0, 40)}' cut off by the figure's edge`);
    }
    const labels = texts.filter(t => t.closest('.infolayer') && !t.closest('.legend') &&
                                     !t.closest('.cbaxis'));              // titles, annotations, colour-bar titles
    labels.forEach((a, i) => labels.slice(i + 1).forEach(b => {
      if (inter(a.getBoundingClientRect(), b.getBoundingClientRect()))
        bad.push(`${name}: '${a.textContent.slice(0, 30)}' overlaps '${b.textContent.slice(0, 30)}'`);
    }));
  }
  const ctx = document.createElement('canvas').getContext('2d');
  for (const l of root.querySelectorAll('.widget-label, .widget-label-basic, button')) {
    if (!l.offsetParent || !l.textContent.trim()) continue;
    const cs = getComputedStyle(l), px = k => parseFloat(cs[k]) || 0;
    ctx.font = cs.font;                                 // the text's own width against the room its box gives it
    const room = l.getBoundingClientRect().width - px('paddingLeft') - px('paddingRight') - px('borderLeftWidth') -
                 px('borderRightWidth');
    if (ctx.measureText(l.textContent).width > room + 0.1) bad.push(`widget text '${l.textContent}' cut short`);
  }
  return bad;
}"""


# Run All has finished: no cell waits or runs ('[*]')
IDLE = "() => ![...document.querySelectorAll('.jp-InputArea-prompt')].some(e => e.textContent.includes('*'))"

# The first app's figures are as wide as a column wider than `w` px
RESIZED = """(w) => {
  const ps = [...document.querySelectorAll('.jp-OutputArea-output .js-plotly-plot')];
  return ps.length > 0 && ps[0].closest('.jp-OutputArea-output').getBoundingClientRect().width > w &&
         ps.every(p => p._fullLayout && Math.abs(p._fullLayout.width - p.getBoundingClientRect().width) < 2);
}"""


def _drag_threshold(page, slider, value: float):
    "Drag the threshold slider's handle to `value` (of 0..1) with the mouse, as a user does."
    track = slider.locator('.noUi-target').bounding_box()
    handle = slider.locator('.noUi-handle').bounding_box()
    x0, y = handle['x'] + handle['width'] / 2, handle['y'] + handle['height'] / 2
    page.mouse.move(x0, y)
    page.mouse.down()
    page.mouse.move(track['x'] + value * track['width'], y, steps=8)
    page.mouse.up()


def _check_fit(page, where, what: str):
    bad = where.evaluate(FIT)
    assert not bad, f'{what}: ' + '; '.join(bad)


def _run_all_and_drag(page, shots: Path) -> dict:
    """Run All; as soon as the app appears, drag its threshold to 0.3 and wait for the exit figure to change. Checks
    that the app was on the first screen; returns the timings (seconds; app_to_update_s: appearing to updated)."""
    page.evaluate(WATCH)
    t_run = page.evaluate('performance.now()')
    page.get_by_role('menuitem', name='Run').first.click()                   # Run > Run All Cells
    page.get_by_text('Run All Cells', exact=True).first.click()
    page.wait_for_function('() => window.__t.appeared !== undefined', timeout=300_000, polling=10)
    slider = page.locator('.widget-slider:has(label:text-is("threshold"))').first
    t_seen = page.evaluate('performance.now()')
    on_screen = slider.bounding_box()
    _drag_threshold(page, slider, 0.3)                                       # at once, as a user who sees it does
    t_drop = page.evaluate('performance.now()')
    page.screenshot(path=str(shots / 'exit_trends_first_screen.png'))
    page.wait_for_function(UPDATED, timeout=120_000, polling=10)
    t = page.evaluate('window.__t')
    after = page.evaluate(EXIT_Y)
    assert after['y'] != json.loads(t['y0']) and 'threshold 0.3' in after['title'], after
    # Run All left the app on the first screen: its threshold slider inside the window without scrolling
    assert on_screen and 0 <= on_screen['y'] and on_screen['y'] + on_screen['height'] <= HEIGHT, on_screen
    s = lambda a, b: round((a - b) / 1e3, 3)
    return dict(run_all_to_app_s=s(t['appeared'], t_run), app_to_update_s=s(t['updated'], t['appeared']),
                release_to_update_s=s(t['updated'], t_drop), app_to_release_s=s(t_drop, t['appeared']),
                detection_lag_s=s(t_seen, t['appeared']), window=[WIDTH, HEIGHT])


def _whole_app(page, app, shots: Path):
    "Back at the documented threshold: the whole app with the file browser open, then closed (a wider column)."
    slider = app.locator('.widget-slider:has(label:text-is("threshold"))').first
    slider.locator('.widget-readout').click()                                # typed: a setting already seen
    page.keyboard.press('Control+A')
    page.keyboard.type('0.075')
    page.keyboard.press('Enter')
    page.wait_for_function(f'() => ({EXIT_Y})().title.includes("threshold 0.075;")', timeout=60_000)
    page.evaluate('document.activeElement.blur()')
    page.set_viewport_size({'width': WIDTH, 'height': 2600})                  # as tall as the app, still 1,000 px wide
    time.sleep(1)
    app.scroll_into_view_if_needed()
    app.screenshot(path=str(shots / 'exit_trends_app_narrow.png'))
    _check_fit(page, app, 'default-model app, file browser open')
    page.keyboard.press('Control+b')                                         # the file browser closed
    page.wait_for_function(RESIZED, arg=700, timeout=60_000)                 # the figures follow the column
    time.sleep(1)
    app.scroll_into_view_if_needed()
    app.screenshot(path=str(shots / 'exit_trends_app.png'))                  # the README's picture
    _check_fit(page, app, 'default-model app, file browser closed')
    page.keyboard.press('Control+b')
    page.wait_for_function('(w) => !(' + RESIZED + ')(w)', arg=700, timeout=60_000)


def _conditional_app(page, shots: Path):
    "The class-conditional model's app opens from its button: a class selector and a guidance slider, all in view."
    page.get_by_role('button', name='Open the class-conditional model').click()
    cond = page.locator('.jp-OutputArea-output:has(.widget-dropdown:has(label:text-is("class")))').first
    cond.wait_for(timeout=300_000)
    assert cond.locator('.widget-slider:has(label:text-is("guidance"))').count() == 1
    page.wait_for_function("() => [...document.querySelectorAll('.js-plotly-plot')].filter(p => p.layout && "
                           "String((p.layout.title || {}).text || '').startsWith('Early exit')).length >= 2",
                           timeout=120_000)
    time.sleep(1)
    cond.scroll_into_view_if_needed()
    cond.screenshot(path=str(shots / 'exit_trends_app_cond.png'))
    _check_fit(page, cond, 'class-conditional app')


def test_exit_trends_notebook_in_browser(lab, tmp_path):
    url, token = lab
    shots = Path(os.environ.get('ADADIFF_SCREENSHOT_DIR', tmp_path))
    shots.mkdir(parents=True, exist_ok=True)
    with pw.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROME_ARGS)
        page = browser.new_page(viewport={'width': WIDTH, 'height': HEIGHT})
        page.goto(f'{url}/lab/tree/nbs/03_exit_trends.ipynb?token={token}', timeout=120_000)
        page.wait_for_selector('.jp-Notebook', timeout=120_000)
        page.wait_for_selector('.jp-Notebook-ExecutionIndicator', state='attached', timeout=120_000)
        time.sleep(2)
        timings = _run_all_and_drag(page, shots)
        (shots / 'timings.json').write_text(json.dumps(timings, indent=1))
        print('exit-trends app timings (s):', json.dumps(timings))
        page.wait_for_function(IDLE, timeout=120_000)
        time.sleep(1)
        page.screenshot(path=str(shots / 'exit_trends_after_drag.png'))
        app = page.locator('.jp-OutputArea-output:has(.widget-slider)').first
        _check_fit(page, app, 'default-model app')
        _whole_app(page, app, shots)
        _conditional_app(page, shots)
        browser.close()
    assert (shots / 'exit_trends_app.png').stat().st_size > 10_000
