"""Writes pytorch_fid_features.npy: pytorch-fid's own FID Inception on the tests' random weights.

Not run by the suite (it needs torch, torchvision and pytorch-fid, which the
project does not depend on). It loads the random state dict that
tests/test_inception.py generates with numpy into pytorch-fid's
`InceptionV3(use_fid_inception=True)` instead of downloading the real
weights, and saves the 2048-d pool features of the same images the test
feeds to our Flax port. Run from the repository root:

  python -m venv --system-site-packages /tmp/fid && /tmp/fid/bin/pip install torch torchvision pytorch-fid==0.3.0
  /tmp/fid/bin/python tests/data/make_pytorch_fid_reference.py
"""

import os
import sys

import numpy as np
import torch
from pytorch_fid import inception as pytorch_fid_inception

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
from test_inception import cross_check_images, random_state_dict  # noqa: E402


def main():
  state_dict = {k: torch.from_numpy(np.asarray(v)) for k, v in random_state_dict().items()}
  state_dict['fc.bias'] = torch.zeros(1008)  # The logits layer, unused for pool features.
  pytorch_fid_inception.load_state_dict_from_url = lambda *args, **kwargs: state_dict
  model = pytorch_fid_inception.InceptionV3(
    [3], resize_input=True, normalize_input=True, use_fid_inception=True
  ).eval()
  images = cross_check_images()  # NHWC in [-1, 1]; pytorch-fid takes NCHW in [0, 1].
  with torch.no_grad():
    features = model(torch.from_numpy((images + 1) / 2).permute(0, 3, 1, 2))[0]
  np.save(os.path.join(HERE, 'pytorch_fid_features.npy'), features[:, :, 0, 0].numpy())


if __name__ == '__main__':
  main()
