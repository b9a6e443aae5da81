"""Nothing lost, nothing silent (issue 26) for `adadiff_nb.integrations.diffusers` and `adadiff_nb.models.checkpoint`,
on tiny random
diffusers pipelines built from configs (offline): a refused exit rule (threshold=None, NaN, threshold and exit_layer
together) changes nothing, a failure in the middle of attaching puts back what was attached, heads trained on other
weights of the same config are refused (or attached with a warning when allowed), an adapter without a weights
fingerprint loads with a warning, a config.json and a heads file from two adapters are refused in one line, a
config.json that differs from the config embedded in the weights is reported (the embedded one wins)."""
import json
import warnings

import pytest
import torch

import adadiff_nb.integrations.diffusers as pl
from adadiff_nb.models.checkpoint import CheckpointError, load_model, save_model, save_safetensors
from adadiff_nb.integrations.diffusers import (ExitHeadsMismatchError, disable_early_exit, early_exit_model,
                                               enable_early_exit, exit_stats, load_exit_heads, save_exit_heads,
                                               set_exit_threshold, tiny_dit_pipeline)
from adadiff_nb.models.uvit import create_uvit

from pipeline_helpers import images, one_line   # tests/pipeline_helpers.py

pytestmark = pytest.mark.usefixtures('one_thread')               # tests/conftest.py


@pytest.fixture(scope='module')
def dit():
    return tiny_dit_pipeline(num_layers=3)


def attached(pipe) -> tuple:
    "What is attached: early exit's diffusers hook, the transformer's own forward (if any) and the pipeline class."
    tr = pipe.transformer
    reg = tr.__dict__.get('_diffusers_hook')
    return reg.get_hook(pl.HOOK_NAME) if reg is not None else None, tr.__dict__.get('forward'), type(pipe)


def test_threshold_none_and_both_rules_refused(dit):
    with pytest.raises(ValueError, match='threshold=None is not an exit rule') as e:
        enable_early_exit(dit, threshold=None)
    assert 'exit_layer' in one_line(e)
    assert attached(dit)[0] is None and 'forward' not in dit.transformer.__dict__
    enable_early_exit(dit, threshold=None, exit_layer=1)             # a static exit needs no threshold
    assert exit_stats(dit)['exit_layer'] == 1 and exit_stats(dit)['threshold'] is None
    with pytest.raises(ValueError, match='not both'):
        set_exit_threshold(dit, 0.4, exit_layer=2)
    with pytest.raises(ValueError, match='threshold=None is not an exit rule'):
        set_exit_threshold(dit)
    assert (early_exit_model(dit) is not None, exit_stats(dit)['exit_layer']) == (True, 1)
    disable_early_exit(dit)


def test_refused_rule_keeps_the_working_exit(dit):
    "enable(0.3) then enable(nan) or set_exit_threshold(nan): the 0.3 exit is still attached and gives the same images."
    enable_early_exit(dit, 0.3)
    before, img = attached(dit), images(dit)
    for bad in (lambda: enable_early_exit(dit, float('nan')), lambda: set_exit_threshold(dit, float('nan')),
                lambda: enable_early_exit(dit, 0.5, exit_layer=9), lambda: enable_early_exit(dit, 0.5, policy='x'),
                lambda: enable_early_exit(dit, 0.5, heads=3)):
        with pytest.raises((ValueError, TypeError)):
            bad()
        assert attached(dit) == before
    assert torch.equal(images(dit), img) and exit_stats(dit)['threshold'] == 0.3
    disable_early_exit(dit)


def test_failure_midway_restores(dit, monkeypatch):
    "A failure after the hook was registered (the forward already rewritten, the old hook removed) puts all back."
    from diffusers.hooks import HookRegistry
    real = HookRegistry.register_hook
    def boom(self, hook, name):
        real(self, hook, name)
        raise RuntimeError('registration failed')
    plain = images(dit)
    enable_early_exit(dit, 0.3)
    before, img = attached(dit), images(dit)
    monkeypatch.setattr(HookRegistry, 'register_hook', boom)
    with pytest.raises(RuntimeError, match='registration failed'):
        enable_early_exit(dit, 0.6)
    assert attached(dit) == before and exit_stats(dit)['threshold'] == 0.3
    monkeypatch.undo()
    assert torch.equal(images(dit), img)
    disable_early_exit(dit)
    cls = type(dit)
    monkeypatch.setattr(HookRegistry, 'register_hook', boom)
    with pytest.raises(RuntimeError, match='registration failed'):
        enable_early_exit(dit, 0.6)
    assert attached(dit) == (None, None, cls) and '_diffusers_hook' not in dit.transformer.__dict__   # still plain
    monkeypatch.undo()
    assert torch.equal(images(dit), plain)


