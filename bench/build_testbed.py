"""Build the trained diffusers test bed: a DiTPipeline (AutoencoderKL + class-conditional DiT) on the offline CIFAR-10
subset, with exit heads trained by `train_diffusers`, written as a pipeline folder that `DiTPipeline.from_pretrained`
opens. Usage (about 40 minutes on 2 CPU threads):

    OMP_NUM_THREADS=2 python bench/build_testbed.py --out runs/cifar10_dit_testbed --vae-steps 2500 --dit-steps 12000 \\
        --head-steps 2000

Refuses a non-empty --out unless --force; an interrupted build resumes from OUT.parts. See adadiff_nb.training.testbed.
"""
import sys

from adadiff_nb.training.testbed import main

if __name__ == '__main__':
    sys.exit(main())
