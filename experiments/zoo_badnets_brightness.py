"""Where the zoo's GTSRB BadNets trigger fails: ASR against the brightness of the patch area.

The trigger is a white 4x4 patch near the bottom-right corner; on test images whose corner is
already bright the patch changes little. Prints the ASR per brightness bin of that area (before
patching), over the non-target-class test images:

    .venv/bin/python experiments/zoo_badnets_brightness.py --checkpoint runs/zoo/gtsrb/badnets
"""

import argparse
import functools

import jax
import numpy as np

from awm_jax.attacks.badnets import patch_slices
from awm_jax.attacks.base import triggered_test_set
from awm_jax.compare import load_backdoored
from awm_jax.eval.metrics import make_predict_fn, predict_in_batches

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--checkpoint", default="runs/zoo/gtsrb/badnets")
parser.add_argument("--dataset", default="../shared/data/gtsrb-32.tar.gz")
args = parser.parse_args()
model, variables, dataset, attack, meta = load_backdoored(args.checkpoint, args.dataset)
test = dataset.test
trig = triggered_test_set(test, attack, jax.random.key(0))
predict = make_predict_fn(model)
pred = np.asarray(predict_in_batches(functools.partial(predict, variables), trig.images, 500))
target = meta["attack"]["params"]["target"]
nontarget = test.labels != target
hit = pred[nontarget] == target
params = meta["attack"]["params"]
rows, cols = patch_slices(test.images.shape[1:3], params["patch_size"], params["row"], params["col"])
corner = test.images[nontarget][:, rows, cols, :].mean(axis=(1, 2, 3))  # before patching
print(f"ASR {hit.mean():.3f} over {hit.size} non-target test images")
for lo, hi in [(0, .2), (.2, .4), (.4, .6), (.6, .8), (.8, 1.01)]:
    sel = (corner >= lo) & (corner < hi)
    print(f"corner brightness [{lo:.1f},{hi:.1f}): n={sel.sum():5d} ASR={hit[sel].mean():.3f}")
