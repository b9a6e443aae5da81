"""`adadiff-train` as real processes: a run killed with SIGKILL after writing a checkpoint and resumed with
`--resume` reproduces an uninterrupted run; two CPU processes under `accelerate launch` stay in sync;
bad input exits with status 2. Tiny model (uvit_tiny, 8x8 CIFAR-10), a few dozen steps."""
import json, os, signal, socket, subprocess, sys, time
from pathlib import Path

import pytest
import torch

from adadiff_nb.models.checkpoint import load_weights
from adadiff_nb.training.loop import read_log, SYNC_DIR_ENV

PY = sys.executable
TRAIN = [PY, '-m', 'adadiff_nb.apps.train_cli']
ENV = {**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONWARNINGS': 'ignore', 'TOKENIZERS_PARALLELISM': 'false'}
TINY = ['--config', 'tiny_cifar8', '--device', 'cpu', '--progress', 'false', '--log-every', '1']


def _run(args, timeout=180, **kw):
    return subprocess.run(args, env=kw.pop('env', ENV), capture_output=True, text=True, timeout=timeout, **kw)


def _free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def test_sigkill_and_resume_matches_uninterrupted(tmp_path):
    steps, every = 30, 10
    ref_out, run_out = tmp_path / 'ref', tmp_path / 'run'
    # the uninterrupted reference runs alongside the run that gets killed
    ref = subprocess.Popen(TRAIN + TINY + ['--steps', str(steps), '--ckpt-every', str(every), '--out', str(ref_out)],
                           env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    victim = subprocess.Popen(TRAIN + TINY + ['--steps', '100000', '--ckpt-every', str(every), '--out', str(run_out)],
                              env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t0 = time.time()
    try:
        while not list((run_out / 'ckpt').glob('step_*/state.json')):
            assert victim.poll() is None, 'training process ended before writing a checkpoint'
            assert time.time() - t0 < 120, 'no checkpoint within 120 s'
            time.sleep(0.01)
        victim.send_signal(signal.SIGKILL)
    finally:
        victim.kill()
        victim.wait()
    assert victim.returncode == -signal.SIGKILL
    killed_at = max(json.loads(p.read_text())['step'] for p in (run_out / 'ckpt').glob('step_*/state.json'))
    assert killed_at < steps, f'the victim got too far ({killed_at}) before the kill'

    res = _run(TRAIN + ['--out', str(run_out), '--resume', '--steps', str(steps), '--progress', 'false'])
    assert res.returncode == 0, res.stdout + res.stderr
    assert f'step={killed_at}/{steps} resumed from' in res.stdout, res.stdout
    ref_stdout, _ = ref.communicate(timeout=180)
    assert ref.returncode == 0, ref_stdout

    a, b = read_log(ref_out / 'logs' / 'train.csv'), read_log(run_out / 'logs' / 'train.csv')
    assert [r['step'] for r in a] == [r['step'] for r in b] == list(range(1, steps + 1))
    for key in ('loss', 'l_simple', 'l_u', 'l_ual'):
        xa, xb = torch.tensor([r[key] for r in a]), torch.tensor([r[key] for r in b])
        assert torch.allclose(xa, xb, rtol=1e-6, atol=1e-7), (key, (xa - xb).abs().max())
    wa, wb = load_weights(ref_out / 'final' / 'model.safetensors'), load_weights(
        run_out / 'final' / 'model.safetensors'
    )
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) <= 1e-6
    rec = json.loads((run_out / 'final' / 'config.json').read_text())
    assert (
        rec['schedule'] == {'name': 'linear'}
        and rec['training']['steps'] == steps
        and '--resume' in rec['training']['command']
    )


def test_two_cpu_processes_stay_in_sync(tmp_path):
    out, sync = tmp_path / 'ddp', tmp_path / 'sync'
    cmd = [PY, '-m', 'accelerate.commands.launch', '--multi_gpu', '--num_processes', '2', '--num_machines', '1',
           '--mixed_precision', 'no', '--dynamo_backend', 'no', '--main_process_port', str(_free_port()),
           '-m', 'adadiff_nb.apps.train_cli'] + TINY + ['--steps', '4', '--ckpt-every', '2', '--out', str(out)]
    res = _run(cmd, env={**ENV, SYNC_DIR_ENV: str(sync)})
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert 'processes=2' in res.stdout
    # every process wrote its own parameter checksum after steps 2 and 4: identical across processes
    r0 = [json.loads(l) for l in (sync / 'rank0.jsonl').read_text().splitlines()]
    r1 = [json.loads(l) for l in (sync / 'rank1.jsonl').read_text().splitlines()]
    assert [r['step'] for r in r0] == [r['step'] for r in r1] == [2, 4]
    assert [r['sha256'] for r in r0] == [r['sha256'] for r in r1]
    assert r0[0]['sha256'] != r0[1]['sha256']                         # the weights did change
    st = json.loads((out / 'ckpt' / 'step_00000004' / 'state.json').read_text())
    assert st['world_size'] == 2 and len(st['rng']['noise']) == 2 and st['data'] == {'epoch': 0, 'index': 64}
    # only rank 0 writes: one log, one set of checkpoints
    assert len(read_log(out / 'logs' / 'train.csv')) == 4
    assert sorted(p.name for p in (out / 'ckpt').iterdir()) == ['step_00000002', 'step_00000004']


def test_bad_input_exits_2(tmp_path):
    res = _run(TRAIN + ['--config', 'no_such_preset', '--out', str(tmp_path / 'a')])
    assert res.returncode == 2 and 'neither a training preset' in res.stderr, res.stderr
    bad = tmp_path / 'corrupt.pth'
    bad.write_bytes(b'\x80\x02 definitely not a checkpoint')
    res = _run(TRAIN + TINY + ['--mode', 'finetune', '--init', str(bad), '--out', str(tmp_path / 'b')])
    assert res.returncode == 2 and 'weights_only=True' in res.stderr, res.stderr
