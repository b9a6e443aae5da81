"""`adadiff-sample` under `torchrun --nproc_per_node 2` (gloo, CPU): the two processes' shards, merged by the main
process, are exactly a single-process run with the same seed (images, labels, full-model images, meter statistics);
a rerun with --resume skips the finished shards; when one process cannot start (its shard exists, no --resume),
all stop with its error instead of waiting at the barrier. Tiny class-conditional early-exit U-ViT, stochastic DDPM,
5 images in 3 batches."""
import json, os, subprocess, sys
from pathlib import Path

import numpy as np
import pytest
import torch

from adadiff_nb.models.checkpoint import save_model
from adadiff_nb.exits.early_exit import EarlyExitUViT
from adadiff_nb.models.uvit import create_uvit

PY = sys.executable
ENV = {k: v for k, v in os.environ.items() if k not in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK')}
ENV.update(OMP_NUM_THREADS='1', PYTHONWARNINGS='ignore')
ARGS = ['--sampler', 'ddpm', '--steps', '3', '--threshold', '0.5', '--num-images', '5', '--batch', '2', '--seed', '4',
        '--quiet', '--compare-full']
# timings, and how each process ran its exits (host syncs and rows computed follow the host-sync plan it learned)
# (and provenance: the UTC time, the process that wrote it)
TIMING = {'wall_s', 'wall_full_s', 'images_per_s', 'speedup', 'processes', 'shards', 'host_syncs_per_forward',
          'compute_ratio', 'provenance'}
# per-image means over all images: the merge averages the shards' means, which may round differently in the last bit
AVERAGED = ('mse_vs_full', 'psnr_vs_full')


def _sample(args, launcher=(), timeout=240, ok=True):
    res = subprocess.run([PY, *launcher, '-m', 'adadiff_nb.apps.sample_cli', *map(str, args)], env=ENV,
                         capture_output=True,
                         text=True, timeout=timeout)
    if not ok: return res
    assert res.returncode == 0, res.stdout + res.stderr
    return res.stdout


def test_torchrun_two_processes_merge_to_the_single_run(tmp_path):
    torch.manual_seed(0)
    save_model(EarlyExitUViT.from_backbone(create_uvit('uvit_tiny', num_classes=3)).eval(), tmp_path / 'ce')
    ck = ['--checkpoint', tmp_path / 'ce']
    _sample(ck + ARGS + ['--out', tmp_path / 'one'])
    torchrun = ['-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2']
    out = _sample(ck + ARGS + ['--out', tmp_path / 'two'], torchrun)
    assert 'wrote shard 1/2 of' in out and '(2 processes)' in out, out

    one, two = np.load(tmp_path / 'one' / 'samples.npz'), np.load(tmp_path / 'two' / 'samples.npz')
    assert sorted(two.files) == sorted(one.files) == ['images', 'images_full', 'labels']
    for k in one.files: np.testing.assert_array_equal(two[k], one[k])
    s1, s2 = (json.loads((tmp_path / d / 'stats.json').read_text()) for d in ('one', 'two'))
    same = TIMING | set(AVERAGED)
    assert {k: v for k, v in s2.items() if k not in same} == {k: v for k, v in s1.items() if k not in same}
    for k in AVERAGED: assert s2[k] == pytest.approx(s1[k], rel=1e-12, abs=0), k
    assert s2['shards'] == 2 and [(p['rank'], p['n']) for p in s2['processes']] == [(0, 2), (1, 3)]
    for p in s2['processes']: assert p['speedup'] > 0 and 0 <= p['layer_ratio'] <= 1 and 'host_syncs_per_forward' in p

    shards = sorted((tmp_path / 'two' / 'shards').glob('*.json'))
    before = [p.stat().st_mtime_ns for p in shards]
    out = _sample(ck + ARGS + ['--out', tmp_path / 'two', '--resume'], torchrun)   # rerun: both shards are done
    assert out.count('already sampled with these settings, skipped') == 1 and '(2 processes)' in out, out
    assert [p.stat().st_mtime_ns for p in shards] == before
    np.testing.assert_array_equal(np.load(tmp_path / 'two' / 'samples.npz')['images'], one['images'])

    # rank 1's shard and the merge are gone, rank 0's shard is there and --resume is missing: rank 0 cannot start, so
    # rank 1 (which could) does not sample either, and nobody waits at the barrier
    for f in ('shards/rank1_of_2.json', 'shards/rank1_of_2.npz', 'samples.npz', 'samples.png', 'stats.json'):
        (tmp_path / 'two' / f).unlink()
    res = _sample(ck + ARGS + ['--out', tmp_path / 'two'], torchrun, timeout=180, ok=False)
    assert res.returncode != 0 and 'already holds shard 0/2' in res.stderr, res.stdout + res.stderr
    assert 'adadiff-sample: error: process 0 stopped before sampling' in res.stderr, res.stderr   # rank 1's line
    assert not (tmp_path / 'two' / 'shards' / 'rank1_of_2.json').exists()
