"Per-sample discrimination of the exit criteria: the embedded default model, BERxiT and CALM, at a tiny size."
import json, math
import numpy as np
import pytest
import torch
from adadiff_nb.exits.baselines import BERxiTUViT, CALMUViT
from adadiff_nb.models.uvit import create_uvit
from adadiff_nb.models.default_model import load_default, default_threshold
from adadiff_nb.evaluation.discrimination import exit_discrimination, discrimination_summary


def _in(v, lo, hi) -> bool:
    "Every value of the nested list `v` is None (undefined) or a finite number in [lo, hi]."
    a = np.array(v, dtype=np.float64)                      # None -> NaN
    return bool(np.all(np.isnan(a) | ((a >= lo) & (a <= hi))))


def test_exit_discrimination_default_model():
    model = load_default('cpu')
    res = exit_discrimination(model, n=8, steps=4, seed=0, threshold=default_threshold(model))
    json.dumps(res, allow_nan=False)                       # JSON-ready: lists, no tensors, no NaN
    L = model.num_layers
    need = {'kind', 'sampler', 'steps', 'n', 'threshold', 'num_layers', 'exits', 'model_time', 'exit_layer',
            'layer_ratio', 'epsilon', 'epsilon_rule', 'spearman', 'auroc', 'positive', 'median_spearman',
            'median_auroc', 'median_spearman_all', 'median_auroc_all', 'auroc_defined', 'eta2_u', 'eta2_d',
            'eta2_exit', 'pooled', 'u', 'd'}
    assert need <= res.keys(), need - res.keys()
    assert res['kind'] == 'exit_discrimination' and res['num_layers'] == L and res['steps'] == 4
    assert np.array(res['spearman'], np.float64).shape == (4, L) == np.array(res['auroc'], np.float64).shape
    assert np.array(res['u']).shape == (4, L, 8) and np.array(res['exit_layer']).shape == (4, 8)
    assert _in(res['spearman'], -1, 1) and _in(res['median_spearman'], -1, 1)
    assert _in(res['auroc'], 0, 1) and _in(res['median_auroc'], 0, 1) and _in(res['positive'], 0, 1)
    assert _in(res['eta2_u'], 0, 1) and _in(res['eta2_d'], 0, 1) and _in([res['eta2_exit']], 0, 1)
    assert all(x is not None for x in res['eta2_u'])      # the trained criterion's u varies
    assert res['epsilon'] > 0 and 0 <= res['auroc_defined'] <= 1 and 0 <= res['layer_ratio'] <= 1
    assert np.all(np.array(res['d']) >= 0) and np.all(np.diff(res['model_time']) < 0)
    p = res['pooled']
    assert p['label'] == 'pooled (mixes timesteps)' and len(p['spearman']) == len(p['auroc']) == L
    assert _in(p['spearman'], -1, 1) and _in(p['auroc'], 0, 1) and not math.isnan(p['spearman_all'])
    assert 'median Spearman' in discrimination_summary(res)


def test_exit_discrimination_of_every_criterion_family():
    "The same within-step measurement for BERxiT's learned exit predictor and CALM's two measures (tiny, random)."
    torch.manual_seed(0)
    models = {'berxit': BERxiTUViT.from_backbone(create_uvit('uvit_tiny')),
              'calm cosine': CALMUViT.from_backbone(create_uvit('uvit_tiny')),
              'calm classifier': CALMUViT.from_backbone(create_uvit('uvit_tiny'), criterion='classifier')}
    for name, m in models.items():
        res = exit_discrimination(m.eval(), n=4, steps=3, seed=0, threshold=0.5)
        L = m.num_layers
        assert np.array(res['spearman'], np.float64).shape == (3, L), name
        assert _in(res['spearman'], -1, 1) and _in(res['auroc'], 0, 1) and _in([res['eta2_exit']], 0, 1), name
        assert np.array(res['u']).shape == (3, L, 4) and res['pooled']['label'] == 'pooled (mixes timesteps)', name
    with pytest.raises(ValueError, match='needs an early-exit model'):
        exit_discrimination(create_uvit('uvit_tiny'), n=4, steps=2)
