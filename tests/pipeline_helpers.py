"""Helpers shared by the diffusers pipeline tests (test_pipelines_safety.py, test_pipelines_hooks.py, test_compose.py,
test_diffusers_unets.py)."""
import pytest
import torch


def images(pipe, labels=(1, 5)):
    "Two steps of a tiny class-conditional pipeline from a fixed generator, as a tensor."
    return pipe(class_labels=list(labels), num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                output_type='pt').images


def one_line(err) -> str:
    "The message of a `pytest.raises` result, which must be one line."
    msg = str(err.value)
    assert '\n' not in msg, msg
    return msg


def count_offload_calls(tr) -> list:
    "Calls of accelerate's offload `pre_forward` on `tr` (it loads the model and moves its inputs)."
    calls, hook = [], tr._hf_hook
    real = hook.pre_forward
    def pre_forward(module, *args, **kwargs):
        calls.append(module)
        return real(module, *args, **kwargs)
    hook.pre_forward = pre_forward
    return calls


@pytest.fixture(scope='module', autouse=True)
def unet_families():
    "The UNet families in the backbone registry for a test module that imports this fixture (restored after)."
    from adadiff_nb.integrations.unet_adapters import unet_backbone_specs
    from adadiff_nb.models.registry import BACKBONES, register_backbone, unregister_backbone
    specs = unet_backbone_specs()
    prev = {s.family: BACKBONES.get(s.family) for s in specs}
    for s in specs: register_backbone(s, replace=True)
    yield
    for f, p in prev.items():
        if p is None: unregister_backbone(f)
        else: register_backbone(p, replace=True)
