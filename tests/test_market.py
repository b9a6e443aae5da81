"""The accelerator market (adadiff_nb.experiments.market) on tiny random pipelines: plain against plain is identical,
a method that changes the output has a finite PSNR, disabling restores the plain output (and a method that does not
restore stops the run), unsupported caches give a reason row, cache-dit leaves the transformer as it found it, and
bench/bench_market.py runs end to end and refuses bad input before building anything. On a tiny Stable Diffusion
pipeline (UNet): plain against plain is identical, DeepCache and tomesd change the output and give the plain one back,
early exit on top of DeepCache is refused. No timing thresholds."""
import json, os, subprocess, sys
from pathlib import Path
import numpy as np
import pytest
import torch

pytest.importorskip('diffusers')
pytest.importorskip('cache_dit')
from adadiff_nb.experiments.market import (TINY_CACHE_DIT, MarketMethod, cache_dit_method,  # noqa: E402
                                           diffusers_cache_method, market_methods, market_sd_call_kwargs,
                                           market_sd_pipeline, market_table, module_attrs, module_forwards,
                                           plain_method)
from adadiff_nb.experiments.market_quality import (PSNR_CAP, equal_fidelity_table, market_quality,  # noqa: E402
                                                   quality_table, run_market)
from adadiff_nb.integrations.adapters import tiny_dit_pipeline  # noqa: E402
from adadiff_nb.integrations.transformer_adapters import (tiny_call_kwargs, tiny_flux_pipeline,  # noqa: E402
                                                          tiny_sd3_pipeline)

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONWARNINGS': 'ignore'}
SCRIPT = str(ROOT / 'bench' / 'bench_market.py')
KW = dict(class_labels=[1, 2, 3], num_inference_steps=5, output_type='np')
torch.set_num_threads(1)


@pytest.fixture(scope='module')
def dit():
    return tiny_dit_pipeline(num_layers=4)


@pytest.fixture(scope='module')
def dit_market(dit):
    ms = market_methods(dit, KW, thresholds=[1.], cache_dit_default=False, cache_dit_thresholds=[.3],
                        diffusers_caches=['FirstBlockCache'])
    res = run_market(dit, KW, ms, repeats=1, warmup=0)
    return res, {r['method']: r for r in res['rows']}


def test_plain_identical_and_methods_change_output(dit_market):
    res, rows = dit_market
    p = rows['plain']
    assert p['identical_to_plain'] and p['mse'] == 0 and p['psnr'] == PSNR_CAP and p['speedup'] == 1
    ee = rows['early_exit 1']                                       # every row at the first exit: a different image
    assert not ee['identical_to_plain'] and ee['mse'] > 0 and np.isfinite(ee['psnr']) and ee['psnr'] < PSNR_CAP
    assert ee['mse_ci']['low'] <= ee['mse'] <= ee['mse_ci']['high'] and ee['mse_ci']['n'] == 3
    assert ee['compute']['layer_ratio'] < .3 and ee['compute']['linear_flops_ratio'] < .3
    assert ee['restored'] and ee['leftover'] == [] and ee['seconds'] > 0
    assert abs(ee['speedup'] - ee['plain_seconds'] / ee['seconds']) < 1e-12
    assert res['weights'] == 'random' and 'untrained copies' in res['notes'][0]
    json.dumps(res)                                                 # JSON-ready


def test_cache_dit_row_and_composition(dit_market):
    _, rows = dit_market
    cd = rows['cache_dit 0.3']
    assert cd['restored'] and cd['leftover'] == []                 # its patched forwards and new submodule put back
    assert cd['compute']['n_cached_steps'] == len(cd['compute']['cached_steps'])
    comp = rows['early_exit 1 + cache_dit 0.3']
    assert not comp['supported'] and 'refused' in comp['reason'] and 'cache-dit' in comp['reason']
    assert 'seconds' not in comp


