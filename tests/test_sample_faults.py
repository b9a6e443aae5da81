"""Fault injection: `adadiff-sample` killed (SIGKILL) at a random moment of its work, several seeds. A sharded run
resumed with --resume and merged is byte for byte the uninterrupted run (samples.npz, samples.png); a one-process
run killed while replacing an earlier run (--overwrite) leaves each file whole (the old or the new one), and a rerun
gives the uninterrupted run's bytes. Tiny model, a few seconds per seed (most of it the subprocess's imports);
ADADIFF_FAULT_SEEDS=N runs N seeds (default 3)."""
import json, os, random, signal, subprocess, sys, time

import numpy as np
import pytest
import torch
from PIL import Image

from adadiff_nb.models.checkpoint import save_model
from adadiff_nb.exits.early_exit import EarlyExitUViT
from adadiff_nb.apps.sample_cli import main
from adadiff_nb.models.uvit import create_uvit

torch.set_num_threads(1)
SEEDS = range(int(os.environ.get('ADADIFF_FAULT_SEEDS', 3)))
ENV = {k: v for k, v in os.environ.items() if k not in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK')}
ENV.update(OMP_NUM_THREADS='1', PYTHONWARNINGS='ignore')
# stochastic DDPM, exits, the full model too: 8 one-image batches, so that a kill can land between any two of them
ARGS = ['--sampler', 'ddpm', '--steps', '4', '--threshold', '0.5', '--n', '8', '--batch', '1', '--seed', '3',
        '--compare-full']


@pytest.fixture(scope='module')
def run(tmp_path_factory):
    "(checkpoint args, the uninterrupted run's directory, seconds that one shard of it takes in-process)."
    root = tmp_path_factory.mktemp('faults')
    torch.manual_seed(0)
    save_model(EarlyExitUViT.from_backbone(create_uvit('uvit_tiny', num_classes=3)).eval(), root / 'ce')
    ck = ['--checkpoint', str(root / 'ce')]
    assert _main(ck + ARGS + ['--out', root / 'one', '--quiet']) == 0
    t0 = time.perf_counter()
    assert _main(ck + ARGS + ['--out', root / 'timing', '--quiet', '--shard', '0/2']) == 0
    return ck, root / 'one', time.perf_counter() - t0


def _main(args): return main([str(a) for a in args])


def _kill_at_random(args, rng, window: float):
    """Start adadiff-sample in a subprocess; once its first progress bar appears (its work has begun) wait a random
    time in [0, window] and SIGKILL it (unless it has finished) -> its exit code."""
    p = subprocess.Popen([sys.executable, '-m', 'adadiff_nb.apps.sample_cli', *map(str, args)], env=ENV,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        p.stderr.read(1)                                       # blocks until the first bar (or the exit)
        time.sleep(rng.uniform(0, window))
        if p.poll() is None: p.send_signal(signal.SIGKILL)
        return p.wait(timeout=120)
    finally:
        if p.poll() is None: p.kill()
        p.stderr.close()


def _whole(out):
    "Each output that exists is complete: the npz loads, the JSON parses, the PNG decodes."
    if (out / 'samples.npz').exists():
        with np.load(out / 'samples.npz') as z: [z[k] for k in z.files]
    if (out / 'stats.json').exists(): json.loads((out / 'stats.json').read_text())
    if (out / 'samples.png').exists(): Image.open(out / 'samples.png').load()


@pytest.mark.parametrize('seed', SEEDS)
def test_killed_shard_resumes_to_the_uninterrupted_run(run, tmp_path, seed, capsys):
    ck, one, secs = run
    rng, out = random.Random(seed), tmp_path / 'two'
    if rng.random() < .5: assert _main(ck + ARGS + ['--out', out, '--quiet', '--shard', '1/2']) == 0   # done before
    code = _kill_at_random(ck + ARGS + ['--out', out, '--shard', '0/2'], rng, 1.5 * secs)
    assert code in (0, -signal.SIGKILL), code
    for r in (0, 1): assert _main(ck + ARGS + ['--out', out, '--quiet', '--shard', f'{r}/2', '--resume']) == 0
    assert _main(ck + ['--out', out, '--merge']) == 0, capsys.readouterr().err
    for f in ('samples.npz', 'samples.png'): assert (out / f).read_bytes() == (one / f).read_bytes(), f
    shards = sorted(p.name for p in (out / 'shards').iterdir())                          # no temp file left over
    assert shards == ['rank0_of_2.json', 'rank0_of_2.npz', 'rank1_of_2.json', 'rank1_of_2.npz']


@pytest.mark.parametrize('seed', SEEDS[:2])
def test_killed_overwrite_leaves_whole_files(run, tmp_path, seed):
    ck, one, secs = run
    rng, out = random.Random(100 + seed), tmp_path / 'o'
    assert _main(ck + ARGS + ['--out', out, '--quiet', '--seed', 9]) == 0                # an earlier run
    code = _kill_at_random(ck + ARGS + ['--out', out, '--overwrite'], rng, 3 * secs)
    assert code in (0, -signal.SIGKILL), code
    _whole(out)                                                                           # old or new, never torn
    assert _main(ck + ARGS + ['--out', out, '--quiet', '--overwrite']) == 0
    for f in ('samples.npz', 'samples.png'): assert (out / f).read_bytes() == (one / f).read_bytes(), f
    assert sorted(p.name for p in out.iterdir()) == ['samples.npz', 'samples.png', 'stats.json']