def test_other_weights_refused_unless_allowed(dit, tmp_path):
    enable_early_exit(dit, 0.2)
    d = save_exit_heads(dit, tmp_path / 'h')
    disable_early_exit(dit)
    other = tiny_dit_pipeline(num_layers=3, seed=7)                  # the same config, other weights
    with pytest.raises(ExitHeadsMismatchError, match='trained on other weights') as e:
        load_exit_heads(other, d)
    assert 'allow_other_weights=True' in one_line(e) and attached(other)[0] is None
    with pytest.warns(UserWarning, match=r'attached anyway \(allow_other_weights=True\)'):
        load_exit_heads(other, d, allow_other_weights=True)
    disable_early_exit(other)
    with pytest.raises(ExitHeadsMismatchError, match='trained on other weights'):   # an EarlyExitUViT of another model
        enable_early_exit(other, heads=early_exit_model(enable_early_exit(dit)))
    disable_early_exit(dit)
    half = tiny_dit_pipeline(num_layers=3)                           # the same weights, in bf16: accepted
    half.transformer.load_state_dict(dit.transformer.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        load_exit_heads(half.to(torch.bfloat16), d)
    disable_early_exit(half)
    assert '| base model | `DiTTransformer2DModel`' in (d / 'README.md').read_text()


def test_old_adapter_without_fingerprint_warns(dit, tmp_path):
    enable_early_exit(dit, 0.2)
    d = save_exit_heads(dit, tmp_path / 'h')
    sd = {k: v.clone() for k, v in early_exit_model(dit).state_dict().items()}
    disable_early_exit(dit)
    conf = json.loads((d / 'config.json').read_text())
    del conf['base']['weights']
    (d / 'config.json').write_text(json.dumps(conf))
    save_safetensors(sd, d / 'exit_heads.safetensors', {'adadiff_nb': {k: v for k, v in conf.items() if k != 'card'}})
    with pytest.warns(UserWarning, match='record no fingerprint of the weights'):
        load_exit_heads(dit, d)
    assert all(torch.equal(v, sd[k]) for k, v in early_exit_model(dit).state_dict().items())
    disable_early_exit(dit)


def test_config_and_heads_of_two_adapters(dit, tmp_path):
    "config.json of adapter A, heads of adapter B: refused in one line (with metadata, and without it)."
    enable_early_exit(dit, 0.2)
    a = save_exit_heads(dit, tmp_path / 'a')
    disable_early_exit(dit)
    big = tiny_dit_pipeline(num_layers=3, head_dim=4)                # another base: other widths
    b = save_exit_heads(enable_early_exit(big), tmp_path / 'b')
    disable_early_exit(big)
    (b / 'config.json').write_bytes((a / 'config.json').read_bytes())
    with pytest.raises(ExitHeadsMismatchError, match='the two files come from different adapters') as e:
        load_exit_heads(dit, b)
    one_line(e)
    sd_b = early_exit_model(enable_early_exit(big, uem_params='shared')).state_dict()     # no metadata: shapes decide
    disable_early_exit(big)
    save_safetensors(sd_b, b / 'exit_heads.safetensors')
    with pytest.raises(CheckpointError, match='do not fit the early-exit model their config describes') as e:
        load_exit_heads(dit, b)
    assert 'copy both from one save_exit_heads directory' in one_line(e)
    assert attached(dit)[0] is None


def test_edited_adapter_config_is_reported(dit, tmp_path):
    enable_early_exit(dit, 0.2, uem_params='shared')
    d = save_exit_heads(dit, tmp_path / 'h')
    disable_early_exit(dit)
    conf = json.loads((d / 'config.json').read_text())
    conf['uem_params'] = 'per_layer'                                 # an edit the heads file does not follow
    (d / 'config.json').write_text(json.dumps(conf))
    with pytest.warns(UserWarning, match=r'the config embedded in exit_heads.safetensors \(at uem_params\)'):
        load_exit_heads(dit, d)
    assert early_exit_model(dit).config['uem_params'] == 'shared'   # the embedded config wins
    disable_early_exit(dit)
    with pytest.raises(ValueError, match=r"the options \['uem'\] build new heads"):
        enable_early_exit(dit, heads=d, uem='attention')
    assert attached(dit)[0] is None


def test_load_model_reports_an_edited_config(tmp_path):
    save_model(create_uvit('uvit_tiny'), tmp_path)
    rec = json.loads((tmp_path / 'config.json').read_text())
    rec['config']['embed_dim'] = 8
    (tmp_path / 'config.json').write_text(json.dumps(rec))
    with pytest.warns(UserWarning, match=r'\(at config.embed_dim\); using the embedded one') as w:
        m = load_model(tmp_path)
    assert 'save_model(model, dir)' in str(w[0].message) and m.config['embed_dim'] != 8
