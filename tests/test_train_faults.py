"""Faults around `adadiff-train`, on real processes and a tiny model (uvit_tiny, 8x8 CIFAR-10, a checkpoint every
step): a SIGKILL at a random point (a step, a checkpoint write, the final save) and `--resume` end with the weights,
log and files of an uninterrupted run, and nothing of the killed writes stays behind; Ctrl-C (SIGINT) saves a
checkpoint of the last step and exits with status 130 and one line; bad input (a non-image file in --data, a UNet
folder as --vae, a damaged state.json, no `accelerate` installed) exits with status 2 and one line, before the run
writes anything.

One kill point runs by default; `ADADIFF_SLOW=1` runs two more."""
import os, random, signal, subprocess, sys, time
from pathlib import Path

import numpy as np
import pytest
import torch

from adadiff_nb.models.checkpoint import load_weights
from adadiff_nb.apps.train_cli import main as train_main
from adadiff_nb.training.loop import read_log

PY = sys.executable
TRAIN = [PY, '-m', 'adadiff_nb.apps.train_cli']
ENV = {**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONWARNINGS': 'ignore', 'TOKENIZERS_PARALLELISM': 'false'}
STEPS = 30
TINY = ['--config', 'tiny_cifar8', '--device', 'cpu', '--progress', 'false', '--log-every', '1', '--keep-ckpts', '2',
        '--steps', str(STEPS)]
slow = pytest.mark.skipif(os.environ.get('ADADIFF_SLOW') != '1', reason='more kill points: set ADADIFF_SLOW=1')


def _run(args, timeout=180):
    return subprocess.run(args, env=ENV, capture_output=True, text=True, timeout=timeout)


def _files(out: Path) -> list[str]:
    return sorted(str(p.relative_to(out)) for p in out.rglob('*'))


def _rows(log: Path) -> int:
    try: return max(0, log.read_text().count('\n') - 1)
    except (FileNotFoundError, UnicodeDecodeError): return 0


@pytest.fixture(scope='module')
def reference(tmp_path_factory) -> Path:
    "The uninterrupted run: a checkpoint every step (as the killed runs), 30 steps."
    out = tmp_path_factory.mktemp('reference') / 'run'
    res = _run(TRAIN + TINY + ['--ckpt-every', '1', '--out', str(out)])
    assert res.returncode == 0, res.stdout + res.stderr
    return out


def _assert_same_run(out: Path, ref: Path, same_files: bool = True):
    "The weights (bit for bit), the log rows and, with `same_files`, the file names of the uninterrupted run."
    for f in ('final/model.safetensors', 'final_ema/model.safetensors'):
        a, b = load_weights(ref / f), load_weights(out / f)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f
    la, lb = read_log(ref / 'logs' / 'train.csv'), read_log(out / 'logs' / 'train.csv')
    assert [r['step'] for r in lb] == [float(s) for s in range(1, STEPS + 1)]
    for key in ('loss', 'l_simple', 'l_u', 'l_ual', 'grad_norm'): assert [r[key] for r in la] == [r[key] for r in lb]
    if same_files: assert _files(out) == _files(ref)
    assert not [f for f in _files(out) if '.tmp' in f]


def _kill_at_random(out: Path, seed: int) -> tuple[int, int]:
    "Start the run, SIGKILL it after a random number of log rows plus a random delay; (rows seen, return code)."
    rng = random.Random(seed)
    target, delay = rng.randint(1, STEPS - 10), rng.uniform(0., 0.05)
    victim = subprocess.Popen(TRAIN + TINY + ['--ckpt-every', '1', '--out', str(out)], env=ENV,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t0 = time.time()
    try:
        while _rows(out / 'logs' / 'train.csv') < target and victim.poll() is None:
            assert time.time() - t0 < 120, 'the run logged nothing within 120 s'
            time.sleep(0.002)
        time.sleep(delay)
        victim.send_signal(signal.SIGKILL)
    finally:
        victim.kill()
        victim.wait()
    return _rows(out / 'logs' / 'train.csv'), victim.returncode


@pytest.mark.parametrize('seed', [0, pytest.param(1, marks=slow), pytest.param(2, marks=slow)])
def test_sigkill_at_random_point_then_resume_is_exact(tmp_path, reference, seed):
    out = tmp_path / 'run'
    rows, rc = _kill_at_random(out, seed)
    print(f"seed {seed}: killed after {rows} log rows (return code {rc})")
    assert rc == -signal.SIGKILL, 'the run ended before the kill: nothing was tested'
    res = _run(TRAIN + TINY + ['--ckpt-every', '1', '--out', str(out), '--resume'])
    assert res.returncode == 0, res.stdout + res.stderr
    assert 'Traceback' not in res.stderr, res.stderr
    _assert_same_run(out, reference)


def test_ctrl_c_saves_a_checkpoint_and_exits_130(tmp_path, reference):
    "Sample grids every step slow the steps down; checkpoints only every 1000 steps: the one saved is Ctrl-C's."
    out = tmp_path / 'run'
    slow_steps = ['--sample-every', '1', '--sample-steps', '20', '--sample-n', '16', '--ckpt-every', '1000']
    victim = subprocess.Popen(TRAIN + TINY + slow_steps + ['--out', str(out)], env=ENV, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
    t0 = time.time()
    try:
        while _rows(out / 'logs' / 'train.csv') < 3:
            assert victim.poll() is None and time.time() - t0 < 120, 'no log rows within 120 s'
            time.sleep(0.005)
        victim.send_signal(signal.SIGINT)
        err = victim.communicate(timeout=120)[1]
    finally:
        victim.kill()
        victim.wait()
    assert victim.returncode == 130, err
    step = int(read_log(out / 'logs' / 'train.csv')[-1]['step'])
    ck = out / 'ckpt' / f'step_{step:08d}'
    assert err.strip().splitlines() == [f"adadiff-train: interrupted at step {step}; saved {ck}; resume with --resume"]
    assert step < STEPS and sorted(p.name for p in (out / 'ckpt').iterdir()) == [ck.name]
    res = _run(TRAIN + TINY + ['--ckpt-every', '1000', '--out', str(out), '--resume'])
    assert res.returncode == 0 and f'step={step}/{STEPS} resumed from {ck}' in res.stdout, res.stdout + res.stderr
    _assert_same_run(out, reference, same_files=False)


def test_damaged_checkpoints_and_killed_writes(tmp_path, reference, capsys):
    "In-process: the newest state.json torn and a killed write left behind; then every checkpoint damaged."
    out = tmp_path / 'run'
    assert train_main(TINY[:-2] + ['--steps', '20', '--ckpt-every', '5', '--out', str(out)]) == 0
    (out / 'ckpt' / 'step_00000020' / 'state.json').write_text('{"format": "adadiff_nb.training.common/1", "st')
    (out / 'ckpt' / '.tmp_step_00000021_999999999').mkdir()
    capsys.readouterr()
    assert train_main(TINY + ['--ckpt-every', '5', '--out', str(out), '--resume']) == 0
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and 'removed what a killed run left unfinished' in err[1] and '.tmp_step_00000021' in err[1]
    assert 'skipped damaged checkpoint(s) step_00000020 (state.json is not valid JSON' in err[0], err
    assert err[0].endswith(f"resuming from {out / 'ckpt' / 'step_00000015'}")
    assert (out / 'ckpt' / 'damaged_step_00000020' / 'model.safetensors').is_file()       # kept, not pruned
    _assert_same_run(out, reference, same_files=False)
    for p in (out / 'ckpt').glob('step_*'):
        f = p / 'model.safetensors'
        f.write_bytes(f.read_bytes()[:-8])                                                   # cut short
    assert train_main(TINY + ['--out', str(out), '--resume']) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(f"adadiff-train: error: no valid checkpoint in {out / 'ckpt'}")
    assert 'step_00000030: model.safetensors does not match its sha256' in err[0]
    assert 'step_00000025: model.safetensors does not match its sha256' in err[0]


def test_non_image_file_in_data_is_named_before_anything_is_written(tmp_path, capsys):
    from PIL import Image
    data = tmp_path / 'images'
    data.mkdir()
    for i in range(20):
        Image.fromarray(np.full((8, 8, 3), 10 * i, np.uint8)).save(data / f'{i:02d}.png')
    (data / '13.png').write_text('a caption, not an image')
    out = tmp_path / 'run'
    assert train_main(TINY + ['--data', str(data), '--out', str(out)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and f"{data / '13.png'} is not an image PIL can read" in err[0], err
    assert not out.exists()


def test_unet_folder_as_vae_is_refused_before_loading(tmp_path, capsys):
    diffusers = pytest.importorskip('diffusers')
    from adadiff_nb.models.autoencoder import LatentAutoencoder, TINY_VAE_CONFIG, precompute_latents
    torch.manual_seed(0)
    cache = precompute_latents(torch.rand(16, 3, 16, 16) * 2 - 1, LatentAutoencoder.from_config(TINY_VAE_CONFIG),
                               tmp_path / 'lat.safetensors', labels=torch.arange(16) % 10)
    unet = diffusers.UNet2DModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8,),
                                 down_block_types=('DownBlock2D',), up_block_types=('UpBlock2D',), norm_num_groups=8,
                                 layers_per_block=1)
    unet.save_pretrained(tmp_path / 'unet')
    out = tmp_path / 'run'
    args = ['--config', 'tiny_latent_c', '--device', 'cpu', '--progress', 'false', '--data', str(cache)]
    assert train_main(args + ['--vae', str(tmp_path / 'unet'), '--out', str(out)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and (f"{tmp_path / 'unet'} is not an AutoencoderKL folder (its config says "
                              "_class_name=UNet2DModel); pass the VAE folder") in err[0], err
    assert not out.exists()


def test_missing_accelerate_is_named_before_anything_is_written(tmp_path, capsys, monkeypatch):
    "Without the `train` extra: status 2 and one line naming the extra, before any data or model work."
    monkeypatch.setitem(sys.modules, 'accelerate', None)                 # `import accelerate` now fails
    out = tmp_path / 'run'
    assert train_main(TINY + ['--data', str(tmp_path / 'absent.npz'), '--out', str(out)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == ["adadiff-train: error: adadiff-train / train() needs the `accelerate` package, which is not "
                   "installed: pip install 'adadiff_nb[train]'"], err
    assert not out.exists()
