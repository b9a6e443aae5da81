"""Helpers shared by the diffusers pipeline tests (test_pipelines_safety.py, test_pipelines_hooks.py, test_compose.py,
test_diffusers_unets.py, the flow-family training tests)."""
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


def same_output(pipe, heads, field: str = 'images') -> bool:
    "Threshold 0 with the trained heads gives exactly the plain pipeline's output (`field`: 'images' or 'frames')."
    from adadiff_nb.integrations.diffusers import disable_early_exit, enable_early_exit
    from adadiff_nb.integrations.transformer_adapters import tiny_call_kwargs
    plain = getattr(pipe(**tiny_call_kwargs(pipe)), field)
    enable_early_exit(pipe, heads=heads, threshold=0.)
    try: ee = getattr(pipe(**tiny_call_kwargs(pipe)), field)
    finally: disable_early_exit(pipe)
    return bool((torch.as_tensor(ee) == torch.as_tensor(plain)).all())


def check_trained_heads(fam: dict, tmp_path, run_args, model_class: str, n_heads, other_seed, other_depth,
                        field: str = 'images') -> dict:
    """`adadiff-train --diffusers-model` on a flow family's fixture ({'dir', 'pipe', 'sd'}): two finite steps, the
    transformer bit-identical, every head moved (`n_heads` of them, or any number when None), threshold 0 equal to
    the plain pipeline, and the heads refused on a pipeline with other weights (`other_seed()`) or depth
    (`other_depth()`). Returns the heads' config."""
    import csv, json, math
    from safetensors.torch import load_file
    from adadiff_nb.apps.train_cli import main
    from adadiff_nb.integrations.diffusers import ExitHeadsMismatchError, enable_early_exit
    out, d, pipe = tmp_path / 'run', fam['dir'], fam['pipe']
    assert main(['--diffusers-model', str(d / 'pipe'), '--data', str(d / 'latents.safetensors'), '--text-features',
                 str(d / 'captions.json'), '--p-uncond', '0.2', '--out', str(out), *run_args]) == 0
    with open(out / 'logs' / 'train.csv') as f: ls = [float(r['loss']) for r in csv.DictReader(f)]
    assert len(ls) == 2 and all(math.isfinite(v) for v in ls)
    heads = out / 'exit_heads'
    assert all(torch.equal(v, fam['sd'][k]) for k, v in pipe.transformer.state_dict().items())
    conf = json.loads((heads / 'config.json').read_text())
    assert (conf['base']['model_class'], conf['card']['objective']) == (model_class, 'flow_match')
    w = load_file(heads / 'exit_heads.safetensors')
    own = pipe.transformer.proj_out.weight
    moved = [k for k, v in w.items() if k.endswith('proj_out.weight') and not torch.equal(v, own)]
    assert len(moved) == len([k for k in w if k.endswith('proj_out.weight')]) > 0
    assert n_heads is None or len(moved) == n_heads
    assert same_output(pipe, heads, field)
    with pytest.raises(ExitHeadsMismatchError, match='other weights'):
        enable_early_exit(other_seed(), heads=heads)
    with pytest.raises(ExitHeadsMismatchError, match='were made for'):
        enable_early_exit(other_depth(), heads=heads)
    return conf


FLOW_RUN = ['--steps', '4', '--batch-size', '4', '--lr', '1e-3', '--warmup-steps', '0', '--ema-decay', '0.5',
            '--log-every', '2', '--device', 'cpu', '--progress', 'false']     # two logged steps of adadiff-train
CIFAR_NAMES = ['airplane', 'car', 'bird', 'cat', 'deer', 'dog', 'frog', 'horse', 'ship', 'truck']


def saved_flow_family(d, pipe, img_size: int) -> dict:
    """A flow family's training fixture: `pipe` saved under d/'pipe', latents (its own `flow_autoencoder`) of 8 CIFAR
    images at `img_size` and one caption each; {'dir', 'pipe', 'img', 'sd' (the transformer's weights)}."""
    import json
    from adadiff_nb import data as adata
    from adadiff_nb.models.autoencoder import precompute_latents
    from adadiff_nb.training.flow_pipelines import flow_autoencoder
    pipe.save_pretrained(d / 'pipe')
    ds = adata.get_dataset('cifar10_slice', img_size=img_size, flip=False)
    img, lab = torch.stack([torch.as_tensor(ds[i][0]) for i in range(8)]), [int(ds[i][1]) for i in range(8)]
    precompute_latents(img, flow_autoencoder(pipe.vae), d / 'latents.safetensors')
    (d / 'captions.json').write_text(json.dumps([f'a photo of a {CIFAR_NAMES[k]}' for k in lab]))
    return dict(dir=d, pipe=pipe, img=img, sd={k: v.clone() for k, v in pipe.transformer.state_dict().items()})
