"""adadiff_nb.evaluation.metrics against independent references: the Frechet distance against pytorch-fid's
`calculate_frechet_distance` and a from-scratch eigendecomposition formula, KID against a naive
O(n^2) loop, and the whole feature pipeline (PNG folder -> pytorch-fid's InceptionV3 -> statistics)
against pytorch-fid's own `get_activations` / `calculate_activation_statistics` on the same files
with the same (random, offline) weights. CPU only, small sizes."""
import warnings
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch

from adadiff_nb.evaluation import metrics as M

pytorch_fid = pytest.importorskip('pytorch_fid')
from pytorch_fid import fid_score  # noqa: E402
import pytorch_fid.inception as pfi  # noqa: E402


# ---------------------------------------------------------------- Frechet distance
def fd_eigh_reference(mu1, s1, mu2, s2):
    "From scratch: Tr sqrt(S1 S2) = sum_i sqrt(lambda_i(S1^1/2 S2 S1^1/2)), symmetric eigendecompositions only."
    w, v = np.linalg.eigh(s1)
    s1h = v @ np.diag(np.sqrt(np.clip(w, 0, None))) @ v.T
    lam = np.linalg.eigvalsh(s1h @ s2 @ s1h)
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.sum(np.sqrt(np.clip(lam, 0, None))))


def pytorch_fid_fd(*args):
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')          # scipy>=1.16 deprecates sqrtm(disp=False), which pytorch-fid passes
        return float(fid_score.calculate_frechet_distance(*args))


def random_stats(seed, n, d, scale=1.0, shift=0.0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)) @ (np.eye(d) + scale * rng.normal(size=(d, d)) / np.sqrt(d)) + shift
    return M.stats_from_activations(x)


@pytest.mark.parametrize('d,n1,n2', [(16, 200, 150), (64, 500, 300), (128, 400, 1000)])
def test_frechet_distance_matches_references(d, n1, n2):
    mu1, s1 = random_stats(0, n1, d)
    mu2, s2 = random_stats(1, n2, d, scale=0.7, shift=0.3)
    ours = M.frechet_distance(mu1, s1, mu2, s2)
    ref_pf = pytorch_fid_fd(mu1, s1, mu2, s2)
    ref_eigh = fd_eigh_reference(mu1, s1, mu2, s2)
    assert ours > 0
    assert ours == pytest.approx(ref_pf, rel=1e-6)
    assert ours == pytest.approx(ref_eigh, rel=1e-6)
    assert M.frechet_distance(mu1, s1, mu2, s2, method='eigh') == pytest.approx(ref_eigh, rel=1e-6)


def test_frechet_distance_singular_covariances():
    "N < D: both covariances are singular; still agrees with the references and is ~0 against itself."
    mu1, s1 = random_stats(2, 20, 48)
    mu2, s2 = random_stats(3, 30, 48, shift=0.5)
    ref = fd_eigh_reference(mu1, s1, mu2, s2)
    assert M.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(ref, rel=1e-5)
    assert M.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(pytorch_fid_fd(mu1, s1, mu2, s2), rel=1e-6)
    for method in ('sqrtm', 'eigh'):
        assert abs(M.frechet_distance(mu1, s1, mu1, s1, method=method)) < 1e-6 * np.trace(s1)


def test_frechet_distance_self_is_zero_and_checks_shapes():
    mu, s = random_stats(4, 300, 32)
    assert abs(M.frechet_distance(mu, s, mu, s)) < 1e-9 * np.trace(s)
    assert M.frechet_distance(mu, s, mu + 1.0, s) == pytest.approx(32.0, rel=1e-6)   # pure mean shift: ||1||^2 = d
    with pytest.raises(ValueError, match='differ in length'):
        M.frechet_distance(mu, s, mu[:5], s[:5, :5])


