"""The documentation site in `_docs/` (built by `python tools/build_docs.py`): every notebook has a page, and a real
browser (Debian's Chromium driven by Playwright) opens the index and an API page from a local HTTP server, offline.

Skipped when the site is not built or Chromium is missing, unless ADADIFF_REQUIRE_DOCS=1 (CI builds the site first and
sets it, so there a missing site fails)."""
import functools, http.server, os, re, shutil, threading
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / '_docs'
REQUIRED = os.environ.get('ADADIFF_REQUIRE_DOCS') == '1'
CHROMIUM = shutil.which('chromium') or shutil.which('chromium-browser')
CHROME_ARGS = ['--headless=new', '--no-sandbox', '--disable-gpu', '--no-first-run', '--disable-background-networking',
               '--disable-component-update', '--disable-sync', '--disable-dev-shm-usage']

if not (DOCS / 'index.html').is_file():
    if REQUIRED: raise RuntimeError(f'{DOCS}/index.html is missing: run `python tools/build_docs.py` first')
    pytest.skip('the docs site is not built (python tools/build_docs.py)', allow_module_level=True)


def _notebooks():
    "Every notebook under nbs/, relative to it (folders starting with `_` or `.` aside)."
    nbs = ROOT / 'nbs'
    return sorted(p.relative_to(nbs) for p in nbs.rglob('*.ipynb')
                  if not any(part.startswith(('_', '.')) for part in p.relative_to(nbs).parts))


def _output_file(nb: Path) -> str:
    """The page nbdev gives a notebook (nbdev.config.nbpath2html), in its folder: `models/02a_default_model` ->
    `models/default_model.html`."""
    return str(nb.parent / re.sub(r'^\d+[a-zA-Z0-9]*_', '', nb.name.lower()).replace('.ipynb', '.html'))


def test_every_notebook_has_a_page():
    missing = [str(nb) for nb in _notebooks() if not (DOCS / nb.with_suffix('.html')).is_file()]
    assert not missing, f'notebooks without a page in {DOCS}: {missing}'
    for nb in _notebooks():     # nbdev's own links (`name` in backticks) point at these names
        page = _output_file(nb)
        assert (DOCS / page).is_file(), f'{nb}: no {page} in {DOCS}'


def test_api_pages_have_show_doc():
    html = (DOCS / 'exits' / 'early_exit.html').read_text()
    for name in ('check_threshold', 'earlyexitmodel', 'create_early_exit'):
        assert f'id="{name}"' in html, f'early_exit.html has no show_doc section #{name}'
    assert 'def check_threshold(' in html or 'check_threshold</span>(' in html, 'no rendered signature'


@pytest.fixture(scope='module')
def site():
    handler = functools.partial(type('Quiet', (http.server.SimpleHTTPRequestHandler,),
                                     {'log_message': lambda *a: None}), directory=str(DOCS))
    server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f'http://127.0.0.1:{server.server_address[1]}'
    server.shutdown()
    server.server_close()


@pytest.fixture(scope='module')
def page(site):
    pw = pytest.importorskip('playwright.sync_api', reason='playwright is not installed (pip install -e ".[dev]")')
    if CHROMIUM is None:
        if REQUIRED: raise RuntimeError('Debian chromium is not installed (apt-get install chromium)')
        pytest.skip('Debian chromium is not installed (apt-get install chromium)')
    with pw.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROME_ARGS)
        pg = browser.new_page(viewport={'width': 1280, 'height': 900})
        # offline: only the local server answers (the KaTeX stylesheet on a CDN, say, is refused at once)
        pg.route('**/*', lambda route: route.continue_() if route.request.url.startswith(site) else route.abort())
        yield pg
        browser.close()


def test_index_renders(site, page, tmp_path):
    page.goto(f'{site}/index.html')
    assert page.title().startswith('adadiff_nb')
    assert page.locator('h1').first.inner_text().strip() == 'adadiff_nb'
    assert page.get_by_text('Quickstart', exact=False).first.is_visible()
    assert page.locator('pre code', has_text='load_default').first.is_visible()
    assert page.locator('a[href*="early_exit"]').count() > 0, 'the sidebar links no early-exit page'
    page.screenshot(path=str(Path(os.environ.get('ADADIFF_SCREENSHOT_DIR', tmp_path)) / 'docs_index.png'))


def test_api_page_renders_and_links(site, page):
    page.goto(f'{site}/index.html')
    page.locator('a[href^="models/default_model.html#load_default"]').first.click()   # nbdev's link: `load_default()`
    page.wait_for_load_state()
    assert page.url.endswith('models/default_model.html#load_default'), page.url
    assert page.locator('h3#load_default').is_visible()
    page.goto(f'{site}/exits/early_exit.html')
    assert page.locator('h1').first.inner_text().startswith('Early-exit U-ViT')
    for name in ('check_threshold', 'earlyexitmodel'):
        assert page.locator(f'h3#{name}').is_visible(), f'no show_doc heading #{name}'
    signature = page.locator('pre', has_text='check_threshold(').first
    assert signature.is_visible()