def test_unsupported_caches_give_reason_rows(dit_market):
    res, rows = dit_market
    for k in ('FirstBlockCache', 'early_exit 1 + FirstBlockCache'):
        assert not rows[k]['supported'] and 'has no diffusers CacheMixin' in rows[k]['reason']
    assert 'not run: DiTTransformer2DModel has no diffusers CacheMixin' in market_table(res)
    m = diffusers_cache_method(tiny_sd3_pipeline(), 'FirstBlockCache')
    assert m.enable is None and m.reason.startswith('SD3Transformer2DModel has no diffusers CacheMixin')
    reason = cache_dit_method(tiny_dit_pipeline(num_layers=2)).reason       # its defaults need 8 blocks
    assert reason.startswith("cache-dit's Fn_compute_blocks=8 / Bn_compute_blocks=0 exceed the transformer's 2 blocks")


def test_method_that_does_not_restore_stops_the_run(dit):
    w = dit.transformer.proj_out_2.bias
    def enable(p):
        with torch.no_grad(): w.add_(.5)                            # changes the model and never undoes it
    ms = dict(plain=plain_method(), broken=MarketMethod('early_exit', enable=enable, disable=lambda p: None))
    try:
        with pytest.raises(RuntimeError, match="broken: after disabling it the plain pipeline's output differs"):
            run_market(dit, KW, ms, repeats=1, warmup=0)
    finally:
        with torch.no_grad(): w.sub_(.5)


def test_bad_input_refused(dit):
    ms = dict(plain=plain_method())
    with pytest.raises(ValueError, match="output_type='np' or 'pt'"):
        run_market(dit, {**KW, 'output_type': 'latent'}, ms)
    with pytest.raises(ValueError, match="must contain 'plain'"):
        run_market(dit, KW, {'x': MarketMethod('cache_dit', reason='none')})
    with pytest.raises(ValueError, match='repeats must be an integer >= 1'):
        run_market(dit, KW, ms, repeats=0)
    with pytest.raises(ValueError, match='threshold'):
        market_methods(dit, KW, thresholds=[1.5])


def test_cache_dit_puts_flux_back_and_diffusers_cache_runs_after():
    pipe = tiny_flux_pipeline(num_layers=1, num_single_layers=2)
    kw = dict(tiny_call_kwargs(pipe, batch=1), num_inference_steps=4, output_type='np')
    before = module_forwards(pipe.transformer)
    order = [n for n, _ in pipe.transformer.named_children()]
    m = cache_dit_method(pipe, .3, **TINY_CACHE_DIT)
    m.enable(pipe)
    pipe(**kw)                                                      # a cached call re-registers the block lists
    m.disable(pipe)
    assert [n for n, _ in pipe.transformer.named_children()] == order
    assert module_forwards(pipe.transformer) == before
    fbc = diffusers_cache_method(pipe, 'FirstBlockCache', threshold=.2)
    fbc.enable(pipe)
    try: pipe(**kw)                                                 # fails when the block order stays changed
    finally: fbc.disable(pipe)