# ---------------------------------------------------------------- KID
def mmd2_loop(x, y):
    m, d = len(x), x.shape[1]

    def k(a, b):
        return (sum(float(a[t]) * float(b[t]) for t in range(d)) / d + 1.0) ** 3

    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
    return xx + yy - 2 * xy


def test_kid_matches_naive_loop():
    rng = np.random.default_rng(5)
    a, b = rng.normal(size=(25, 6)), rng.normal(size=(20, 6)) * 1.3 + 0.2
    mean, std = M.kid_from_activations(a, b, n_subsets=4, subset_size=10, seed=3)
    r = np.random.RandomState(3)            # torch-fidelity's subset draws: a's subset, then b's, per round
    vals = [mmd2_loop(a[r.choice(25, 10, replace=False)], b[r.choice(20, 10, replace=False)]) for _ in range(4)]
    assert mean == pytest.approx(np.mean(vals), rel=1e-10)
    assert std == pytest.approx(np.std(vals), rel=1e-10)
    same = rng.normal(size=(200, 6))
    m0, _ = M.kid_from_activations(same[:100], same[100:], n_subsets=5, subset_size=50)
    assert abs(m0) < 0.05                   # unbiased: ~0 for two samples of one distribution
    with pytest.raises(ValueError, match='subset_size'):
        M.kid_from_activations(a, b, subset_size=21)


# ---------------------------------------------------------------- Inception pipeline (offline: random weights)
@pytest.fixture(scope='module')
def random_inception():
    return M.fid_inception(weights='random', seed=0)


def test_random_inception_shape_and_label(random_inception):
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    acts = M.compute_activations(x, random_inception, batch_size=4)
    assert acts.shape == (4, 2048) and acts.dtype == np.float32 and np.isfinite(acts).all()
    assert not random_inception.is_fid and 'NOT-FID' in random_inception.feature_name
    with pytest.raises(ValueError, match='not be FID'):
        M.fid(x, x, model=random_inception)


