"""Prototype (not shipped): FixMatch on EuroSAT, 50 labelled tiles per class, from random init.

Same labelled / val / test draw as `python -m pipeline bench quality --set eurosat --per-class 50`
(write_eurosat, draw 0); the unlabelled pool is every other tile of the tar (labels never read).
ResNet-18 (pipeline.training.model.build_network), 64 px. Per step: B labelled (weak view, CE) + mu*B unlabelled:
pseudo-label = argmax of the live model on a weak view (no grad), kept where max prob >= tau, CE on a
strong view (RandAugment + RandomErasing). SGD nesterov, cosine over STEPS; EMA weights evaluated.
Test accuracy of the EMA model at the end (no selection on test), bootstrap 95% CI.

Kept for the measurement in docs/benchmarks.md (2026-12-03: 3,000 steps, 0.774 [0.755, 0.793], 66 min on
one core); not part of the package, the tests or make bench. Run from the repository root:

    OMP_NUM_THREADS=1 .venv/bin/python docs/prototypes/fixmatch.py STEPS [MU TAU SEED POOL]

It prints JSON lines and saves the EMA weights to $TMPDIR/fixmatch-STEPS-MU-SEED.pt.
"""

import io
import json
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms import v2

from benchmarks.quality import EUROSAT, eurosat_draw
from pipeline.training.model import build_network

STEPS = int(sys.argv[1])
MU = int(sys.argv[2]) if len(sys.argv) > 2 else 3
TAU = float(sys.argv[3]) if len(sys.argv) > 3 else 0.95
SEED = int(sys.argv[4]) if len(sys.argv) > 4 else 0
POOL = int(sys.argv[5]) if len(sys.argv) > 5 else 0  # 0: all unlabelled tiles
K, B = 50, 32
LOG_EVERY = 10 if STEPS < 100 else 50
torch.manual_seed(SEED)
rng = np.random.default_rng(SEED)


def log(**kw):
    print(json.dumps(kw), flush=True)


def load(per_class, draw=0):
    """bench quality's EuroSAT draw (eurosat_draw) with the rest of the tar as the unlabelled pool."""
    out = {s: ([], []) for s in ("train", "val", "test", "pool")}
    classes = {}
    with tarfile.open(EUROSAT) as archive:
        for member, cls, split in eurosat_draw(archive, per_class, draw, pool=True):
            data = archive.extractfile(member).read()
            out[split][0].append(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))
            out[split][1].append(classes.setdefault(cls, len(classes)))
    return {
        s: (torch.from_numpy(np.stack(x)).permute(0, 3, 1, 2).contiguous(), torch.tensor(y))
        for s, (x, y) in out.items()
    }


def d4(x):
    """Random flips and transposes per image (the satellite preset's SquareSymmetry) and a +-4 px shift."""
    n = x.shape[0]
    flip_h = torch.rand(n) < 0.5
    flip_v = torch.rand(n) < 0.5
    trans = torch.rand(n) < 0.5
    x = x.clone()
    x[flip_h] = x[flip_h].flip(3)
    x[flip_v] = x[flip_v].flip(2)
    x[trans] = x[trans].transpose(2, 3)
    pad = F.pad(x.float(), (4, 4, 4, 4), mode="reflect")
    dx, dy = torch.randint(0, 9, (2, n))
    return torch.stack([pad[i, :, dy[i] : dy[i] + 64, dx[i] : dx[i] + 64] for i in range(n)]).to(torch.uint8)


randaug = v2.RandAugment(num_ops=2, magnitude=10)
erase = v2.RandomErasing(p=1.0, scale=(0.02, 0.25), value=127)


def strong(x):
    x = d4(x)
    return torch.stack([erase(randaug(img)) for img in x])


def main():
    data = load(K)
    xl, yl = data["train"]
    xu = data["pool"][0]
    if POOL:
        xu = xu[torch.from_numpy(rng.permutation(len(xu))[:POOL])]
    mean = xl.float().mean((0, 2, 3), keepdim=True) / 255
    std = xl.float().std((0, 2, 3), keepdim=True) / 255
    norm = lambda x: (x.float() / 255 - mean) / std  # noqa: E731
    log(tag="data", train=len(xl), val=len(data["val"][0]), test=len(data["test"][0]), pool=len(xu))

    net = build_network("resnet18", 10)
    ema = torch.optim.swa_utils.AveragedModel(
        net, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(0.999), use_buffers=True
    )
    opt = torch.optim.SGD(net.parameters(), lr=0.03, momentum=0.9, nesterov=True, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: np.cos(7 * np.pi * s / (16 * STEPS)))

    def test(model, split="test"):
        model.eval()
        x, y = data[split]
        with torch.no_grad():
            p = torch.cat([model(norm(x[i : i + 256])).softmax(1) for i in range(0, len(x), 256)])
        model.train()
        return p, y

    start = time.perf_counter()
    il, iu = torch.randperm(len(xl)), torch.randperm(len(xu))
    pl = pu = 0
    for step in range(1, STEPS + 1):
        if pl + B > len(il):
            il, pl = torch.randperm(len(xl)), 0
        if pu + MU * B > len(iu):
            iu, pu = torch.randperm(len(xu)), 0
        bl, bu = xl[il[pl : pl + B]], xu[iu[pu : pu + MU * B]]
        ybl = yl[il[pl : pl + B]]
        pl, pu = pl + B, pu + MU * B
        with torch.no_grad():
            probs = net(norm(d4(bu))).softmax(1)
            conf, pseudo = probs.max(1)
            mask = (conf >= TAU).float()
        logits = net(norm(torch.cat([d4(bl), strong(bu)])))
        loss_l = F.cross_entropy(logits[:B], ybl)
        loss_u = (F.cross_entropy(logits[B:], pseudo, reduction="none") * mask).mean()
        loss = loss_l + loss_u
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        ema.update_parameters(net)
        if step % LOG_EVERY == 0:
            log(
                step=step,
                s=round(time.perf_counter() - start),
                loss_l=round(loss_l.item(), 3),
                loss_u=round(loss_u.item(), 3),
                mask=round(mask.mean().item(), 3),
            )
        if step % 500 == 0 or step == STEPS:
            p, y = test(ema.module, "val")
            log(step=step, val_accuracy=round((p.argmax(1) == y).float().mean().item(), 4))
    p, y = test(ema.module)
    correct = (p.argmax(1) == y).numpy().astype(float)
    boots = [correct[rng.integers(0, len(correct), len(correct))].mean() for _ in range(1000)]
    log(
        tag="fixmatch",
        steps=STEPS,
        mu=MU,
        tau=TAU,
        seed=SEED,
        fit_s=round(time.perf_counter() - start),
        test_accuracy=round(correct.mean(), 4),
        ci=[round(float(np.quantile(boots, q)), 4) for q in (0.025, 0.975)],
    )
    torch.save(ema.module.state_dict(), Path(tempfile.gettempdir()) / f"fixmatch-{STEPS}-{MU}-{SEED}.pt")


if __name__ == "__main__":
    main()
