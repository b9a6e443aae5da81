"""Helpers shared by the diffusers pipeline tests (test_pipelines_safety.py, test_pipelines_hooks.py)."""
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