def test_pipeline_matches_pytorch_fid(tmp_path, random_inception):
    "Folder of PNGs -> our activations/statistics == pytorch-fid's get_activations/statistics, same files and weights."
    g = torch.Generator().manual_seed(7)
    imgs = torch.rand(3, 3, 32, 32, generator=g) * 2 - 1            # 3 images, batches of 2: a partial last batch
    M.save_images_to_dir(imgs, tmp_path)
    files = sorted(str(p) for p in tmp_path.glob('*.png'))
    assert [Path(f).name for f in files] == [f'{i:06d}.png' for i in range(3)]

    # pytorch-fid's own InceptionV3, built by pytorch-fid with the same state dict in place of its download
    sd = M._fid_inception_arch(0).state_dict()
    with mock.patch.object(pfi, 'load_state_dict_from_url', lambda *a, **k: sd):
        ref_net = pfi.InceptionV3([pfi.InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).eval()
    ref = fid_score.get_activations(files, ref_net, batch_size=2, dims=2048, device='cpu', num_workers=0)

    ours_dir = M.compute_activations(tmp_path, random_inception, batch_size=2)
    ours_mem = M.compute_activations(imgs, random_inception, batch_size=3)    # in-memory floats, quantised like PNGs
    np.testing.assert_allclose(ours_dir, ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ours_mem, ref, rtol=1e-5, atol=1e-6)

    mu_ref, s_ref = fid_score.calculate_activation_statistics(files, ref_net, batch_size=2, dims=2048, device='cpu',
                                                              num_workers=0)
    mu, s = M.compute_stats(tmp_path, random_inception, batch_size=2)
    np.testing.assert_allclose(mu, mu_ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(s, s_ref, rtol=1e-4, atol=1e-6)

    # our statistics file is read by pytorch-fid's loader as well
    p = M.save_stats(tmp_path / 'ref.npz', mu, s, {'features': random_inception.feature_name})
    m2, s2 = fid_score.compute_statistics_of_path(str(p), ref_net, 2, 2048, 'cpu')
    np.testing.assert_array_equal(m2, mu)
    np.testing.assert_array_equal(s2, s)
    assert M.load_stats(p, return_meta=True)[2] == {'features': random_inception.feature_name}


# ---------------------------------------------------------------- weights lookup
def test_missing_weights_error(tmp_path, monkeypatch):
    monkeypatch.setenv('TORCH_HOME', str(tmp_path))
    monkeypatch.delenv(M.FID_WEIGHTS_ENV, raising=False)
    with pytest.raises(M.FIDWeightsNotFoundError) as e:
        M.fid_inception(download=False)
    msg = str(e.value)
    assert M.FID_WEIGHTS_FILE in msg and M.FID_WEIGHTS_ENV in msg
    assert str(tmp_path / 'hub' / 'checkpoints' / M.FID_WEIGHTS_FILE) in msg
    assert 'allow_random' in msg
    monkeypatch.setenv(M.FID_WEIGHTS_ENV, str(tmp_path / 'elsewhere.pth'))
    with pytest.raises(M.FIDWeightsNotFoundError, match='given location'):
        M.fid_inception(allow_random=True)        # an explicit location that lacks the file is an error, not a fallback


def test_local_weights_loaded_with_weights_only(tmp_path, monkeypatch):
    monkeypatch.setenv('TORCH_HOME', str(tmp_path))
    monkeypatch.delenv(M.FID_WEIGHTS_ENV, raising=False)
    hub = tmp_path / 'hub' / 'checkpoints'
    hub.mkdir(parents=True)
    torch.save(M._fid_inception_arch(1).state_dict(), hub / M.FID_WEIGHTS_FILE)
    calls = []
    real_load = torch.load

    def spy(*a, **k):
        calls.append(k.get('weights_only'))
        return real_load(*a, **k)

    with mock.patch.object(torch, 'load', spy):
        net = M.fid_inception(download=False)
    assert calls == [True]
    assert net.is_fid and net.weights_source == str(hub / M.FID_WEIGHTS_FILE) and net.feature_name == M.FID_FEATURES
    torch.save({'bad': torch.zeros(3)}, tmp_path / 'wrong.pth')
    with pytest.raises(Exception, match='missing keys'):
        M.fid_inception(weights=tmp_path / 'wrong.pth')


# ---------------------------------------------------------------- PSNR / MSE, proxy naming
def test_psnr_mse():
    x = torch.rand(4, 3, 8, 8, dtype=torch.float64) * 2 - 1
    assert M.psnr(x, x).item() == float('inf')
    assert M.psnr(x, x, max_db=80.).item() == 80.
    assert M.psnr(x, x + 0.05).item() == pytest.approx(10 * np.log10(4 / 0.0025), rel=1e-9)
    assert M.psnr(x, x + 0.05, data_range=1.0).item() == pytest.approx(10 * np.log10(1 / 0.0025), rel=1e-9)
    assert M.mse(x, x + 0.05).item() == pytest.approx(0.0025, rel=1e-9)
    assert M.psnr(x, x + 0.05, reduction='none').shape == (4,)


def test_proxy_fd_is_labelled_and_not_fid():
    clf = M.ProxyClassifier()
    assert clf.feature_name.startswith('proxy_fd:')
    with pytest.raises(ValueError, match='not be FID'):
        M.fid(torch.zeros(2, 3, 32, 32), torch.zeros(2, 3, 32, 32), model=clf)


def test_default_proxy_classifier_file():
    p = M.default_proxy_path()
    if not p.is_file():
        pytest.skip(f'{p} not trained yet: {M.PROXY_TRAIN_COMMAND}')
    assert p.stat().st_size < 1_000_000
    clf = M.load_proxy_classifier(p)
    assert clf.record['metric'].startswith('proxy_fd') and 0.3 < clf.record['test_accuracy'] <= 1
    assert clf.record['feature_name'] == clf.feature_name