def test_bench_market_script(tmp_path):
    out = tmp_path / 'market.json'
    cmd = [sys.executable, SCRIPT, '--layers', '2', '--heads-n', '2', '--head-dim', '8', '--sample-size', '8',
           '--steps', '3', '--batch', '2', '--repeats', '1', '--warmup', '0', '--thresholds', '0.5',
           '--cache-dit-thresholds', '0.2', '--diffusers-caches', 'FirstBlockCache', '--threads', '1',
           '--out', str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(out.read_text())
    names = [x['method'] for x in res['rows']]
    assert names[:2] == ['plain', 'early_exit 0.5'] and 'cache_dit 0.2' in names and 'FirstBlockCache' in names
    assert res['weights'] == 'random' and res['family'] == 'dit' and res['command'].startswith('python bench/')
    assert res['pipeline']['config']['num_layers'] == 2
    bad = subprocess.run([sys.executable, SCRIPT, '--diffusers-caches', 'TeaCache'], capture_output=True, text=True,
                         env=ENV, timeout=300)
    assert bad.returncode == 2 and "--diffusers-caches ['TeaCache'] unknown" in bad.stderr


@pytest.fixture(scope='module')
def sd_market():
    pytest.importorskip('DeepCache')
    pytest.importorskip('tomesd')
    pipe = market_sd_pipeline(block_out_channels=(16, 32), sample_size=16)    # attention at full resolution
    kw = market_sd_call_kwargs(pipe, batch=2, steps=3)
    forwards, attrs = module_forwards(pipe.unet), module_attrs(pipe.unet)
    classes = [type(m) for m in pipe.unet.modules()]
    ms = market_methods(pipe, kw, thresholds=[1.], exit_layers=[0], cache_dit_default=False, cache_dit_thresholds=[],
                        diffusers_caches=[], deepcache_intervals=[2], tome_ratios=[.5])
    res = run_market(pipe, kw, ms, repeats=1, warmup=0)
    after = (module_forwards(pipe.unet) == forwards, module_attrs(pipe.unet) == attrs,
             [type(m) for m in pipe.unet.modules()] == classes)
    return res, {r['method']: r for r in res['rows']}, after


def test_sd_plain_identical(sd_market):
    res, rows, _ = sd_market
    p = rows['plain']
    assert p['identical_to_plain'] and p['mse'] == 0 and p['psnr'] == PSNR_CAP and p['speedup'] == 1
    assert (res['pipeline']['pipeline'], res['pipeline']['unet']) == ('StableDiffusionPipeline', 'UNet2DConditionModel')
    assert p['compute']['block_flops_ratio'] == 1 and res['plain_work']['conv_flops'] > 0
    json.dumps(res)


@pytest.mark.parametrize('name', ['deepcache 2', 'tomesd 0.5', 'static_exit 0'])
def test_sd_methods_change_output_and_restore(sd_market, name):
    _, rows, after = sd_market
    r = rows[name]
    assert r['supported'] and not r['identical_to_plain'] and r['mse'] > 0 and r['psnr'] < PSNR_CAP
    assert r['restored'] and r['leftover'] == [] and r['compute']['block_flops_ratio'] < 1
    assert all(after)                                   # forwards, instance attributes and block classes as before


def test_sd_deepcache_counts_its_cached_steps(sd_market):
    _, rows, _ = sd_market
    assert rows['deepcache 2']['compute']['cached_steps'] == [1]          # steps 0 and 2 of 3 run in full
    assert rows['static_exit 0']['compute']['flop_ratio'] < 1


def test_sd_early_exit_on_deepcache_refused(sd_market):
    _, rows, _ = sd_market
    comp = rows['early_exit 1 + deepcache 2']
    assert not comp['supported'] and 'seconds' not in comp
    assert comp['reason'].startswith('refused: early exit would bypass a patched forward on the UNet2DConditionModel')


def test_bench_market_sd_script(tmp_path):
    pytest.importorskip('DeepCache')
    pytest.importorskip('tomesd')
    out = tmp_path / 'market_sd.json'
    cmd = [sys.executable, SCRIPT, '--family', 'sd', '--sd-channels', '16', '32', '--sample-size', '16', '--steps', '3',
           '--batch', '2', '--repeats', '1', '--warmup', '0', '--thresholds', '1', '--cache-dit-thresholds',
           '--diffusers-caches', '--deepcache-intervals', '2', '--tome-ratios', '0.5', '--threads', '1',
           '--out', str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(out.read_text())
    rows = {x['method']: x for x in res['rows']}
    assert res['family'] == 'sd' and res['pipeline']['config']['block_out_channels'] == [16, 32]
    assert rows['static_exit 0']['restored'] and rows['static_exit 1']['restored']        # every exit below the full
    assert rows['deepcache 2']['restored'] and rows['tomesd 0.5']['restored']
    bad = subprocess.run([sys.executable, SCRIPT, '--family', 'sd', '--tome-ratios', '0.9'], capture_output=True,
                         text=True, env=ENV, timeout=300)
    assert bad.returncode == 2 and '--tome-ratios must lie in (0, 0.75]' in bad.stderr


@pytest.fixture(scope='module')
def testbed_dir(tmp_path_factory):
    """A tiny random test bed (the testbed module's 'tiny' preset) saved as a pipeline folder: 8x8 images."""
    from diffusers import AutoencoderKL, DiTTransformer2DModel
    from adadiff_nb.training.testbed import save_testbed, testbed_dit_config, testbed_vae_config
    torch.manual_seed(0)
    dit, vae = DiTTransformer2DModel(**testbed_dit_config('tiny')), AutoencoderKL(**testbed_vae_config('tiny'))
    return save_testbed(tmp_path_factory.mktemp('tb') / 'testbed', vae, dit, dtype=torch.float32)


def test_quality_rows_pairs_and_errors(testbed_dir):
    from diffusers import DiTPipeline
    from adadiff_nb.evaluation.metrics import load_proxy_classifier
    from adadiff_nb.experiments.market_quality import real_images
    pipe = DiTPipeline.from_pretrained(testbed_dir)
    pipe.set_progress_bar_config(disable=True)
    kw = dict(num_inference_steps=3, output_type='np', guidance_scale=4.)
    ms = market_methods(pipe, kw, thresholds=[0., 1.], cache_dit_default=False, cache_dit_thresholds=[.3],
                        cache_dit_config=dict(TINY_CACHE_DIT, max_warmup_steps=1), diffusers_caches=[],
                        compose=False)
    res = run_market(pipe, dict(kw, class_labels=[1, 2]), ms, repeats=1, warmup=0)
    q = market_quality(pipe, kw, ms, res, n=20, batch=10, real=real_images(8, 100), classifier=load_proxy_classifier(),
                       n_boot=20)
    rows = {r['method']: r for r in q['rows']}
    for k in ('plain', 'early_exit 0'):                             # threshold 0: no exit, identical to plain
        assert rows[k]['identical_to_plain'] and rows[k]['psnr'] == PSNR_CAP and rows[k]['proxy_fd_vs_full'] == 0
        assert rows[k]['psnr_ci']['low'] == rows[k]['psnr_ci']['high'] == PSNR_CAP
    e1 = rows['early_exit 1']
    assert e1['psnr'] < PSNR_CAP and e1['psnr_ci']['low'] <= e1['psnr'] <= e1['psnr_ci']['high']
    assert e1['proxy_fd'] > 0 and e1['proxy_fd_ci95'][0] <= e1['proxy_fd_ci95'][1] and e1['accuracy_ci']['n'] == 20
    pair = q['pairs'][0]
    assert pair['method'] == 'cache_dit 0.3' and pair['early_exit'] in ('early_exit 0', 'early_exit 1')
    assert pair['psnr_difference']['low'] <= pair['psnr_difference']['mean'] <= pair['psnr_difference']['high']
    assert 'proxy_fd_difference' in pair and q['settings']['classes'] == list(range(10))
    assert '| early_exit 1 |' in quality_table(q, res) and '| cache_dit |' in equal_fidelity_table(q)
    json.dumps(q)
    with pytest.raises(ValueError, match='multiple of the 10 classes'):
        market_quality(pipe, kw, ms, res, n=15)
    with pytest.raises(ValueError, match='methods lacks'):
        market_quality(pipe, kw, dict(plain=plain_method()), res, n=20)


def test_bench_market_quality_script(testbed_dir, tmp_path):
    out = tmp_path / 'market_q.json'
    cmd = [sys.executable, SCRIPT, '--pipeline', str(testbed_dir), '--steps', '2', '--batch', '2', '--repeats', '1',
           '--warmup', '0', '--thresholds', '1', '--cache-dit-thresholds', '--no-cache-dit', '--diffusers-caches',
           '--no-compose', '--quality-n', '10', '--quality-batch', '10', '--n-boot', '10', '--threads', '1',
           '--out', str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    q = json.loads(out.read_text())['quality']
    assert [x['method'] for x in q['rows']] == ['plain', 'early_exit 1'] and q['settings']['n'] == 10
    assert q['rows'][0]['psnr'] == PSNR_CAP and 'proxy_fd' in q['rows'][1] and q['settings']['real_images'] > 1000
    bad = subprocess.run([sys.executable, SCRIPT, '--family', 'flux', '--quality-n', '10', '--no-cache-dit'],
                         capture_output=True, text=True, env=ENV, timeout=300)
    assert bad.returncode == 2 and '--quality-n needs a class-conditional DiT pipeline' in bad.stderr
